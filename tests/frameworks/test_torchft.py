"""distclip inside torchft 0.2.0 fault-tolerant training, with torchft's real Lighthouse and Manager, on CPU gloo.

Three runs, one after another in ONE fresh process under a timeout (torchft's Rust servers never start in
the pytest process; every torchft operation has a timeout too), set up as torchft's own integration tests:

* ``ddp``: 2 replica groups (threads) with torchft's ``DistributedDataParallel`` and ``OptimizerWrapper``;
* ``fsdp``: 2 replica groups x 2 ranks (processes): ``fully_shard`` over each group's 2 ranks, gradients
  averaged over torchft's replica dimension by FSDP's all-reduce hook (torchtitan's torchft recipe);
* ``heal``: 3 replica groups with torchft's DDP and an adaptive (AutoClip) clipper; replica 2 leaves after
  its third step and joins again later: it heals from a survivor (model, optimizer and clipper state).

Every step, on every replica, after backward: six probe clippers (p = 2, inf, 1.5, uniform and per
group) clip the averaged gradients and are undone, and the attached clipper clips inside torchft's
step (``distclip.integrations.torchft.attach``). The checks, against a float64 reference of the
averaged gradients (``tests.helpers.reference``) and torch's own ``clip_grad_norm_`` on them: norms within
1e-6, bitwise identical on every replica of a step, clipped gradients right, the averaged gradients
the float64 mean of the participants' own gradients (torchft's averaging intact), each committed step
stepped once, and every replica ending with the same parameters and clipper state.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchft  # noqa: F401  (a torchft that cannot import fails these tests)
from torch import nn
from torchft.coordination import LighthouseServer
from torchft.ddp import DistributedDataParallel as FTDistributedDataParallel
from torchft.manager import Manager
from torchft.optim import OptimizerWrapper
from torchft.process_group import ManagedProcessGroup, ProcessGroupGloo

import distclip
from distclip.integrations import torchft as distclip_torchft
from tests.helpers import REPO
from tests.helpers.checks import assert_grad_close
from tests.helpers.nd_helpers import count_collectives
from tests.helpers.reference import norm64, reference_clip, rel_err

ROOT = REPO
TIMEOUT = timedelta(seconds=20)  # every torchft operation (collectives, quorum, RPCs, checkpoint transfer)
RTOL = 1e-6
STEPS = {"ddp": 4, "fsdp": 4, "heal": 10, "heal_sync": 10}
LEAVES_AFTER, RETURNS_AT = 3, 5  # heal: replica 2 leaves after its 3rd commit, returns when the survivors reach step 5

GROUPS = [{"name": "inp", "match": ["inp.*"], "max_norm": 0.02}, {"name": "hidden", "match": ["hidden.*"], "max_norm": 5.0}]
PROBES = [{"norm_type": p, "max_norm": m, **({"groups": GROUPS} if grouped else {})}
          for grouped in (False, True) for p, m in ((2.0, 0.05), (math.inf, 0.01), (1.5, 0.1))]
ATTACHED = {"norm_type": 2.0, "max_norm": 0.03, "groups": [{"name": "hidden", "match": ["hidden.*"], "max_norm": 0.02}]}
ADAPTIVE = {"norm_type": 2.0, "max_norm": 10.0, "policy": {"kind": "autoclip", "quantile": 0.5}}


# ---------------------------------------------------------------- the model and its data (shared by every run)
class Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.inp, self.hidden, self.out = nn.Linear(6, 16, dtype=dtype), nn.Linear(16, 16, dtype=dtype), nn.Linear(16, 4, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))


def batch(replica: int, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * replica + 100 * rank + step)
    return torch.randn(8, 6, generator=g), torch.randn(8, 4, generator=g)


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x.to(next(model.parameters()).dtype)) - y.to(next(model.parameters()).dtype)).square().mean()


_INIT = threading.Lock()


def fresh_net() -> Net:
    with _INIT:  # replicas are threads sharing the global RNG: identical initial weights
        torch.manual_seed(0)
        return Net()


def local_grads64(full_params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """This rank's own gradient of its batch, float64, in a plain model: no torchft, no distclip."""
    model = Net(torch.float64)
    model.load_state_dict({n: p.double() for n, p in full_params.items()})
    loss_fn(model, x, y).backward()
    return {n: p.grad for n, p in model.named_parameters()}


