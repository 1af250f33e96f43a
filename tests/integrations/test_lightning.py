"""distclip.lightning.DistclipCallback on 2 gloo ranks against a float64 single-process replay.

Lightning's Trainer runs inside :func:`distclip.testing.run_ranks` (``LightningEnvironment``: the
ranks join the process group that is already there; ``accelerator="cpu", devices=2``), several
fits per rank process, results cached per strategy family and asserted by focused tests:

* DDP: ``DDPStrategy``, as Lightning runs it on CPU.
* FSDP2: ``ModelParallelStrategy`` (``fully_shard`` in ``configure_model``), as Lightning runs it on CPU.
* FSDP1: Lightning's ``FSDPStrategy`` refuses CPU ("requires a GPU accelerator") and wraps with
  ``device_id=None``, which FSDP1 refuses on CPU; :class:`CPUFSDPStrategy` changes only that.
* DeepSpeed: Lightning's ``DeepSpeedStrategy`` refuses non-CUDA accelerators in
  ``setup_environment``; :class:`CPUDeepSpeedStrategy` drops only that check (DeepSpeed itself runs
  on its CPU accelerator with gloo), with ``parallel_devices`` ``cpu:0``, ``cpu:1`` for its device
  index check.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import lightning.pytorch as pl  # noqa: E402  (a dev dependency: missing, the tests fail)
from lightning.fabric.plugins.environments import LightningEnvironment  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from lightning.pytorch.strategies import (  # noqa: E402
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
)

import distclip  # noqa: E402
from distclip.lightning import DistclipCallback  # noqa: E402
from distclip.testing import run_ranks  # noqa: E402
from tests.helpers import REPO  # noqa: E402
from tests.helpers.models import batch, global_batch, loss_fn, make_model  # noqa: E402
from tests.helpers.reference import reference_clip, reference_run, rel_err  # noqa: E402

pytestmark = pytest.mark.multiprocess

ROOT = REPO
WORLD, LR, STEPS = 2, 0.5, 3
GROUPS = [  # names under the LightningModule are net.<TinyNet name>; the reference sees the TinyNet names
    {"name": "embed", "match": ["*embed.*"], "max_norm": 0.05},
    {"name": "attn", "match": ["*blocks.*.attn.*"], "max_norm": 0.02},
]
CONFIG = {"max_norm": 0.1, "norm_type": 2.0, "groups": GROUPS, "comm_hook": True}  # the hooks' path, also on CPU
GROUP_NAMES = ["embed", "attn", "default"]
ZCLIP = {**CONFIG, "policy": {"kind": "zclip", "warmup_steps": 2}}


# ------------------------------------------------------------------ Lightning pieces
class LitNet(pl.LightningModule):
    """tests.helpers.models.TinyNet as ``self.net``; rank r's batch i is ``batch(i, r)``; plain SGD."""

    def __init__(self, batches: int = STEPS, fsdp2: bool = False):
        super().__init__()
        self.net = make_model()
        self.batches = batches
        self.fsdp2 = fsdp2

    def configure_model(self) -> None:
        if self.fsdp2:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for block in self.net.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, data: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return loss_fn(self.net, *data)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.trainer.model.parameters(), lr=LR)  # FSDP1: the flat parameters

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        data = [batch(i, self.global_rank) for i in range(self.batches)]
        return torch.utils.data.DataLoader(data, batch_size=None)


class MemoryLogger(Logger):
    """Every ``log_metrics`` call, on every rank."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    name = "memory"
    version = 0

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))


class GradCapture(pl.Callback):
    """float64 copies of the (replicated, DDP) gradients in on_before_optimizer_step, and the loss scale."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.scales: list[float] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.grads.append({n.removeprefix("net."): p.grad.detach().double().clone()
                           for n, p in pl_module.named_parameters()})
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scales.append(scaler.get_scale() if scaler is not None else 1.0)


class WrappedModel(pl.Callback):
    """The type of the model as the strategy wrapped it (Lightning unwraps it again after fit)."""

    name = ""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.name = type(trainer.strategy.model).__name__


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy wrapping with ``device_id=torch.device("cpu")`` (FSDP1 refuses None on CPU);
    a subclass also passes Lightning's ``type(strategy) is FSDPStrategy`` GPU check."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                                        sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs)


