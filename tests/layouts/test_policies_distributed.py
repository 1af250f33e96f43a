"""Adaptive policies on every backend: the same trajectory as the reference packages on one float64 process.

ZClip and AutoClip are checked against the ``zclip`` and ``autoclip`` packages themselves, run on a
float64 single-process copy of the model on the concatenated batches; AdaGC and skip_spikes against
a few lines written here from their definitions. On 2 gloo ranks: DDP (comm hook; with GradScaler;
with gradient accumulation), FSDP1, FSDP2, DeepSpeed ZeRO-1/2/3, with ``attach`` (or DeepSpeed's
step). Each step the norm and the coefficient match the reference; after the run the parameters do;
the policy state is bitwise identical on every rank and was updated once per optimizer step.
"""

from __future__ import annotations

import math
import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from distclip.testing import run_ranks
from tests.helpers.models import batch, global_batch, loss_fn, make_model
from tests.helpers.reference import norm64, rel_err

pytestmark = [pytest.mark.multiprocess, pytest.mark.usefixtures("deepspeed_ops")]

zclip = pytest.importorskip("zclip")
autoclip_torch = pytest.importorskip("autoclip.torch")

WORLD, STEPS, LR, SPIKE_STEP, SPIKE = 2, 8, 0.5, 6, 40.0
WARMUP = 4
CONFIGS = {
    "zclip": {"max_norm": math.inf, "policy": {"kind": "zclip", "alpha": 0.8, "z_thresh": 1.5, "warmup_steps": WARMUP}},
    "autoclip": {"max_norm": math.inf, "policy": {"kind": "autoclip", "quantile": 0.5, "history_length": 1000}},
    "adagc": {"max_norm": 0.3, "per_parameter": True,
              "policy": {"kind": "adagc", "lambda_rel": 1.05, "beta": 0.9, "warmup_steps": 3}},
    "skip_spikes": {"max_norm": math.inf, "skip_spikes": {"window": 8, "sigma_factor": 3.0, "min_observations": 4}},
}


def loss_scale(step: int) -> float:
    return SPIKE if step == SPIKE_STEP else 1.0


# ---------------------------------------------------------------- float64 references (no distclip code)
def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters()}