# ---------------------------------------------------------------- what each replica records per step
def _report(report: distclip.ClipReport) -> dict[str, Any]:
    return {"total": report.total_norm.clone(), "groups": {k: v.clone() for k, v in report.group_norms.items()},
            "coefs": {k: v.clone() for k, v in report.coefs.items()},
            "thresholds": {k: v.clone() for k, v in report.thresholds.items()}}


class Recorder:
    """Runs the probes after backward, captures the attached clipper's clip inside the step, counts steps."""

    def __init__(self, model: nn.Module, clippers: list[distclip.GradClipper], attached: distclip.GradClipper,
                 inner: torch.optim.Optimizer, full: Callable[[torch.Tensor], torch.Tensor], count: bool = False):
        self.model, self.clippers, self.attached, self.full = model, clippers, attached, full
        # CommDebugMode tracks modules globally: only where each process runs one replica (not in threads)
        self.count = count_collectives if count else (lambda fn: (fn(), None))
        self.named = [(n, p) for n, p in model.named_parameters()]
        self.inner_steps = 0
        self.pending: dict[str, Any] | None = None
        inner.register_step_post_hook(self._after_step)  # after distclip's pre-hook clipped, the grads are as stepped

    def grads(self) -> dict[str, torch.Tensor]:
        return {n: self.full(p.grad).detach().clone() for n, p in self.named}

    def params(self) -> dict[str, torch.Tensor]:
        return {n: self.full(p.data if not hasattr(p, "full_tensor") else p).detach().clone() for n, p in self.named}

    def after_backward(self, manager: Manager, local64: dict[str, torch.Tensor]) -> dict[str, Any]:
        rec = {"step": manager.current_step(), "participating": manager.is_participating(),
               "num_participants": manager.num_participants(), "avg": self.grads(), "local64": local64, "probes": []}
        # torch's own norm of these gradients, and the collectives it takes (one clip group)
        _, rec["torch_collectives"] = self.count(
            lambda: self.full(torch.nn.utils.get_total_norm([p.grad for _, p in self.named])))
        for clipper in self.clippers:  # clip, record, undo: every config on the same averaged gradients
            saved = [distclip_local(p.grad).clone() for _, p in self.named]
            report, collectives = self.count(clipper.clip)
            probe = {**_report(report), "collectives": collectives}
            probe["clipped"] = self.grads()
            with torch.no_grad():
                for (_, p), s in zip(self.named, saved):
                    distclip_local(p.grad).copy_(s)
            rec["probes"].append(probe)
        self.pending = rec
        return rec

    def _after_step(self, *_: Any) -> None:
        self.inner_steps += 1
        assert self.pending is not None and "attached" not in self.pending, "the wrapped optimizer stepped twice"
        self.pending["attached"] = {**_report(self.attached.last_report), "clipped": self.grads(),
                                    "clipper_steps": self.attached.steps}


def distclip_local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def run_steps(manager: Manager, optimizer: OptimizerWrapper, recorder: Recorder, model: nn.Module, replica: int,
              rank: int, until: int, records: list[dict[str, Any]],
              on_step: Callable[[int], None] = lambda step: None) -> list[dict[str, Any]]:
    while manager.current_step() < until:
        optimizer.zero_grad()  # starts torchft's quorum (asynchronously: a healing replica learns its step later)
        x, y = batch(replica, rank, manager.current_step())
        local64 = local_grads64(recorder.params(), x, y)
        loss_fn(model, x, y).backward()
        rec = recorder.after_backward(manager, local64)  # the step as the quorum set it
        optimizer.step()  # should_commit(), then distclip clips and the wrapped optimizer steps
        rec["committed"] = manager.current_step() == rec["step"] + 1
        assert rec["committed"] == ("attached" in rec), "the clip ran on a step torchft did not commit, or missed one"
        records.append(rec)
        on_step(manager.current_step())
    return records