class HookedDDPStrategy(DDPStrategy):
    """DDPStrategy(ddp_comm_hook=...) as on GPUs (Lightning registers the hook only on CUDA devices)."""

    def _register_ddp_hooks(self) -> None:
        self.model.register_comm_hook(None, default_hooks.allreduce_hook)


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy without its CUDA-only check."""

    def setup_environment(self) -> None:
        super(DeepSpeedStrategy, self).setup_environment()


def strategy(kind: str) -> Any:
    env = LightningEnvironment()
    if kind == "ddp":
        return DDPStrategy(cluster_environment=env)
    if kind == "ddp_hooked":
        return HookedDDPStrategy(cluster_environment=env)
    if kind == "fsdp1":
        return CPUFSDPStrategy(cluster_environment=env)
    if kind == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)
    if kind.startswith("zero"):
        return CPUDeepSpeedStrategy(stage=int(kind[-1]), cluster_environment=env, logging_batch_size_per_gpu=4,
                                    parallel_devices=[torch.device("cpu", r) for r in range(WORLD)])
    raise ValueError(kind)


def fit(kind: str, config: dict, steps: int = STEPS, *, accumulate: int = 1, precision: str | None = None,
        plugins: list | None = None, callbacks: list | None = None, epochs: int | None = None,
        ckpt_path: str | None = None, save_to: str | None = None, log_every_n_steps: int = 1,
        **trainer_kwargs: Any) -> dict[str, Any]:
    """One Trainer.fit on this rank; what the test needs to know about it."""
    callback, wrapped = DistclipCallback(config), WrappedModel()
    logger = MemoryLogger()
    batches = steps * accumulate if epochs is None else steps
    if precision is not None:
        trainer_kwargs["precision"] = precision
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy(kind), plugins=plugins,
                         callbacks=[wrapped, *(callbacks or []), callback], logger=logger, log_every_n_steps=log_every_n_steps,
                         accumulate_grad_batches=accumulate, max_steps=-1 if epochs else steps,
                         max_epochs=epochs, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, **trainer_kwargs)
    trainer.fit(LitNet(batches, fsdp2=kind == "fsdp2"), ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    logged = [(step, m) for step, m in logger.records if "grad_norm" in m]
    return {"logged": [m for _, m in logged], "logged_at": [step for step, _ in logged], "clips": callback.clipper.steps,
            "source": callback.last_report.source, "world": dist.get_world_size(),
            "trainer_world": trainer.world_size, "strategy": type(trainer.strategy).__name__,
            "model": wrapped.name, "adapter": callback.clipper.adapter.kind,
            "global_step": trainer.global_step, "state": callback.state_dict(),
            "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "params": {n.removeprefix("net."): p.detach().double().clone()
                       for n, p in trainer.lightning_module.named_parameters()} if kind == "ddp" else None}


# -------------------------------------------------------------------- rank functions
def ddp_runs(workdir: str) -> dict[str, Any]:
    out: dict[str, Any] = {"plain": fit("ddp", CONFIG), "accumulate": fit("ddp", CONFIG, accumulate=2),
                           "hooked": fit("ddp_hooked", CONFIG), "every_2": fit("ddp", CONFIG, steps=5, log_every_n_steps=2)}
    for name, precision, plugins in [
        ("bf16", "bf16-mixed", None),
        # Trainer(precision="16-mixed") on CPU becomes bf16-mixed; the plugin itself runs fp16 + GradScaler on CPU
        ("fp16", None, [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**10))]),
    ]:
        before = GradCapture()
        run = fit("ddp", CONFIG, precision=precision, plugins=plugins, callbacks=[before])
        run["precision"] = precision if plugins is None else "16-mixed plugin"
        out[name] = {**run, "before": before.grads, "scales": before.scales}
    try:
        fit("ddp", CONFIG, gradient_clip_val=1.0)
        out["clip_val_error"] = None
    except distclip.ConfigError as err:
        out["clip_val_error"] = str(err)
    out["resume"] = checkpoint_round_trip(workdir)
    return out


def checkpoint_round_trip(workdir: str) -> dict[str, Any]:
    """zclip for 2 epochs of 3 steps straight, vs 1 epoch + save + resume, vs a resume without the callback state."""
    ckpt, stripped = f"{workdir}/epoch1.ckpt", f"{workdir}/no_distclip_state.ckpt"
    straight = fit("ddp", ZCLIP, epochs=2)
    first = fit("ddp", ZCLIP, epochs=1, save_to=ckpt)
    dist.barrier()
    if dist.get_rank() == 0:
        state = torch.load(ckpt, weights_only=False)
        saved = {k: v for k, v in state["callbacks"].items() if "DistclipCallback" in str(k)}
        state["callbacks"] = {k: v for k, v in state["callbacks"].items() if k not in saved}
        torch.save(state, stripped)
    dist.barrier()
    resumed = fit("ddp", ZCLIP, epochs=2, ckpt_path=ckpt)
    fresh = fit("ddp", ZCLIP, epochs=2, ckpt_path=stripped)
    return {"straight": straight, "first": first, "resumed": resumed, "fresh": fresh,
            "saved_state": saved if dist.get_rank() == 0 else None}


def fsdp_runs() -> dict[str, Any]:
    return {kind: fit(kind, CONFIG) for kind in ("fsdp1", "fsdp2")}


def deepspeed_runs() -> dict[str, Any]:
    return {"zero2": fit("zero2", CONFIG), "zero3": fit("zero3", CONFIG), "zero2_accumulate": fit("zero2", CONFIG, accumulate=2)}


@functools.lru_cache(maxsize=None)
def cached(family: str, workdir: str | None = None) -> list[dict[str, Any]]:
    if family == "ddp":
        return run_ranks(ddp_runs, WORLD, workdir, timeout=300)
    if family == "fsdp":
        return run_ranks(fsdp_runs, WORLD, timeout=300)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # forked ranks inherit it
    return run_ranks(deepspeed_runs, WORLD, timeout=600)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> list[dict[str, Any]]:
    return cached("ddp", str(tmp_path_factory.mktemp("lightning")))


# ------------------------------------------------------------------------ reference
def accumulated_loss(accumulate: int):
    def step_loss(model: torch.nn.Module, step: int) -> torch.Tensor:
        return sum(loss_fn(model, *global_batch(accumulate * step + k, WORLD)) for k in range(accumulate)) / accumulate
    return step_loss


@functools.lru_cache(maxsize=None)
def _replay(config_key: str, steps: int, accumulate: int) -> list[dict[str, Any]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine, 2 threads are several times slower than one
    try:
        return reference_run(json.loads(config_key), WORLD, steps, LR, step_loss=accumulated_loss(accumulate))
    finally:
        torch.set_num_threads(threads)


def replay(config: dict, steps: int = STEPS, accumulate: int = 1) -> list[dict[str, Any]]:
    """The float64 single-process run: clip + SGD on all ranks' batches (averaged over micro-batches)."""
    return _replay(json.dumps(config, sort_keys=True), steps, accumulate)


