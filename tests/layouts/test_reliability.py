"""Reliability (issue 10): non-finite values, set-up mismatches, faults on one rank, dead ranks, resume.

Each multi-process launch costs 1-3 s, so one launch checks many cases (a fresh model per case)
and its results are cached and asserted by several focused tests. Every launch is bounded:
``run_ranks`` timeouts and a short ``collective_timeout`` turn a hang into a failure.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from distclip.testing import run_ranks
from tests.helpers import REPO
from tests.helpers.checks import launch_once
from tests.helpers.models import batch, loss_fn, make_model

ROOT = REPO
multiprocess = pytest.mark.multiprocess


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (a DTensor's local tensor), detached."""
    return (t.to_local() if hasattr(t, "to_local") else t).detach()


def tensors_of(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a nested state (dicts in key order, lists in order), as local clones."""
    if isinstance(obj, torch.Tensor):
        return [local(obj).clone()]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in tensors_of(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in tensors_of(x)]
    return []


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Bitwise equality of two tensor lists (a NaN equals a NaN with the same bits)."""
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(as_bytes(x), as_bytes(y)) for x, y in zip(a, b))


def gathered_equal(tensors: list[torch.Tensor]) -> bool:
    """Whether every rank holds bitwise the same tensors (one all_gather of their bytes)."""
    flat = torch.cat([as_bytes(t) for t in tensors]) if tensors else torch.zeros(0, dtype=torch.uint8)
    out = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    return all(torch.equal(o, out[0]) for o in out)


# =============================================================== single process
def test_inf_gradient_is_nonfinite_single_process():
    """p = inf and a +inf gradient: non-finite; skip drops the step, error raises (torch's words)."""
    for mode in ("skip", "error"):
        layer = nn.Linear(3, 2)
        layer(torch.ones(1, 3)).sum().backward()
        layer.weight.grad[0, 0] = math.inf
        clipper = distclip.GradClipper(layer, {"norm_type": "inf", "nonfinite": mode})
        if mode == "error":
            with pytest.raises(distclip.NonFiniteGradientError, match="The total norm of order inf"):
                clipper.clip()
            continue
        report = clipper.clip()
        assert report.skipped and not bool(report.finite) and report.skip_reason == "nonfinite"
        assert layer.weight.grad is None


CHANGES = ["freeze embed", "none", "unfreeze embed", "replace head.weight", "none", "freeze blocks.0"]
DDP_CHANGES = [c for c in CHANGES if not c.startswith("replace")]  # DDP reduces only the tensors it was built with


def train_with_changes(model: nn.Module, target: Any, step_loss: Callable[[int], torch.Tensor],
                       changes: list[str]) -> list[tuple]:
    """Steps that freeze, unfreeze and replace parameters; per step distclip's clip vs torch's on the trainable ones."""
    out = []
    for step, change in enumerate(changes):
        if change == "freeze embed":
            model.embed.weight.requires_grad_(False)
        elif change == "unfreeze embed":
            model.embed.weight.requires_grad_(True)
        elif change == "replace head.weight":
            model.head.weight = nn.Parameter(model.head.weight.detach() * 1.5)
        elif change == "freeze blocks.0":
            model.blocks[0].requires_grad_(False)
        model.zero_grad(set_to_none=True)
        step_loss(step).backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        copies = [torch.nn.Parameter(p.detach().clone()) for p in trainable]
        for c, p in zip(copies, trainable):
            c.grad = p.grad.clone()
        expected = torch.nn.utils.clip_grad_norm_(copies, 0.05)
        norm = distclip.clip_grad_norm_(target, 0.05)
        grads_match = all(torch.allclose(p.grad, c.grad, rtol=1e-5, atol=1e-9) for p, c in zip(trainable, copies))
        frozen_untouched = all(p.grad is None for p in model.parameters() if not p.requires_grad)
        out.append((change, norm.item(), expected.item(), grads_match, frozen_untouched))
    return out


def check_changes(records: list[tuple]) -> None:
    for change, ours, theirs, grads_match, frozen_untouched in records:
        assert ours == pytest.approx(theirs, rel=1e-6), (change, ours, theirs)
        assert grads_match and frozen_untouched, change
    assert any(ours > 0.05 for _, ours, *_ in records)  # the clip really scales


def test_functional_api_follows_freeze_unfreeze_and_replaced_parameters():
    model = make_model()
    check_changes(train_with_changes(model, model, lambda step: loss_fn(model, *batch(step, 0)), CHANGES))