def manager_for(replica: int, rank: int, world: int, store_port: int, lighthouse: str, state: Any,
                async_quorum: bool = True) -> Manager:
    return Manager(pg=ProcessGroupGloo(timeout=TIMEOUT), min_replica_size=2, replica_id=str(replica),
                   use_async_quorum=async_quorum,
                   load_state_dict=state[0] if state else None, state_dict=state[1] if state else None,
                   store_addr="localhost", store_port=store_port, rank=rank, world_size=world,
                   lighthouse_addr=lighthouse, timeout=TIMEOUT, quorum_timeout=TIMEOUT, connect_timeout=TIMEOUT,
                   init_sync=False)


def final_state(recorder: Recorder, manager: Manager, records: list[dict[str, Any]]) -> dict[str, Any]:
    return {"records": records, "params": recorder.params(), "inner_steps": recorder.inner_steps,
            "commits": manager.current_step(), "clipper_state": recorder.attached.state_dict()}


# ---------------------------------------------------------------- ddp and heal: replica groups as threads
def ddp_replica(replica: int, lighthouse: str, steps: int, attached_config: dict[str, Any],
                wait: threading.Event | None = None, on_step: Callable[[int], None] = lambda s: None,
                records: list[dict[str, Any]] | None = None, async_quorum: bool = True) -> dict[str, Any]:
    if wait is not None and not wait.wait(TIMEOUT.total_seconds() * 2):
        raise TimeoutError(f"replica {replica} was never told to come back")
    store = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
    model = fresh_net()

    def save() -> dict[str, Any]:
        return {"model": model.state_dict(), "optim": inner.state_dict()}

    def load(state: dict[str, Any]) -> None:
        model.load_state_dict(state["model"])
        inner.load_state_dict(state["optim"])

    manager = manager_for(replica, 0, 1, store.port, lighthouse, (load, save), async_quorum)
    try:
        ddp = FTDistributedDataParallel(manager, model)
        inner = torch.optim.SGD(ddp.parameters(), lr=0.5, momentum=0.9)
        optimizer = OptimizerWrapper(manager, inner)
        attached = distclip.GradClipper(ddp, attached_config)
        distclip_torchft.attach(attached, optimizer)
        probes = [distclip.GradClipper(ddp, config) for config in PROBES]
        recorder = Recorder(ddp.module, probes, attached, inner, full=lambda t: t)
        assert attached.adapter.hook_status.startswith("torchft's DDP"), attached.adapter.hook_status
        assert all(c.adapter.reduce_group is None for c in (attached, *probes))  # no collective, none across replicas
        records = run_steps(manager, optimizer, recorder, ddp, replica, 0, steps, [] if records is None else records,
                            on_step)
        return final_state(recorder, manager, records)
    finally:
        manager.shutdown(wait=False)


class Left(Exception):
    """Replica 2 leaves (torchft's injected-failure pattern: the replica's process would die here)."""


def heal_replica(replica: int, lighthouse: str, survivors_at: threading.Event, async_quorum: bool) -> list[dict[str, Any]]:
    """Replica 2: train, leave after LEAVES_AFTER commits, come back (fresh model and clipper) when told."""
    records: list[dict[str, Any]] = []

    def leave(step: int) -> None:
        if step == LEAVES_AFTER:
            raise Left

    try:
        ddp_replica(replica, lighthouse, STEPS["heal"], ADAPTIVE, on_step=leave, records=records, async_quorum=async_quorum)
        raise AssertionError("replica 2 did not leave")
    except Left:
        pass
    return [{"records": records, "left": True},
            ddp_replica(replica, lighthouse, STEPS["heal"], ADAPTIVE, wait=survivors_at, async_quorum=async_quorum)]