def reference_run(kind: str) -> dict[str, Any]:
    model = make_model(dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    params = list(model.parameters())
    if kind == "zclip":
        spec = CONFIGS["zclip"]["policy"]
        ref = zclip.ZClip(alpha=spec["alpha"], z_thresh=spec["z_thresh"], max_grad_norm=None, warmup_steps=WARMUP)
    if kind == "autoclip":
        ref = autoclip_torch.QuantileClip(model.parameters(), quantile=0.5, history_length=1000, global_threshold=True)
    gamma: dict[str, float] = {}
    window: list[float] = []
    steps = []
    for step in range(STEPS):
        loss_fn(model, *global_batch(step, WORLD), scale=loss_scale(step)).backward()
        before = norm64([p.grad for p in params], 2.0)
        skipped = False
        if kind == "zclip":
            ref.step(model)
        elif kind == "autoclip":
            ref.step()
        elif kind == "adagc":
            adagc_step(grads_of(model), gamma, step, CONFIGS["adagc"])
        else:  # skip_spikes: OLMo-core's rule over the accepted norms of the window
            spec = CONFIGS["skip_spikes"]["skip_spikes"]
            recent = window[-spec["window"]:]
            if len(recent) >= spec["min_observations"]:
                mean = sum(recent) / len(recent)
                std = (sum((x - mean) ** 2 for x in recent) / (len(recent) - 1)) ** 0.5
                skipped = before - mean > spec["sigma_factor"] * std
            if not skipped:
                window.append(before)
        after = norm64([p.grad for p in params], 2.0)
        steps.append({"total": before, "coef": after / before, "skipped": skipped})
        if not skipped:
            opt.step()
        opt.zero_grad()
    return {"steps": steps, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def adagc_step(grads: dict[str, torch.Tensor], gamma: dict[str, float], step: int, config: dict) -> None:
    """AdaGC per tensor (arXiv 2502.11034): global clipping at max_norm while warming up, tracking each
    tensor's running minimum clipped norm; then min(1, lambda_rel * gamma / ||g||) and an EMA of gamma."""
    spec = config["policy"]
    norms = {n: g.norm().item() for n, g in grads.items()}
    if step < spec["warmup_steps"]:
        total = math.sqrt(sum(v * v for v in norms.values()))
        coef = min(1.0, config["max_norm"] / (total + 1e-6))
        for n, g in grads.items():
            g.mul_(coef)
            gamma[n] = min(gamma.get(n, math.inf), norms[n] * coef)
        return
    for n, g in grads.items():
        h = min(1.0, spec["lambda_rel"] * gamma[n] / (norms[n] + 1e-6))
        g.mul_(h)
        gamma[n] = spec["beta"] * gamma[n] + (1 - spec["beta"]) * norms[n] * h


# ---------------------------------------------------------------- the ranks
def build(layout: str):
    """(module the loss runs on, what distclip is built on, optimizer or engine) for a layout."""
    model = make_model()
    if layout.startswith("ddp"):
        ddp = DDP(model, bucket_cap_mb=0.002)
        return ddp, ddp, torch.optim.SGD(ddp.parameters(), lr=LR)
    if layout == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        fsdp = FSDP(model, device_id=torch.device("cpu"), use_orig_params=False)
        return fsdp, fsdp, torch.optim.SGD(fsdp.parameters(), lr=LR)
    if layout == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, model, torch.optim.SGD(model.parameters(), lr=LR)
    import deepspeed

    stage = int(layout[-1])
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config)
    return engine, engine, engine


def full_params(layout: str, model: Any) -> dict[str, torch.Tensor]:
    if layout == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model):
            return {n.replace("_fsdp_wrapped_module.", ""): p.detach().double().clone() for n, p in model.named_parameters()}
    if layout == "fsdp2":
        return {n: p.full_tensor().detach().double().clone() for n, p in model.named_parameters()}
    if layout.startswith("zero"):
        named = list(model.module.named_parameters())
        if layout == "zero3":
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in named]):
                return {n: p.detach().double().clone() for n, p in named}
        return {n: p.detach().double().clone() for n, p in named}
    return {n.removeprefix("module."): p.detach().double().clone() for n, p in model.named_parameters()}