ZCLIP = {"policy": {"kind": "zclip", "warmup_steps": 2}}
BAD_STATES = {  # case: (the junk, made from a good state; words the error must contain)
    "not a mapping": (lambda good: [1, 2], "mapping"),
    "version 99": (lambda good: {**good, "version": 99}, "version 99"),
    "foreign policy state": (lambda good: {**good, "policy": {**good["policy"], "kind": "autoclip"}}, "policy"),
    "wrong groups": (lambda good: {**good, "groups": ["embed", "default"]}, "groups"),
    "unknown key": (lambda good: {**good, "optimizer": {}}, "unknown keys"),
    "negative steps": (lambda good: {**good, "steps": -3}, "steps"),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_loading_junk_state_is_a_state_dict_error(case):
    junk, words = BAD_STATES[case]
    clipper = distclip.GradClipper(make_model(), ZCLIP)
    before = clipper.state_dict()
    with pytest.raises(distclip.StateDictError, match=words):
        clipper.load_state_dict(junk(distclip.GradClipper(make_model(), ZCLIP).state_dict()))
    assert same(tensors_of(clipper.state_dict()), tensors_of(before))  # nothing half-loaded


def test_state_of_another_policy_kind_is_refused():
    autoclip = distclip.GradClipper(make_model(), {"policy": {"kind": "autoclip"}})
    with pytest.raises(distclip.StateDictError, match="autoclip"):
        distclip.GradClipper(make_model(), {"policy": {"kind": "zclip"}}).load_state_dict(autoclip.state_dict())


def test_bad_arguments_are_usage_errors():
    clipper = distclip.GradClipper(make_model())
    with pytest.raises(distclip.UsageError, match="torch.optim.Optimizer"):
        clipper.attach("x")
    with torch.device("meta"):
        meta = nn.Linear(4, 4)
    with pytest.raises(distclip.UsageError, match="meta device"):
        distclip.GradClipper(meta)


def test_params_as_one_name_is_that_parameter():
    """``params="0.weight"`` is one name, not the characters '0', '.', 'w', ..."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model(torch.ones(2, 4)).sum().backward()
    expected = model[0].weight.grad.norm().item()
    others = [p.grad.clone() for n, p in model.named_parameters() if n != "0.weight"]
    report = distclip.GradClipper(model, {"max_norm": 1e-3}, params="0.weight").clip()
    assert report.total_norm.item() == pytest.approx(expected, rel=1e-6)
    assert all(torch.equal(a, p.grad) for a, (n, p) in zip(others, [(n, p) for n, p in model.named_parameters()
                                                                    if n != "0.weight"]))
    with pytest.raises(distclip.ConfigError, match="no_such"):
        distclip.GradClipper(model, params="no_such.weight")


# ===================================================== numpy-free (fresh venv without numpy)
NO_NUMPY = r'''
import importlib.machinery, importlib.util, sys

class NoNumpy:
    """The path finder with numpy hidden: find_spec("numpy") is None, as in a venv without it."""
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "numpy" or name.startswith("numpy."):
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)
    @classmethod
    def invalidate_caches(cls):
        importlib.machinery.PathFinder.invalidate_caches()

sys.meta_path[:] = [NoNumpy if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
assert importlib.util.find_spec("numpy") is None
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
import distclip
from distclip.testing import run_ranks
from tests.helpers.models import batch, loss_fn, make_model
from tests.helpers import REPO

def rank():
    ddp = DDP(make_model())
    clipper = distclip.GradClipper(ddp, {"max_norm": 0.05, "groups": [{"name": "embed", "match": ["embed.*"]}],
                                         "comm_hook": True})
    loss_fn(ddp, *batch(0, dist.get_rank())).backward()
    report = clipper.clip()
    return report.total_norm.item(), report.source, "numpy" in sys.modules

try:
    import numpy
    raise SystemExit("numpy importable")
except ModuleNotFoundError:
    pass
print("RESULT", run_ranks(rank, 2, timeout=90, collective_timeout=30))
'''


@multiprocess
def test_gradclipper_builds_and_clips_without_numpy():
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", NO_NUMPY], cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    results = ast.literal_eval(line[len("RESULT "):])
    assert results[0] == results[1] and results[0][0] > 0 and results[0][1] == "comm_hook"
    assert results[0][2] is False  # numpy was never imported


# ======================================================== DDP suite (one launch)
INF_CONFIGS = {
    "all_inf_slots": {"norm_type": "inf"},
    "mixed_slots": {"norm_type": "inf", "groups": [{"name": "embed", "match": ["embed.*"], "norm_type": 2.0}]},
}
POLICY_CONFIG = {
    "max_norm": 1.0,
    "policy": {"kind": "zclip", "warmup_steps": 2},
    "groups": [{"name": "embed", "match": ["embed.*"], "policy": {"kind": "autoclip", "history_length": 16}}],
    "skip_spikes": {"window": 8, "min_observations": 3, "sigma_factor": 3.0},
    "nonfinite": "skip",
}


def inf_gradients_on_both_ranks() -> dict[str, Any]:
    """+inf written (in place) into gradients that both ranks count: the MAX reduction must keep +inf."""
    out = {}
    for name, config in INF_CONFIGS.items():
        for mode in ("skip", "error"):
            model = make_model()
            ddp = DDP(model, bucket_cap_mb=0.002)
            clipper = distclip.GradClipper(ddp, {**config, "nonfinite": mode})
            loss_fn(ddp, *batch(0, dist.get_rank())).backward()
            for p in model.parameters():
                p.grad.fill_(math.inf)  # every element: each rank's counted slice holds +inf
            try:
                report = clipper.clip()
                out[name, mode] = {"finite": bool(report.finite), "skipped": report.skipped,
                                   "reason": report.skip_reason, "total": report.total_norm.item()}
            except distclip.NonFiniteGradientError as err:
                out[name, mode] = {"raised": str(err)}
    return out


def policy_through_bad_steps() -> list[dict[str, Any]]:
    """ZClip (default group) and AutoClip (embed) through healthy, NaN (rank 1 only) and spike steps."""
    rank = dist.get_rank()
    model = make_model()
    ddp = DDP(model, bucket_cap_mb=0.002)
    clipper = distclip.GradClipper(ddp, POLICY_CONFIG)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    clipper.attach(opt)
    learned: list[tuple[bool, bool]] = []  # (accepted, all finite) of every update() call
    for policy in [*clipper.policy.policies, clipper.spikes]:
        original = policy.update

        def spy(group_norms, total_norm, coefs, accepted, _original=original):
            learned.append((bool(accepted), bool(torch.isfinite(group_norms).all() & torch.isfinite(total_norm))))
            return _original(group_norms, total_norm, coefs, accepted)

        policy.update = spy
    records = []
    for step, kind in enumerate(["ok", "ok", "ok", "ok", "nan", "spike", "ok"]):
        scale = {"ok": 1.0, "nan": math.nan if rank == 1 else 1.0, "spike": 1e4}[kind]
        before = tensors_of(clipper.state_dict())
        loss_fn(ddp, *batch(step, rank), scale=scale).backward()
        opt.step()
        opt.zero_grad()
        after = tensors_of(clipper.state_dict())
        report = clipper.last_report
        records.append({"kind": kind, "skipped": report.skipped, "reason": report.skip_reason,
                        "unchanged": same(before, after), "state": after,
                        "same_on_all_ranks": gathered_equal(after)})
    records.append({"learned": learned})
    return records


def functional_api_on_ddp() -> list[tuple]:
    model = make_model()
    ddp = DDP(model, find_unused_parameters=True)  # frozen parameters then simply have no gradient
    rank = dist.get_rank()
    return train_with_changes(model, ddp, lambda step: loss_fn(ddp, *batch(step, rank)), DDP_CHANGES)


def ddp_suite() -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"inf": inf_gradients_on_both_ranks(), "policies": policy_through_bad_steps(),
                "functional": functional_api_on_ddp()}


@launch_once
def ddp_results() -> list[dict[str, Any]]:
    return run_ranks(ddp_suite, 2, timeout=120, collective_timeout=20)


@multiprocess
@pytest.mark.parametrize("config", list(INF_CONFIGS))
def test_inf_gradient_on_two_ranks_is_nonfinite(config):
    for result in ddp_results():
        skip, error = result["inf"][config, "skip"], result["inf"][config, "error"]
        assert skip == {"finite": False, "skipped": True, "reason": "nonfinite", "total": math.inf}, skip
        assert "The total norm of order inf" in error.get("raised", ""), error


@multiprocess
def test_policy_state_untouched_by_nan_and_spike_steps_and_same_on_all_ranks():
    for result in ddp_results():
        records = result["policies"]
        steps, learned = records[:-1], records[-1]["learned"]
        kinds = [(r["kind"], r["skipped"], r["reason"]) for r in steps]
        assert kinds == [("ok", False, None)] * 4 + [("nan", True, "nonfinite"), ("spike", True, "spike"),
                                                     ("ok", False, None)], kinds
        for r in steps:
            assert r["same_on_all_ranks"], r["kind"]
            assert r["unchanged"] == (r["kind"] != "ok"), r["kind"]  # healthy steps do teach the policies
        assert learned and all(finite for accepted, finite in learned if accepted), learned
        assert sum(not accepted for accepted, _ in learned) == 2 * 3  # nan and spike steps, 3 stateful policies
    for a, b in zip(*(r["policies"][:-1] for r in ddp_results())):
        assert same(a["state"], b["state"])


@multiprocess
def test_functional_api_follows_freeze_and_unfreeze_on_ddp():
    results = ddp_results()
    for result in results:
        check_changes(result["functional"])
    assert [r[1] for r in results[0]["functional"]] == [r[1] for r in results[1]["functional"]]  # bitwise, every rank


# ============================================= set-up mismatches across ranks (one launch)
EMBED = {"name": "embed", "match": ["embed.*"], "max_norm": 0.5}
ATTN = {"name": "attn", "match": ["blocks.*.attn.*"], "max_norm": 0.2}
MISMATCHES = {  # case: (rank 0's config, rank 1's config, the key the message must name)
    "max_norm": ({}, {"max_norm": 0.5}, "max_norm"),
    "norm_type": ({}, {"norm_type": 1.0}, "norm_type"),
    "groups": ({}, {"groups": [EMBED]}, "groups"),
    "per_layer": ({}, {"per_layer": {"depth": 2, "match": ["blocks.*"]}}, "per_layer"),
    "per_parameter": ({}, {"per_parameter": True}, "per_parameter"),
    "nonfinite": ({}, {"nonfinite": "error"}, "nonfinite"),
    "policy": ({}, {"policy": {"kind": "zclip"}}, "policy"),
    "skip_spikes": ({}, {"skip_spikes": {"window": 8, "min_observations": 4}}, "skip_spikes"),
    "comm_hook": ({}, {"comm_hook": False}, "comm_hook"),
    "group_order": ({"groups": [EMBED, ATTN]}, {"groups": [ATTN, EMBED]}, "group_order"),
    "group_threshold": ({"groups": [EMBED]}, {"groups": [{**EMBED, "max_norm": 0.25}]}, "groups"),
    "per_layer_depth": ({"per_layer": {"depth": 2, "match": ["blocks.*"]}},
                        {"per_layer": {"depth": 3, "match": ["blocks.*"]}}, "per_layer"),
}
EXTRA_PARAMETER = ["dtensor_list", "fsdp2_module"]  # an extra parameter on rank 1: where the wrapper allows it


def outcome(build: Callable[[], Any]) -> dict[str, Any]:
    """What building a clipper did on this rank: the error (type, message) or none, warnings, and how long it took."""
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            build()
            result: dict[str, Any] = {"error": None}
        except Exception as err:  # noqa: BLE001  (recorded and asserted on)
            result = {"error": type(err).__name__, "message": str(err)}
    result["seconds"] = time.monotonic() - start
    result["warnings"] = [(w.category.__name__, str(w.message)) for w in caught]
    return result


def extra_parameter(kind: str, mesh: Any) -> Any:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    extra = dist.get_rank() == 1
    if kind == "dtensor_list":
        shapes = [(4, 3), (6,)] + ([(2, 2)] if extra else [])
        return [(f"w{i}", nn.Parameter(DTensor.from_local(torch.ones(s), mesh, [Shard(0)], run_check=False)))
                for i, s in enumerate(shapes)]
    model = make_model()
    if extra:
        model.extra = nn.Parameter(torch.ones(3))
    fully_shard(model, mesh=mesh)
    return model


def mismatch_suite() -> dict[str, dict[str, Any]]:
    from torch.distributed.device_mesh import init_device_mesh

    rank = dist.get_rank()
    out = {}
    for case, (config0, config1, _) in MISMATCHES.items():
        config = config1 if rank == 1 else config0
        out[case] = outcome(lambda: distclip.GradClipper(DDP(make_model()), config))
    out["check_consistency"] = outcome(
        lambda: distclip.GradClipper(DDP(make_model()), {"check_consistency": rank == 0}))
    out["invalid_on_one_rank"] = outcome(  # rank 1 fails before the exchange: rank 0 must not wait in it
        lambda: distclip.GradClipper(DDP(make_model()), {"max_norm": -1.0} if rank == 1 else {}))
    mesh = init_device_mesh("cpu", (2,))
    for kind in EXTRA_PARAMETER:
        out[kind] = outcome(lambda: distclip.GradClipper(extra_parameter(kind, mesh)))
    # after all that, the process group still works: one more clipper and clip on every rank
    ddp = DDP(make_model())
    clipper = distclip.GradClipper(ddp)
    loss_fn(ddp, *batch(0, rank)).backward()
    out["afterwards"] = {"norm": clipper.clip().total_norm.item()}
    return out


@launch_once
def mismatch_results() -> list[dict[str, dict[str, Any]]]:
    start = time.monotonic()
    results = run_ranks(mismatch_suite, 2, timeout=90, collective_timeout=10)
    results[0]["_launch_seconds"] = time.monotonic() - start
    return results


@multiprocess
@pytest.mark.parametrize("case", list(MISMATCHES))
def test_config_mismatch_raises_on_every_rank_naming_the_key(case):
    key = MISMATCHES[case][2]
    for rank, result in enumerate(mismatch_results()):
        r = result[case]
        assert r["error"] == "ConfigMismatchError", (rank, r)
        assert f"{key}:" in r["message"] and "rank 1" in r["message"], (rank, r["message"])
        assert r["seconds"] < 30, r
    messages = [result[case]["message"] for result in mismatch_results()]
    assert messages[0] == messages[1]  # the same error, word for word, on every rank


@multiprocess
@pytest.mark.parametrize("kind", EXTRA_PARAMETER)
def test_an_extra_parameter_on_one_rank_raises_on_every_rank(kind):
    for result in mismatch_results():
        r = result[kind]
        assert r["error"] == "ConfigMismatchError" and "num_params" in r["message"], r
        assert r["seconds"] < 30, r


@multiprocess
def test_a_config_invalid_on_one_rank_raises_on_every_rank():
    """Rank 1's own ConfigError there; rank 0 a ConfigMismatchError quoting it (it used to wait in the exchange)."""
    first, second = (result["invalid_on_one_rank"] for result in mismatch_results())
    assert second["error"] == "ConfigError" and "max_norm" in second["message"], second
    assert first["error"] == "ConfigMismatchError", first
    assert "rank 1: ConfigError" in first["message"] and "max_norm" in first["message"], first["message"]
    assert first["seconds"] < 30 and second["seconds"] < 30


@multiprocess
def test_check_consistency_differing_across_ranks_does_not_hang():
    """Once, rank 1 skipped the set-up collective (check_consistency: false) and rank 0 waited in it forever."""
    results = mismatch_results()
    first, second = results[0]["check_consistency"], results[1]["check_consistency"]
    assert (first["error"], first.get("message")) == (second["error"], second.get("message"))  # same on every rank
    assert first["seconds"] < 30 and second["seconds"] < 30
    assert not any(cat == "FutureWarning" for cat, _ in first["warnings"])
    assert any(cat == "FutureWarning" and "check_consistency" in msg for cat, msg in second["warnings"]), second
    assert all(result["afterwards"]["norm"] > 0 for result in results)  # the process group survived every case
    assert results[0]["_launch_seconds"] < 60


# ===================================== fault matrix: a non-finite gradient on ONE rank
MODES = ["skip", "error", "zero"]
WHERE = ["batch", "shard"]  # rank 1's batch gives a NaN loss (before the reduction) / NaN in rank 1's shard after it
FAULT_CONFIG = {"max_norm": 0.1, "groups": [EMBED, ATTN]}


def build_layout(layout: str, mesh: Any) -> tuple[nn.Module, Any]:
    """(module to run, what distclip gets) for DDP, FSDP1 FULL_SHARD and FSDP2 (1-D)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from tests.helpers.models import TinyBlock

    model = make_model()
    if layout == "ddp":
        return (wrapped := DDP(model, bucket_cap_mb=0.002)), wrapped
    if layout == "fsdp1":
        wrapped = FSDP(model, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({TinyBlock}))
        return wrapped, wrapped
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, model


def poison_own_shard(model: nn.Module) -> None:
    """A NaN in one element this rank itself counts: its shard (FSDP), the end of its 1/world slice (DDP)."""
    with torch.no_grad():
        grads = [local(p.grad) for p in model.parameters() if p.grad is not None and local(p.grad).numel()]
        if isinstance(model, DDP):
            grads[-1].view(-1)[-1] = math.nan  # DDP: rank r counts slice r of the gradients laid end to end
        else:
            grads[0].view(-1)[0] = math.nan  # an in-place write: the reduction hook's result is discarded


def optimizer_state(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return tensors_of(opt.state_dict()["state"])


def fault_case(layout: str, mode: str, where: str, mesh: Any) -> dict[str, Any]:
    rank = dist.get_rank()
    model, target = build_layout(layout, mesh)
    clipper = distclip.GradClipper(target, {**FAULT_CONFIG, "nonfinite": mode})
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    clipper.attach(opt)
    loss_fn(model, *batch(0, rank)).backward()  # a healthy step first: AdamW has state
    opt.step()
    opt.zero_grad()
    params, state = [local(p).clone() for p in model.parameters()], optimizer_state(opt)
    scale = math.nan if (where == "batch" and rank == 1) else 1.0
    loss_fn(model, *batch(1, rank), scale=scale).backward()
    if where == "shard" and rank == 1:
        poison_own_shard(model)
    raised = None
    try:
        opt.step()
    except distclip.NonFiniteGradientError as err:
        raised = str(err)
    report = clipper.last_report
    grads = [local(p.grad) for p in model.parameters() if p.grad is not None]
    after, state_after = [local(p).clone() for p in model.parameters()], optimizer_state(opt)
    opt.zero_grad()
    loss_fn(model, *batch(2, rank)).backward()  # the next step runs normally: nothing hangs, nothing is stuck
    opt.step()
    return {
        "decision": ("raised",) if raised else (report.skipped, report.skip_reason, bool(report.finite)),
        "raised": raised,
        "params_unchanged": same(params, after),
        "state_unchanged": same(state, state_after),
        "grads": "none" if not grads else "zero" if all(not g.any() for g in grads) else "nonzero",
        "params_finite": all(bool(torch.isfinite(p).all()) for p in after),
        "next_clipped_finite": bool(clipper.last_report.finite) and not clipper.last_report.skipped,
    }


def fault_suite() -> dict[tuple[str, str, str], dict[str, Any]]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {(layout, mode, where): fault_case(layout, mode, where, mesh)
                for layout in ("ddp", "fsdp1", "fsdp2") for mode in MODES for where in WHERE}


@launch_once
def fault_results() -> list[dict]:
    return run_ranks(fault_suite, 2, timeout=240, collective_timeout=30)


@multiprocess
@pytest.mark.parametrize("layout", ["ddp", "fsdp1", "fsdp2"])
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_on_one_rank_same_decision_everywhere(layout, mode, where):
    results = [r[layout, mode, where] for r in fault_results()]
    assert results[0]["decision"] == results[1]["decision"], results  # the same decision on every rank
    for r in results:
        assert r["next_clipped_finite"], r
        if mode == "skip":
            assert r["decision"] == (True, "nonfinite", False), r
            assert r["params_unchanged"] and r["state_unchanged"] and r["grads"] == "none", r
        elif mode == "error":
            assert r["decision"] == ("raised",) and "The total norm of order 2.0" in r["raised"], r
            assert r["params_unchanged"] and r["state_unchanged"], r  # the step never ran
        else:  # zero: the step runs on zero gradients (AdamW's momentum and decay still move the weights)
            assert r["decision"] == (False, None, False) and r["grads"] == "zero", r
            assert r["params_finite"] and not r["params_unchanged"], r


# ----------------------------------------------------------- the same matrix on DeepSpeed ZeRO 1-3
STAGES = [1, 2, 3]




def ds_state(engine: Any) -> list[torch.Tensor]:
    """This rank's parameters, fp32 master partitions and optimizer state (momentum), as clones."""
    opt = engine.optimizer
    masters = getattr(opt, "single_partition_of_fp32_groups", None) or opt.fp32_partitioned_groups_flat
    params = [local(getattr(p, "ds_tensor", p)).clone() for p in engine.module.parameters()]  # ZeRO-3: the partition
    inner = opt.optimizer  # the torch optimizer DeepSpeed steps on the fp32 partitions
    state = [inner.state[p] for group in inner.param_groups for p in group["params"] if p in inner.state]
    return params + tensors_of(list(masters)) + tensors_of(state)


def poison_counted_partition(clipper: Any) -> None:
    """At the clip inside engine.step(): a NaN into rank 1's reduced partition (what DeepSpeed then steps on)."""
    counted = clipper.adapter.counted_pieces

    def poisoned():
        pieces, groups = counted()
        with torch.no_grad():
            next(p for p in pieces if p.numel()).view(-1)[0] = math.nan
        clipper.adapter.counted_pieces = counted  # once
        return pieces, groups

    clipper.adapter.counted_pieces = poisoned


def ds_fault_case(stage: int, mode: str, where: str) -> dict[str, Any]:
    import deepspeed

    rank = dist.get_rank()
    model = make_model()
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    clipper = distclip.deepspeed.attach(engine, {**FAULT_CONFIG, "nonfinite": mode})

    def step(i: int, scale: float = 1.0) -> None:
        engine.backward(loss_fn(engine, *batch(i, rank), scale=scale))
        engine.step()

    step(0)  # momentum state exists
    before, skipped_before = ds_state(engine), engine.skipped_steps
    if where == "shard" and rank == 1:
        poison_counted_partition(clipper)
    raised = None
    try:
        step(1, math.nan if (where == "batch" and rank == 1) else 1.0)
    except distclip.NonFiniteGradientError as err:
        raised = str(err)
    after = ds_state(engine)
    report = clipper.last_report
    result = {
        "decision": ("raised",) if raised else (report.skipped, report.skip_reason, bool(report.finite)),
        "raised": raised, "skipped_steps": engine.skipped_steps - skipped_before,
        "unchanged": same(before, after), "finite": all(bool(torch.isfinite(t).all()) for t in after),
        "same_params_on_all_ranks": gathered_equal(after[: len(list(engine.module.parameters()))]) if stage < 3 else None,
    }
    if raised is None:  # the next step runs normally (after an error DeepSpeed's step was left half-done)
        step(2)
        result["next_ok"] = bool(clipper.last_report.finite) and not clipper.last_report.skipped
    engine.destroy()
    return result


def ds_invalid_on_one_rank() -> dict[str, Any]:
    """``distclip.deepspeed.attach`` with a config only rank 1 finds invalid: both ranks raise, none waits."""
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    model = make_model()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config)
    result = outcome(lambda: distclip.deepspeed.attach(engine, {"max_norm": -1.0} if dist.get_rank() == 1 else {}))
    engine.destroy()
    return result