def run_threads(targets: list[Callable[[], Any]], timeout: float) -> list[Any]:
    results: list[Any] = [None] * len(targets)

    def call(i: int) -> None:
        try:
            results[i] = ("ok", targets[i]())
        except BaseException:  # noqa: BLE001  (reported to the test)
            results[i] = ("error", traceback.format_exc())

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(len(targets))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"replicas still running after {timeout} s (a hang): {[t.is_alive() for t in threads]}")
    errors = [r[1] for r in results if r[0] == "error"]
    if errors:
        raise RuntimeError("a replica failed:\n" + "\n".join(errors))
    return [r[1] for r in results]


def scenario_ddp() -> dict[str, Any]:
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=2)
    try:
        out = run_threads([lambda r=r: ddp_replica(r, lighthouse.address(), STEPS["ddp"], ATTACHED) for r in range(2)], 60)
    finally:
        lighthouse.shutdown()
    return {"replicas": {(r, 0, 0): state for r, state in enumerate(out)}}


def scenario_heal(async_quorum: bool = True) -> dict[str, Any]:
    """Replica 2 leaves and comes back; with ``async_quorum`` (torchft's default) it heals inside ``should_commit()``
    (after its backward, in which it contributed zeros), else at ``zero_grad()``, before its forward."""
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=2, join_timeout_ms=1000, heartbeat_timeout_ms=5000)
    survivors_at = threading.Event()

    def survivor(replica: int) -> dict[str, Any]:
        def on_step(step: int) -> None:
            if step == RETURNS_AT:
                survivors_at.set()

        return ddp_replica(replica, lighthouse.address(), STEPS["heal"], ADAPTIVE, on_step=on_step, async_quorum=async_quorum)

    try:
        s0, s1, comeback = run_threads([lambda: survivor(0), lambda: survivor(1),
                                        lambda: heal_replica(2, lighthouse.address(), survivors_at, async_quorum)], 100)
    finally:
        lighthouse.shutdown()
    return {"replicas": {(0, 0, 0): s0, (1, 0, 0): s1, (2, 0, 0): comeback[0], (2, 0, 1): comeback[1]}}