def train(layout: str, kind: str) -> dict[str, Any]:
    rank = dist.get_rank()
    model, target, optimizer = build(layout)
    config = {**CONFIGS[kind], "nonfinite": "skip"}
    if layout.startswith("zero"):
        clipper = distclip.deepspeed.attach(model, config)
    else:
        clipper = distclip.GradClipper(target, config)
        clipper.attach(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if layout == "ddp_gradscaler" else None
    steps = []
    for step in range(STEPS):
        tokens, targets = batch(step, rank)
        if layout.startswith("zero"):
            model.backward(loss_fn(model, tokens, targets, scale=loss_scale(step)))
            model.step()
        elif layout == "ddp_accum":  # two micro-steps, the first without the gradient all-reduce
            with model.no_sync():
                loss_fn(model, tokens[:2], targets[:2], scale=loss_scale(step) / 2).backward()
            loss_fn(model, tokens[2:], targets[2:], scale=loss_scale(step) / 2).backward()
            optimizer.step()
        elif scaler is not None:
            scaler.scale(loss_fn(model, tokens, targets, scale=loss_scale(step))).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss_fn(model, tokens, targets, scale=loss_scale(step)).backward()
            optimizer.step()
        if not layout.startswith("zero"):
            optimizer.zero_grad(set_to_none=True)
        report = clipper.last_report
        coefs = torch.stack(list(report.coefs.values()))
        steps.append({"total": report.total_norm.item(), "coef_min": coefs.min().item(), "skipped": report.skipped})
    out = {"steps": steps, "params": full_params(layout, model), "state": clipper.state_dict(),
           "clips": clipper.steps}
    if layout.startswith("zero"):
        model.destroy()
    return out


def train_all(layouts: list[str], kinds: list[str]) -> dict[tuple[str, str], Any]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return {(layout, kind): train(layout, kind) for layout in layouts for kind in kinds}


def state_tensors(state: Any, path: str = "") -> dict[str, Any]:
    if isinstance(state, dict):
        return {k2: v2 for k, v in state.items() for k2, v2 in state_tensors(v, f"{path}/{k}").items()}
    return {path: state}


def check(results: list[dict], layouts: list[str], kinds: list[str]) -> None:
    refs = {kind: reference_run(kind) for kind in kinds}
    for layout in layouts:
        for kind in kinds:
            where = f"{layout}, {kind}"
            ours = [r[(layout, kind)] for r in results]
            ref = refs[kind]
            for step, (mine, theirs) in enumerate(zip(ours[0]["steps"], ref["steps"])):
                assert rel_err(mine["total"], theirs["total"]) <= 2e-5, (where, step, mine, theirs)
                assert mine["skipped"] == theirs["skipped"], (where, step, mine, theirs)
                if kind != "adagc":  # adagc scales each tensor by its own coefficient
                    expected = 0.0 if theirs["skipped"] else theirs["coef"]
                    assert abs(mine["coef_min"] - expected) <= 2e-5 * max(1.0, expected), (where, step, mine, theirs)
            # the test exercises clipping / skipping after the warm-up
            assert any(s["coef"] < 0.999 or s["skipped"] for s in ref["steps"][WARMUP:]), (kind, ref["steps"])
            for name, value in ref["params"].items():
                got = ours[0]["params"][name]
                scale = value.abs().max().item()
                torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-4 * scale, msg=f"{where}: {name}")
            for other in ours[1:]:  # policy state bitwise identical on every rank
                a, b = state_tensors(ours[0]["state"]), state_tensors(other["state"])
                assert a.keys() == b.keys()
                for key in a:
                    same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
                    assert same, (where, key)
            assert all(o["clips"] == STEPS for o in ours), (where, [o["clips"] for o in ours])  # one update per step


TORCH_LAYOUTS = ["ddp", "ddp_gradscaler", "ddp_accum", "fsdp1", "fsdp2"]


def test_policies_on_ddp_and_fsdp_follow_the_reference_packages():
    kinds = list(CONFIGS)
    results = run_ranks(train_all, WORLD, TORCH_LAYOUTS, kinds, timeout=500)
    check(results, TORCH_LAYOUTS, kinds)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_policies_inside_deepspeed_follow_the_reference_packages(stage):
    kinds = ["zclip", "autoclip", "adagc"]
    layouts = [f"zero{stage}"]
    results = run_ranks(train_all, WORLD, layouts, kinds, timeout=400)
    check(results, layouts, kinds)


# ------------------------------------------- resume in new processes, bitwise equal to a straight run
RESUME_AT = 5  # after the warm-ups, before the spike: the saved state decides what the spike does
RESUME_CONFIGS = {
    **CONFIGS,
    "agc": {"max_norm": math.inf, "policy": {"kind": "agc", "clip_factor": 0.05}},
    "mixed": {"max_norm": 1.0, "policy": {"kind": "zclip", "warmup_steps": 3, "z_thresh": 1.5},  # per-group policies
              "groups": [{"name": "embed", "match": ["embed.*"], "policy": {"kind": "autoclip", "history_length": 8}}],
              "skip_spikes": {"window": 8, "min_observations": 3, "sigma_factor": 2.0}},
}