def ds_fault_suite() -> dict[Any, dict[str, Any]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out: dict[Any, dict[str, Any]] = {(stage, mode, where): ds_fault_case(stage, mode, where)
                                          for stage in STAGES for mode in MODES for where in WHERE}
        out["invalid_on_one_rank"] = ds_invalid_on_one_rank()
        return out


@launch_once
def ds_fault_results() -> list[dict]:
    return run_ranks(ds_fault_suite, 2, timeout=300, collective_timeout=60)


@multiprocess
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("mode", MODES)
def test_deepspeed_nonfinite_on_one_rank_same_decision_everywhere(deepspeed_ops, stage, mode, where):
    results = [r[stage, mode, where] for r in ds_fault_results()]
    assert results[0]["decision"] == results[1]["decision"], results
    for r in results:
        if mode == "skip":  # DeepSpeed's own skip: no update, skipped_steps + 1, state bitwise unchanged
            assert r["decision"] == (True, "nonfinite", False) and r["skipped_steps"] == 1, r
            assert r["unchanged"] and r["next_ok"], r
        elif mode == "error":
            assert r["decision"] == ("raised",) and "The total norm of order 2.0" in r["raised"], r
            assert r["unchanged"], r
        else:  # zero: the update runs on zero gradients (momentum still moves the weights), nothing non-finite
            assert r["decision"] == (False, None, False) and r["skipped_steps"] == 0, r
            assert r["finite"] and not r["unchanged"] and r["next_ok"], r
        if r["same_params_on_all_ranks"] is not None:
            assert r["same_params_on_all_ranks"], r


# ================================================ a rank that dies or hangs mid-training
PG_TIMEOUT = 4.0  # seconds: init_process_group(timeout=...) of these ranks


def _lost_rank_main(rank: int, workdir: str, fate: str) -> None:
    """Rank 1 dies (os._exit) or hangs right before the clip; rank 0 clips and records what it gets."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=2,
                            timeout=timedelta(seconds=PG_TIMEOUT))
    ddp = DDP(make_model())
    clipper = distclip.GradClipper(ddp, {"max_norm": 0.1, "comm_hook": False})
    loss_fn(ddp, *batch(0, rank)).backward()
    if rank == 1:
        if fate == "dies":
            os._exit(3)
        time.sleep(10 * PG_TIMEOUT)  # hangs (the parent kills it)
        os._exit(0)
    start = time.monotonic()
    try:
        clipper.clip()
        result: dict[str, Any] = {"error": None}
    except Exception as err:  # noqa: BLE001  (what users see is the point)
        result = {"error": type(err).__name__, "is_runtime_error": isinstance(err, RuntimeError), "message": str(err)}
    result["seconds"] = time.monotonic() - start
    Path(workdir, "rank0.json").write_text(json.dumps(result))
    os._exit(0)  # no teardown: the process group has lost a member


def lost_rank(fate: str) -> dict[str, Any]:
    """run_ranks stops at the first rank that dies, so this launcher waits for rank 0's own ending instead."""
    with tempfile.TemporaryDirectory(prefix="distclip-lost-") as workdir:
        ctx = mp.start_processes(_lost_rank_main, args=(workdir, fate), nprocs=2, join=False, daemon=True,
                                 start_method="fork")
        try:
            ctx.processes[0].join(60)
        finally:
            for process in ctx.processes:
                if process.is_alive():
                    process.kill()
                    process.join(5)
        return json.loads(Path(workdir, "rank0.json").read_text())


@multiprocess
@pytest.mark.parametrize("fate", ["dies", "hangs"])
def test_the_other_ranks_end_with_an_error_when_a_rank_is_lost(fate):
    """What users see (gloo, torch 2.13): a RuntimeError from the clip's one collective, quoted in the README."""
    result = lost_rank(fate)
    assert result["error"] is not None and result["is_runtime_error"], result
    if fate == "dies":  # at once: the peer's socket closed (or reset: which one is a race in the kernel)
        assert re.search("Connection (closed|reset) by peer", result["message"]), result
        assert "Check the logs of the remote worker" in result["message"] and result["seconds"] < PG_TIMEOUT, result
    else:  # after the process group's timeout
        assert f"Timed out waiting {int(PG_TIMEOUT * 1000)}ms" in result["message"], result
        assert PG_TIMEOUT * 0.9 <= result["seconds"] < PG_TIMEOUT + 10, result


# ============================================= resume from state_dict in a NEW process (zclip)
RESUME_CONFIG = {"max_norm": 1.0, "policy": {"kind": "zclip", "warmup_steps": 3, "z_thresh": 1.5},
                 "groups": [{"name": "embed", "match": ["embed.*"], "policy": {"kind": "autoclip", "history_length": 8}}],
                 "skip_spikes": {"window": 8, "min_observations": 3, "sigma_factor": 2.0}}
RESUME_STEPS, RESUME_AT = 9, 5


def resume_run(checkpoint: str, resume: bool) -> list[dict[str, torch.Tensor]]:
    """Steps RESUME_AT.. RESUME_STEPS-1 (resume) or all of them, saving a checkpoint at RESUME_AT (not resume)."""
    rank = dist.get_rank()
    model = make_model()
    ddp = DDP(model, bucket_cap_mb=0.002)
    clipper = distclip.GradClipper(ddp, RESUME_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    clipper.attach(opt)
    path = f"{checkpoint}-{rank}.pt"
    first = 0
    if resume:
        saved = torch.load(path, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        clipper.load_state_dict(saved["clipper"])
        first = RESUME_AT
    records = []
    for step in range(first, RESUME_STEPS):
        if step == RESUME_AT and not resume:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "clipper": clipper.state_dict()}, path)
        loss_fn(ddp, *batch(step, rank), scale=30.0 if step == 7 else 1.0).backward()  # step 7: a spike
        opt.step()
        opt.zero_grad()
        report = clipper.last_report
        records.append({"step": step, "total": report.total_norm, "skipped": report.skipped,
                        **{f"coef/{k}": v for k, v in report.coefs.items()},
                        **{f"threshold/{k}": v for k, v in report.thresholds.items()}})
    return records


@multiprocess
def test_resume_in_a_new_process_gives_bitwise_the_same_coefficients(tmp_path):
    checkpoint = str(tmp_path / "ckpt")
    uninterrupted = run_ranks(resume_run, 2, checkpoint, False, timeout=120)
    resumed = run_ranks(resume_run, 2, checkpoint, True, timeout=120)  # new processes: nothing shared but the files
    for rank in range(2):
        tail = uninterrupted[rank][RESUME_AT:]
        assert [r["step"] for r in tail] == [r["step"] for r in resumed[rank]] == list(range(RESUME_AT, RESUME_STEPS))
        for a, b in zip(tail, resumed[rank]):
            assert a.keys() == b.keys()
            for key in a:
                if isinstance(a[key], torch.Tensor):
                    assert torch.equal(a[key], b[key]), (rank, a["step"], key, a[key], b[key])
                else:
                    assert a[key] == b[key], (rank, a["step"], key)
    steps = uninterrupted[0]
    assert any(r["skipped"] for r in steps)  # the spike step was skipped ...
    assert any(r["coef/default"] < 1 for r in steps)  # ... and ZClip's adaptive threshold clipped
    assert any(torch.isfinite(r["threshold/default"]) and r["threshold/default"] < 1.0 for r in steps[RESUME_AT:])


@multiprocess
def test_deepspeed_attach_with_a_config_invalid_on_one_rank_raises_on_every_rank(deepspeed_ops):
    first, second = (r["invalid_on_one_rank"] for r in ds_fault_results())
    assert second["error"] == "ConfigError" and "max_norm" in second["message"], second
    assert first["error"] == "ConfigMismatchError" and "rank 1: ConfigError" in first["message"], first
    assert first["seconds"] < 30 and second["seconds"] < 30