# ---------------------------------------------------------------- fsdp: 2 replica groups x 2 ranks, processes
def fsdp_rank(group: int, rank: int, conn: Any, out_dir: str) -> None:
    """One rank of one replica group: FSDP2 over the group's 2 ranks, torchft over the groups."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    torch.set_num_threads(1)
    try:
        lighthouse, store_port = conn.recv()
        store = dist.TCPStore("localhost", store_port, is_master=False, wait_for_workers=False, timeout=TIMEOUT)
        dist.init_process_group("gloo", store=dist.PrefixStore("replica_group", store), rank=rank, world_size=2,
                                timeout=TIMEOUT)
        manager = manager_for(group, rank, 2, store_port, lighthouse, None)
        try:
            model = fresh_net()
            mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",))
            for layer in (model.inp, model.hidden, model.out):
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            # built BEFORE torchft's hook: distclip sets its own all-reduce hook, which torchft's then replaces
            early = distclip.GradClipper(model, PROBES[0], comm_hook=True)
            replicate = ManagedProcessGroup(manager)

            def average_over_replica_groups(output: torch.Tensor) -> None:  # torchtitan's TorchFTManager hook
                dist.all_reduce(output, group=replicate, op=dist.ReduceOp.AVG)

            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.set_all_reduce_hook(average_over_replica_groups)
            # built AFTER it: distclip sees torchft's hook, keeps it, and measures after backward
            attached = distclip.GradClipper(model, ATTACHED, comm_hook=True)
            inner = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
            optimizer = OptimizerWrapper(manager, inner)
            distclip_torchft.attach(attached, optimizer)
            probes = [early] + [distclip.GradClipper(model, config, comm_hook=False) for config in PROBES[1:]]
            recorder = Recorder(model, probes, attached, inner, full=lambda t: t.full_tensor(), count=True)
            records = run_steps(manager, optimizer, recorder, model, group, rank, STEPS["fsdp"], [])
            state = final_state(recorder, manager, records)
            state["hook_status"] = (early.adapter.hook_status, attached.adapter.hook_status)
            torch.save(state, f"{out_dir}/fsdp-{group}-{rank}.pt")
        finally:
            manager.shutdown(wait=False)
        dist.barrier()
        dist.destroy_process_group()
        conn.send("ok")
    except BaseException:  # noqa: BLE001
        conn.send(traceback.format_exc())


def scenario_fsdp(out_dir: str) -> dict[str, Any]:
    ctx = mp.get_context("fork")  # before any torchft server exists in this process: the ranks start in ~0 s
    pipes, procs = [], []
    for group in range(2):
        for rank in range(2):
            parent, child = ctx.Pipe()
            procs.append(ctx.Process(target=fsdp_rank, args=(group, rank, child, out_dir), daemon=True))
            pipes.append(parent)
    for p in procs:
        p.start()
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=2)
    stores = [dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT) for _ in range(2)]
    try:
        for i, pipe in enumerate(pipes):
            pipe.send((lighthouse.address(), stores[i // 2].port))
        deadline, answers = time.monotonic() + 100, []
        for pipe in pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError("an FSDP rank is still running after 100 s (a hang)")
            answers.append(pipe.recv())
        failures = [a for a in answers if a != "ok"]
        if failures:
            raise RuntimeError("an FSDP rank failed:\n" + "\n".join(failures))
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        lighthouse.shutdown()
    return {"replicas": {(g, r, 0): torch.load(f"{out_dir}/fsdp-{g}-{r}.pt", weights_only=False)
                         for g in range(2) for r in range(2)}}


SCENARIOS = ("fsdp", "ddp", "heal", "heal_sync")  # fsdp first: its ranks fork before any torchft server runs in the process


def main(out_dir: str) -> None:
    """Run every scenario in this fresh process, one after the other; save each one's result or traceback."""
    torch.set_num_threads(1)
    runs = {"ddp": scenario_ddp, "heal": scenario_heal, "heal_sync": lambda: scenario_heal(async_quorum=False),
            "fsdp": lambda: scenario_fsdp(out_dir)}
    for scenario in SCENARIOS:
        start = time.monotonic()
        try:
            torch.save(runs[scenario](), f"{out_dir}/{scenario}.pt")
            print(f"torchft {scenario} run: {time.monotonic() - start:.1f} s", flush=True)
        except BaseException:  # noqa: BLE001  (reported by that scenario's test)
            Path(f"{out_dir}/{scenario}.err").write_text(traceback.format_exc())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # torchft's servers and executors keep threads alive: exit without waiting for them


# ---------------------------------------------------------------- pytest: one launch, a test per scenario
_RUNS: dict[str, Any] = {}


def launched(scenario: str) -> dict[str, Any]:
    """The scenario's result from the one launch of every scenario (started by the first test that needs it)."""
    if not _RUNS:
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RUST_LOG": "error"}
            try:
                proc = subprocess.run([sys.executable, "-m", "tests.frameworks.test_torchft", tmp], cwd=ROOT, env=env,
                                      capture_output=True, text=True, timeout=300)
                log = f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            except subprocess.TimeoutExpired as err:
                log = f"the torchft runs hung (killed after 300 s)\n{(err.stderr or b'')[-4000:]!r}"
            for name in SCENARIOS:
                if os.path.exists(f"{tmp}/{name}.pt"):
                    _RUNS[name] = torch.load(f"{tmp}/{name}.pt", weights_only=False)
                elif os.path.exists(f"{tmp}/{name}.err"):
                    _RUNS[name] = AssertionError(f"torchft {name} run failed:\n{Path(f'{tmp}/{name}.err').read_text()}")
                else:
                    _RUNS[name] = AssertionError(f"torchft {name} run left no result:\n{log}")
    if isinstance(_RUNS[scenario], BaseException):
        raise _RUNS[scenario]
    return _RUNS[scenario]