def run_steps(kinds: list[str], first: int, last: int, load_dir: str | None, save_dir: str | None,
              hook: bool, adamw: bool, load_clipper: bool = True) -> dict[str, Any]:
    """Steps ``first..last-1`` of DDP + attach per kind; optionally resumed from / saved to a directory."""
    rank, out = dist.get_rank(), {}
    for kind in kinds:
        model, _, optimizer = build("ddp")
        if adamw:  # optimizer state must round-trip too
            optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        clipper = distclip.GradClipper(model, {**RESUME_CONFIGS[kind], "nonfinite": "skip", "comm_hook": hook})
        clipper.attach(optimizer)
        if load_dir is not None:
            saved = torch.load(os.path.join(load_dir, f"{kind}-{rank}.pt"), weights_only=True)
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            if load_clipper:
                clipper.load_state_dict(saved["clipper"])
        steps = []
        for step in range(first, last):
            loss_fn(model, *batch(step, rank), scale=loss_scale(step)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            report = clipper.last_report
            steps.append({"total": report.total_norm.item(), "skipped": report.skipped,
                          "coefs": {k: v.item() for k, v in report.coefs.items()},
                          "thresholds": {k: v.item() for k, v in report.thresholds.items()}})
            if save_dir is not None and step == RESUME_AT - 1:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "clipper": clipper.state_dict()}, os.path.join(save_dir, f"{kind}-{rank}.pt"))
        out[kind] = {"steps": steps, "params": full_params("ddp", model), "state": state_tensors(clipper.state_dict())}
    return out


# not strict: whether the last bits differ depends on the values and the kernels (with the packed float64
# terms of the small tensors, this model's first step happens to match bitwise)
HOOK_RESUME_XFAIL = pytest.mark.xfail(strict=False, reason=(
    "known limitation: the first backward in a new process runs on DDP's initial buckets, the straight run's "
    "on the rebuilt ones; the comm hook slices and sums per bucket, so that step's float64 group norm (and the "
    "policy state fed by it) can differ in the last bit. Decisions and reported fp32 values matched in the "
    "tests; comm_hook: false resumes bitwise"))


@pytest.mark.parametrize("hook, adamw", [
    pytest.param(False, True, id="post-adamw"),
    pytest.param(True, False, id="hook-sgd"),
    pytest.param(True, True, id="hook-adamw", marks=HOOK_RESUME_XFAIL),
])
def test_resume_in_new_processes_continues_bitwise(hook, adamw):
    """Save model, optimizer and clipper at step 5; new ranks load them and run steps 5-7: every norm,
    coefficient, threshold, skip decision, the parameters and the clipper state equal a straight
    8-step run bitwise, for every policy kind and per-group policies with spike skipping. Without the
    clipper's state the same resume takes other decisions."""
    import tempfile

    kinds = list(RESUME_CONFIGS)
    with tempfile.TemporaryDirectory() as tmp:
        straight = run_ranks(run_steps, WORLD, kinds, 0, STEPS, None, tmp, hook, adamw, timeout=300)
        resumed = run_ranks(run_steps, WORLD, kinds, RESUME_AT, STEPS, tmp, None, hook, adamw, timeout=300)  # new processes
        forgot = run_ranks(run_steps, WORLD, kinds, RESUME_AT, STEPS, tmp, None, hook, adamw, False, timeout=300)
    for rank in range(WORLD):
        for kind in kinds:
            a, b = straight[rank][kind], resumed[rank][kind]
            assert b["steps"] == a["steps"][RESUME_AT:], (kind, rank, b["steps"], a["steps"][RESUME_AT:])
            for name, value in a["params"].items():
                assert torch.equal(b["params"][name], value), (kind, rank, name)
            assert a["state"].keys() == b["state"].keys()
            for key, value in a["state"].items():
                same = torch.equal(value, b["state"][key]) if isinstance(value, torch.Tensor) else value == b["state"][key]
                assert same, (kind, rank, key)
    for kind in ("zclip", "autoclip", "adagc", "skip_spikes", "mixed"):  # agc keeps no state: nothing to forget
        assert forgot[0][kind]["steps"] != straight[0][kind]["steps"][RESUME_AT:], kind
    mixed = straight[0]["mixed"]["steps"]
    assert any(s["skipped"] for s in mixed[RESUME_AT:])  # the spike step was skipped ...
    assert any(s["coefs"]["default"] < 1 for s in mixed)  # ... and ZClip's adaptive threshold clipped
    assert any(math.isfinite(s["thresholds"]["default"]) and s["thresholds"]["default"] < 1.0 for s in mixed[RESUME_AT:])