def assert_norms_match(logged: list[dict[str, float]], refs: list[dict[str, Any]], rtol: float = 1e-6) -> None:
    assert len(logged) == len(refs)
    for step, (metrics, ref) in enumerate(zip(logged, refs)):
        assert rel_err(metrics["grad_norm"], ref["total"]) <= rtol, (step, metrics["grad_norm"], ref["total"])
        for group in GROUP_NAMES:
            got, want = metrics[f"grad_norm/{group}"], ref["groups"][group]
            assert rel_err(got, want) <= rtol, (step, group, got, want)


def assert_same_on_ranks(results: list[dict[str, Any]], key: str) -> None:
    assert results[0][key]["logged"] == results[1][key]["logged"]  # bitwise: floats compared with ==


def assert_same_state(a: Any, b: Any, path: str = "state") -> None:
    """Equality of nested state dicts: integers exactly, float64 to 1e-12 (a resumed DDP run sums its first
    partial norms over other buckets than the uninterrupted one: the float64 sums differ in the last bits)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            assert_same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=path)
        else:
            assert torch.equal(a, b), (path, a, b)
    else:
        assert a == b, (path, a, b)


def assert_two_ranks(run: dict[str, Any], strategy_name: str, model: str, adapter: str) -> None:
    assert (run["world"], run["trainer_world"]) == (WORLD, WORLD)
    assert (run["strategy"], run["model"], run["adapter"]) == (strategy_name, model, adapter)


# ------------------------------------------------------------------------------ DDP
def test_ddp_logged_norms_equal_float64_replay(ddp):
    refs = replay(CONFIG)
    for rank in ddp:
        run = rank["plain"]
        assert_two_ranks(run, "DDPStrategy", "DistributedDataParallel", "ddp")
        assert_norms_match(run["logged"], refs)
        assert run["clips"] == STEPS and run["source"] == "comm_hook"  # measured inside DDP's all-reduce
        for name, want in refs[-1]["params"].items():  # the clip was applied: same parameters after the steps
            torch.testing.assert_close(run["params"][name], want, rtol=2e-6, atol=2e-6 * want.abs().max().item())
    assert_same_on_ranks(ddp, "plain")
    metrics = ddp[0]["plain"]["logged"][0]
    assert any(metrics[f"clip_coef/{g}"] < 1.0 for g in GROUP_NAMES)  # the data exercises clipping
    assert {"skipped", "clip_rate/embed", "clip_threshold/attn", "clipped/default", "nonfinite/embed"} <= set(metrics)
    assert metrics["clip_threshold/embed"] == pytest.approx(0.05)
    # callback_metrics (what ModelCheckpoint / EarlyStopping see) hold the last step's values on both ranks
    for rank in ddp:
        assert rank["plain"]["callback_metrics"]["grad_norm"] == ddp[0]["plain"]["logged"][-1]["grad_norm"]


def test_ddp_with_a_comm_hook_of_its_own_measures_after_backward(ddp):
    refs = replay(CONFIG)
    for rank in ddp:
        run = rank["hooked"]
        assert run["source"] == "post_backward"
        assert_norms_match(run["logged"], refs)


def test_metrics_are_logged_every_log_every_n_steps_clips(ddp):
    refs = replay(CONFIG, steps=5)
    for rank in ddp:
        run = rank["every_2"]
        assert run["clips"] == 5
        assert run["logged_at"] == [1, 3]  # Lightning's logger steps (0-based) of clips 2 and 4
        assert_norms_match(run["logged"], [refs[1], refs[3]])


def test_ddp_gradient_accumulation_clips_once_per_optimizer_step(ddp):
    refs = replay(CONFIG, accumulate=2)
    for rank in ddp:
        run = rank["accumulate"]
        assert (run["clips"], run["global_step"], len(run["logged"])) == (STEPS, STEPS, STEPS)
        assert_norms_match(run["logged"], refs)  # the norm of the accumulated (and all-reduced) gradients
    assert_same_on_ranks(ddp, "accumulate")


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_mixed_precision_clips_the_unscaled_gradients(ddp, name):
    for rank in ddp:
        run = rank[name]
        assert run["clips"] == STEPS
        for step, (metrics, grads) in enumerate(zip(run["logged"], run["before"])):
            ref = reference_clip(grads, CONFIG)  # the gradients as on_before_optimizer_step saw them
            assert rel_err(metrics["grad_norm"], ref["total"]) <= 1e-6, (step, metrics["grad_norm"], ref["total"])
            for group in GROUP_NAMES:
                assert rel_err(metrics[f"grad_norm/{group}"], ref["groups"][group]) <= 1e-6
        # and they are the true gradients: close to the float64 replay at the first step (same parameters),
        # where gradients still carrying the loss scale would be 1024 times larger
        first = replay(CONFIG, steps=1)[0]
        assert rel_err(run["logged"][0]["grad_norm"], first["total"]) < 0.05
    if name == "fp16":
        assert all(scale == 2.0**10 for scale in ddp[0][name]["scales"])  # scaled backward, no overflow skipped
    assert_same_on_ranks(ddp, name)


def test_gradient_clip_val_on_the_trainer_is_an_error(ddp):
    message = ddp[0]["clip_val_error"]
    assert message is not None and message == ddp[1]["clip_val_error"]
    assert "gradient_clip_val=1.0" in message and "DistclipCallback" in message
    assert "Remove gradient_clip_val" in message and "max_norm: 1.0" in message


def test_checkpoint_round_trip_resumes_the_zclip_state(ddp):
    resume = ddp[0]["resume"]
    straight, first, resumed, fresh = (resume[k]["logged"] for k in ("straight", "first", "resumed", "fresh"))
    assert len(straight) == 6 and len(first) == 3 and len(resumed) == 3 and len(fresh) == 3
    assert first == straight[:3]
    saved = resume["saved_state"]
    assert len(saved) == 1 and next(iter(saved.values()))["steps"] == 3
    assert resumed == straight[3:]  # bitwise: thresholds, coefficients, clip rates, norms
    assert resume["resumed"]["clips"] == 6
    # the zclip EMA (mean, var per group) and the clip counts continue exactly where they were
    assert_same_state(resume["resumed"]["state"], resume["straight"]["state"])
    # without the callback's state the policy starts over: its warm-up again, another EMA, 3 clips counted
    assert resume["fresh"]["clips"] == 3
    with pytest.raises(AssertionError):
        assert_same_state(resume["fresh"]["state"]["policy"], resume["straight"]["state"]["policy"])
    assert ddp[1]["resume"]["resumed"]["logged"] == resumed


# ----------------------------------------------------------------------------- FSDP
@pytest.mark.parametrize("kind, strategy_name, model, adapter", [
    ("fsdp1", "CPUFSDPStrategy", "FullyShardedDataParallel", "fsdp1"),
    ("fsdp2", "ModelParallelStrategy", "LitNet", "fsdp2"),
])
def test_fsdp_logged_norms_equal_float64_replay(kind, strategy_name, model, adapter):
    results = cached("fsdp")
    refs = replay(CONFIG)
    for rank in results:
        run = rank[kind]
        assert_two_ranks(run, strategy_name, model, adapter)
        assert_norms_match(run["logged"], refs)
    assert_same_on_ranks(results, kind)


# ------------------------------------------------------------------------ DeepSpeed


@pytest.mark.parametrize("kind", ["zero2", "zero3"])
def test_deepspeed_logged_norms_equal_float64_replay(deepspeed_ops, kind):
    results = cached("deepspeed")
    refs = replay(CONFIG)
    for rank in results:
        run = rank[kind]
        assert_two_ranks(run, "CPUDeepSpeedStrategy", "DeepSpeedEngine", "deepspeed")
        assert_norms_match(run["logged"], refs)
    assert_same_on_ranks(results, kind)


def test_deepspeed_gradient_accumulation_clips_once_per_optimizer_step(deepspeed_ops):
    for rank in cached("deepspeed"):
        run = rank["zero2_accumulate"]
        # Lightning calls on_before_optimizer_step (and engine.step) on every micro-batch under DeepSpeed;
        # DeepSpeed steps, and distclip clips and logs, on every second one
        assert (run["clips"], len(run["logged"])) == (STEPS, STEPS)


# ------------------------------------------------------ Lightning's own launcher
def test_launch_script_with_lightnings_own_processes():
    """launch/train_lightning.py as a user runs it: Lightning starts the second process itself."""
    from tests.helpers.launching import (
        accelerate_reference,
        check_records,
        launch_env,
        records,
        run,
    )

    steps = 3
    proc = run([sys.executable, "launch/train_lightning.py", "--accelerator", "cpu", "--devices", "2",
                "--steps", str(steps), "--json"], launch_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    found = records(proc.stdout)
    assert {r["strategy"] for r in found} == {"DDPStrategy"}
    config = load_script_config()
    check_records(found, accelerate_reference(WORLD, steps, config), world=WORLD, norm_key="grad_norm")
    assert any(c < 1.0 for r in found for c in r["coefs"].values())


def load_script_config() -> dict[str, Any]:
    from tests.helpers.launching import load_script

    return load_script("launch/train_lightning.py").DEMO_CONFIG


# --------------------------------------------------------------------------- imports
def test_import_distclip_never_imports_lightning_and_a_missing_lightning_names_the_extra():
    code = (
        "import sys, distclip\n"
        "assert not any(m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning')) for m in sys.modules)\n"
        "sys.modules['lightning'] = None\n"
        "try:\n"
        "    import distclip.lightning\n"
        "except distclip.MissingExtraError as err:\n"
        "    print(err)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'distclip[lightning]'" in proc.stdout


def fake_trainer(optimizers: list, scaler: Any = None, model: Any = None) -> SimpleNamespace:
    return SimpleNamespace(gradient_clip_val=None, optimizers=optimizers, strategy=SimpleNamespace(model=model),
                           precision_plugin=SimpleNamespace(scaler=scaler))


def test_callback_refuses_two_optimizers_and_a_fused_optimizer_under_a_loss_scaler():
    model = make_model()
    sgd = lambda **kw: torch.optim.SGD(model.parameters(), lr=LR, **kw)  # noqa: E731
    with pytest.raises(distclip.UsageError, match="returned 2 optimizers"):
        DistclipCallback(CONFIG).on_fit_start(fake_trainer([sgd(), sgd()]), None)
    with pytest.raises(distclip.UsageError, match="fused=False"):
        DistclipCallback(CONFIG).on_fit_start(fake_trainer([sgd(fused=True)], scaler=object()), None)
    callback = DistclipCallback(CONFIG)  # control: one plain optimizer under a scaler, or fused without one
    for trainer in (fake_trainer([sgd()], scaler=object(), model=model), fake_trainer([sgd(fused=True)], model=model)):
        callback.on_fit_start(trainer, None)
        assert callback.clipper.group_names == GROUP_NAMES


def test_callback_refuses_a_bad_log_every_n_steps():
    with pytest.raises(distclip.ConfigError, match="log_every_n_steps"):
        DistclipCallback(CONFIG, log_every_n_steps=-1)