def committed_by_step(run: dict[str, Any]) -> dict[int, list[tuple[tuple[int, int, int], dict[str, Any]]]]:
    """Every committed step's records, keyed by step, with the (replica, rank, incarnation) that wrote each."""
    steps: dict[int, list] = {}
    for who, state in run["replicas"].items():
        for rec in state["records"]:
            if rec["committed"]:
                steps.setdefault(rec["step"], []).append((who, rec))
    return steps


def torch_clip(grads: dict[str, torch.Tensor], config: dict[str, Any]) -> tuple[float, dict[str, float], dict[str, torch.Tensor]]:
    """torch.nn.utils.clip_grad_norm_ on copies of the averaged gradients: total norm, per group (each group's
    own call, with its own max_norm), and the clipped gradients."""
    from tests.helpers.reference import assign

    groups = config.get("groups", [])
    members: dict[str, list[str]] = {g["name"]: [] for g in groups} | {"default": []}
    for name in grads:
        members[assign(name, groups)].append(name)
    limits = {g["name"]: g["max_norm"] for g in groups}
    p = float(config["norm_type"])
    total = torch.nn.utils.get_total_norm(list(grads.values()), p).item()
    group_norms, clipped = {}, {}
    for gname, names in members.items():
        params = [torch.nn.Parameter(torch.zeros_like(grads[n])) for n in names]
        for prm, n in zip(params, names):
            prm.grad = grads[n].clone()
        group_norms[gname] = torch.nn.utils.clip_grad_norm_(params, limits.get(gname, config["max_norm"]), p).item()
        clipped.update({n: prm.grad for n, prm in zip(names, params)})
    return total, group_norms, clipped


def same(a: Any, b: Any) -> bool:
    """Bitwise equality of nested state (dicts, lists, tensors, numbers)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def check_step(step: int, recs: list[tuple[tuple[int, int, int], dict[str, Any]]], attached: dict[str, Any] | None,
               ranks_per_group: int) -> dict[str, float]:
    """One committed step on every replica (and rank) that committed it; returns the worst relative errors."""
    worst = {"norm_vs_f64": 0.0, "norm_vs_torch": 0.0}
    first = recs[0][1]
    assert len({who[0] for who, _ in recs}) >= 2, f"step {step}: only {[w for w, _ in recs]} committed it"
    # torchft averaged the participants' own gradients (FSDP: over the group's ranks too), every replica holds the same bits
    participants = [rec for _, rec in recs if rec["participating"]]
    assert len(participants) == first["num_participants"] * ranks_per_group, (step, len(participants), first["num_participants"])
    mean = {n: sum(rec["local64"][n] for rec in participants) / len(participants) for n in first["avg"]}
    for n, expected in mean.items():
        assert_grad_close(first["avg"][n], expected, 1e-5)
    for who, rec in recs:
        assert same(rec["avg"], first["avg"]), (step, who)
    for k, config in enumerate(PROBES):
        ref = reference_clip(first["avg"], config)
        t_total, t_groups, t_clipped = torch_clip(first["avg"], config)
        probe = first["probes"][k]
        for who, rec in recs:  # bitwise identical on every replica: norms, coefficients, clipped gradients
            assert same(rec["probes"][k], probe), (step, k, who)
        errors = [rel_err(probe["total"].item(), ref["total"])]
        errors += [rel_err(probe["groups"][g].item(), ref["groups"][g]) for g in ref["groups"]]
        assert max(errors) <= RTOL, (step, k, errors)
        versus_torch = [rel_err(probe["total"].item(), t_total)]
        if "groups" in config:
            versus_torch += [rel_err(probe["groups"][g].item(), t_groups[g]) for g in t_groups]
        assert max(versus_torch) <= RTOL, (step, k, versus_torch)
        worst["norm_vs_f64"] = max(worst["norm_vs_f64"], *errors)
        worst["norm_vs_torch"] = max(worst["norm_vs_torch"], *versus_torch)
        for n in ref["clipped"]:
            assert_grad_close(probe["clipped"][n], ref["clipped"][n], RTOL)
            assert_grad_close(probe["clipped"][n], t_clipped[n].double(), RTOL)
    # the attached clipper, inside torchft's step
    main = first["attached"]
    for who, rec in recs:
        assert same(rec["attached"], main), (step, who, [k for k in main if not same(rec["attached"][k], main[k])])
    assert main["clipper_steps"] == step + 1, (step, main["clipper_steps"])
    if attached is not None:
        ref = reference_clip(first["avg"], attached)
        assert rel_err(main["total"].item(), ref["total"]) <= RTOL
        assert max(rel_err(main["groups"][g].item(), v) for g, v in ref["groups"].items()) <= RTOL
        for n in ref["clipped"]:
            assert_grad_close(main["clipped"][n], ref["clipped"][n], RTOL)
    else:  # adaptive: the norm is exact and the gradients are scaled by the reported coefficient
        assert rel_err(main["total"].item(), norm64(list(first["avg"].values()), 2.0)) <= RTOL
        for n in first["avg"]:
            assert_grad_close(main["clipped"][n], first["avg"][n].double() * main["coefs"]["default"].item(), RTOL)
    return worst


def check_run(run: dict[str, Any], attached: dict[str, Any] | None, ranks_per_group: int, steps: int,
              collectives: int | None = None) -> dict[str, float]:
    by_step = committed_by_step(run)
    for recs in by_step.values() if collectives is not None else ():  # distclip's collectives per clip, every config (none across torchft's replicas)
        assert all(probe["collectives"] == collectives for _, rec in recs for probe in rec["probes"]), \
            [probe["collectives"] for _, rec in recs for probe in rec["probes"]]
    assert sorted(by_step) == list(range(steps)), sorted(by_step)
    worst = {"norm_vs_f64": 0.0, "norm_vs_torch": 0.0}
    for step, recs in sorted(by_step.items()):
        for key, value in check_step(step, recs, attached, ranks_per_group).items():
            worst[key] = max(worst[key], value)
    for k in range(len(PROBES)):  # every probe config clipped something
        coefs = [c.item() for recs in by_step.values() for _, rec in recs for c in rec["probes"][k]["coefs"].values()]
        assert min(coefs) < 0.999, (k, min(coefs))
    # nothing stepped twice, nothing missed: one wrapped-optimizer step per commit; the same end state everywhere
    finished = {who: state for who, state in run["replicas"].items() if not state.get("left")}
    reference = finished[(0, 0, 0)]
    for who, state in finished.items():
        assert state["inner_steps"] == sum(r["committed"] for r in state["records"]), who
        assert state["commits"] == steps, (who, state["commits"])
        assert same(state["params"], reference["params"]), who
        assert same(state["clipper_state"], reference["clipper_state"]), who
    return worst


def test_torchft_ddp_norms_exact_and_identical_on_every_replica():
    run = launched("ddp")
    worst = check_run(run, ATTACHED, ranks_per_group=1, steps=STEPS["ddp"])
    assert worst["norm_vs_f64"] <= RTOL


def test_fsdp2_inside_torchft_replica_groups():
    run = launched("fsdp")
    check_run(run, ATTACHED, ranks_per_group=2, steps=STEPS["fsdp"], collectives=1)
    for who, state in run["replicas"].items():
        early, attached = state["hook_status"]
        assert early == "all_reduce_hook" and attached == "existing all-reduce hook", (who, state["hook_status"])
    # the FT dimension is copies: the two ranks of a group hold the same full gradient and norm as the other group
    by_step = committed_by_step(run)
    for step, records in by_step.items():
        totals = {who: rec["attached"]["total"] for who, rec in records}
        assert len({t.item() for t in totals.values()}) == 1, (step, totals)


def test_replica_leaves_and_joins_survivors_keep_clipping_exactly():
    run = launched("heal")
    check_run(run, None, ranks_per_group=1, steps=STEPS["heal"])
    by_step = committed_by_step(run)
    survivors_alone = [s for s, recs in by_step.items() if {w[0] for w, _ in recs} == {0, 1}]
    everyone = [s for s, recs in by_step.items() if {w[0] for w, _ in recs} == {0, 1, 2}]
    comeback = run["replicas"][(2, 0, 1)]["records"]
    healed = [r["step"] for r in comeback if r["committed"] and not r["participating"]]
    after = [r["step"] for r in comeback if r["committed"] and r["participating"]]
    assert survivors_alone, "replica 2 never left"
    assert healed and after and min(after) > max(healed) and len(after) >= 2, (healed, after)
    assert healed[0] >= RETURNS_AT, healed
    assert [s for s in everyone if s > healed[0]], everyone
    # the joining replica clipped with the survivors' AutoClip history from its first step (state healed)
    first = next(r for r in comeback if r["committed"])
    survivor = next(r for r in run["replicas"][(0, 0, 0)]["records"] if r["step"] == first["step"])
    assert torch.equal(first["attached"]["coefs"]["default"], survivor["attached"]["coefs"]["default"])


def test_replica_rejoins_with_synchronous_quorum():
    """With ``use_async_quorum=False`` the joining replica heals at ``zero_grad()`` and takes part in its first step."""
    run = launched("heal_sync")
    check_run(run, None, ranks_per_group=1, steps=STEPS["heal_sync"])
    by_step = committed_by_step(run)
    assert [s for s, recs in by_step.items() if {w[0] for w, _ in recs} == {0, 1}], "replica 2 never left"
    comeback = [r for r in run["replicas"][(2, 0, 1)]["records"] if r["committed"]]
    assert comeback and all(r["participating"] for r in comeback) and comeback[0]["step"] >= RETURNS_AT, \
        [(r["step"], r["participating"]) for r in comeback]


# ---------------------------------------------------------------- refusals (no Lighthouse needed)
def test_pure_ddp_refused_and_optimizer_wrapper_needs_the_integration():
    from unittest.mock import Mock

    from torchft.ddp import PureDistributedDataParallel

    manager = Mock(spec=Manager)
    pure = PureDistributedDataParallel(manager, Net())
    try:
        distclip.GradClipper(pure, max_norm=1.0)
        raise AssertionError("PureDistributedDataParallel was accepted")
    except distclip.UnsupportedModelError as err:
        assert "never waits" in str(err) and "torchft.ddp.DistributedDataParallel" in str(err)
    model = Net()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapper = OptimizerWrapper(manager, inner)
    clipper = distclip.GradClipper(model, max_norm=1.0)
    try:
        clipper.attach(wrapper)  # its step() never runs torch's step hooks: the clip would silently never happen
        raise AssertionError("GradClipper.attach accepted torchft's OptimizerWrapper")
    except distclip.UsageError as err:
        assert "distclip.integrations.torchft.attach" in str(err)
    try:
        distclip_torchft.attach(clipper, inner)  # the wrapped optimizer alone: which Manager heals the state?
        raise AssertionError("attach without a manager was accepted")
    except distclip.UsageError as err:
        assert "manager" in str(err)
    handle = distclip_torchft.attach(clipper, wrapper)
    manager.register_state_dict_fn.assert_called_once_with("distclip", clipper.load_state_dict, clipper.state_dict)
    handle.remove()


if __name__ == "__main__":
    main(sys.argv[1])
