"""distclip.accelerate.enable: accelerator.clip_grad_norm_ exact under DDP, FSDP1/FSDP2 (CPU shim) and DeepSpeed.

Every multi-rank check asserts the world is what was asked (``accelerator.num_processes ==
dist.get_world_size() == N`` and the distributed type): Accelerate falls back to one process
silently. Norms are compared with a float64 single-process reference on the same data.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode

import distclip
import distclip.accelerate
from distclip.testing import run_ranks
from tests.helpers.accelerate_shim import (
    cpu_accelerator,
    fsdp_accelerator,
    reset_accelerate,
)
from tests.helpers.checks import assert_grad_close, assert_same_on_all_ranks
from tests.helpers.models import batch, global_batch, loss_fn, make_model
from tests.helpers.reference import norm64, reference_clip, reference_run, rel_err

import accelerate  # noqa: E402,F401  (a dev dependency: missing, the tests fail)
pytestmark = pytest.mark.multiprocess

GROUPS = [
    {"name": "embed", "match": ["embed.*"], "max_norm": 0.05},
    {"name": "attn", "match": ["blocks.*.attn.*"], "max_norm": 0.02},
]
SUBSET = "blocks.*"  # a parameter subset: the blocks only (attn group + part of default)
STEPS, LR = 3, 0.5


def config_for(p: float) -> dict:
    return {"max_norm": 0.1, "norm_type": p, "groups": GROUPS}


def subset_reference(step: int, world: int, config: dict) -> dict:
    """Step ``step``'s gradients of the initial model (float64), restricted to SUBSET, clipped per the config."""
    model = make_model(dtype=torch.float64)
    loss_fn(model, *global_batch(step, world)).backward()
    import fnmatch

    grads = {n: p.grad for n, p in model.named_parameters() if fnmatch.fnmatchcase(n, SUBSET)}
    return reference_clip(grads, config)


def subset_of(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    import fnmatch

    return [p for n, p in model.named_parameters() if fnmatch.fnmatchcase(distclip.canonical_name(n), SUBSET)]


def record(norm: torch.Tensor, accelerator) -> dict:
    report = distclip.accelerate.last_report(accelerator)
    assert type(norm) is torch.Tensor and norm.dtype == torch.float32 and norm.dim() == 0  # plain fp32, no DTensor
    assert_same_on_all_ranks(norm, *report.group_norms.values())
    return {"total": norm.item(), "groups": {k: v.item() for k, v in report.group_norms.items()},
            "coefs": {k: v.item() for k, v in report.coefs.items()}, "source": report.source}


# --------------------------------------------------------------------------- single process
def test_single_process_subset_measure_and_disable():
    """DistributedType.NO: full-model and subset clips exact; max_norm=inf only measures; disable restores."""
    reset_accelerate()
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    try:
        clipping = distclip.accelerate.enable(accelerator, {"groups": GROUPS, "nonfinite": "error"})
        assert str(accelerator.distributed_type) == "DistributedType.NO" and clipping.kind == "ddp"
        model = accelerator.prepare(make_model())
        loss_fn(model, *batch(0, 0)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}

        measured = accelerator.clip_grad_norm_(model.parameters(), math.inf)
        assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())  # groups not clipped either
        assert rel_err(measured.item(), norm64(list(grads.values()), 2.0)) <= 1e-6

        subset = subset_of(model)
        norm = accelerator.clip_grad_norm_(subset, 0.1)
        import fnmatch

        ref = reference_clip({n: g for n, g in grads.items() if fnmatch.fnmatchcase(n, SUBSET)},
                             {"max_norm": 0.1, "groups": GROUPS})
        assert rel_err(norm.item(), ref["total"]) <= 1e-6
        assert set(distclip.accelerate.last_report(accelerator).group_norms) == {"embed", "attn", "default"}
        for n, p in model.named_parameters():
            if n in ref["clipped"]:
                assert_grad_close(p.grad, ref["clipped"][n], 1e-6)
            else:
                assert torch.equal(p.grad, grads[n])  # outside the subset: untouched

        distclip.accelerate.disable(accelerator)
        assert "clip_grad_norm_" not in accelerator.__dict__ and distclip.accelerate.last_report(accelerator) is None
    finally:
        reset_accelerate()


# --------------------------------------------------------------------------- DDP (MULTI_CPU)
def train_ddp(p: float):
    accelerator = cpu_accelerator()
    distclip.accelerate.enable(accelerator, {**config_for(p), "comm_hook": True})  # before prepare: distclip sees the DDP wrapper
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    assert accelerator.num_processes == dist.get_world_size() == 2
    assert str(accelerator.distributed_type) == "DistributedType.MULTI_CPU"
    records, counts = [], []
    for step in range(STEPS):
        accelerator.backward(loss_fn(model, *batch(step, dist.get_rank())))
        with CommDebugMode() as comm:
            norm = accelerator.clip_grad_norm_(model.parameters(), 0.1)
        counts.append(comm.get_total_counts())
        records.append(record(norm, accelerator))
        optimizer.step()
        optimizer.zero_grad()
    # a parameter subset, on fresh gradients of step 0 (initial weights)
    fresh = make_model()
    fresh_model = accelerator.prepare(fresh)
    accelerator.backward(loss_fn(fresh_model, *batch(0, dist.get_rank())))
    subset = record(accelerator.clip_grad_norm_(subset_of(fresh_model), 0.1), accelerator)
    return records, counts, subset


@pytest.mark.parametrize("p", [2.0, math.inf], ids=["p2", "pinf"])
def test_ddp_multi_cpu_exact_per_group(p):
    results = run_ranks(train_ddp, 2, p)
    refs = reference_run(config_for(p), 2, STEPS, LR)
    subset_ref = subset_reference(0, 2, config_for(p))
    for records, counts, subset in results:
        for rec, ref in zip(records, refs):
            assert rel_err(rec["total"], ref["total"]) <= 1e-6, (rec, ref["total"])
            for name, value in ref["groups"].items():
                assert rel_err(rec["groups"][name], value) <= 1e-6, (name, rec, value)
        # the comm hook is registered at the first clip: from the second step on, the norm is computed inside DDP
        assert [r["source"] for r in records] == ["post_backward", "comm_hook", "comm_hook"]
        assert counts[1:] == [1, 1]  # one collective per clip
        assert rel_err(subset["total"], subset_ref["total"]) <= 1e-6
        assert any(c < 1.0 for rec in records for c in rec["coefs"].values())


# --------------------------------------------------------------------------- FSDP through the shim
def plain_accelerate_fsdp(version: int):
    """Accelerate alone (no distclip) on the shim: the world is real, the full norm right, the FSDP1 subset not."""
    accelerator = fsdp_accelerator(version)
    model = make_model()
    model, _ = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    world = dist.get_world_size()
    assert accelerator.num_processes == world == 2
    assert str(accelerator.distributed_type) == "DistributedType.FSDP"
    accelerator.backward(loss_fn(model, *batch(0, dist.get_rank())))
    full = accelerator.clip_grad_norm_(model.parameters(), math.inf)
    subset = accelerator.clip_grad_norm_(subset_of(model), math.inf)
    as_float = lambda t: float(t.full_tensor() if hasattr(t, "full_tensor") else t)  # noqa: E731
    gathered = [None] * world
    dist.all_gather_object(gathered, as_float(subset))
    return type(model).__name__, as_float(full), gathered


@pytest.mark.parametrize("version", [1, 2])
def test_fsdp_shim_runs_accelerate_fsdp_on_two_cpu_ranks(version):
    """The shim itself, with Accelerate's own clip: FSDP on 2 gloo ranks, full-model norm exact.

    The subset norm shows Accelerate's fallback: under FSDP1 a rank-local torch clip of the local
    shards (a different, wrong value on each rank); under FSDP2 the DTensor norm (right).
    """
    ref_full = reference_clip({n: p.grad for n, p in _reference_grads(0, 2).items()}, {"max_norm": 1.0})["total"]
    ref_subset = subset_reference(0, 2, {"max_norm": 1.0})["total"]
    for wrapper, full, subsets in run_ranks(plain_accelerate_fsdp, 2, version):
        assert wrapper == ("FullyShardedDataParallel" if version == 1 else "FSDPTinyNet")
        assert rel_err(full, ref_full) <= 1e-6
        if version == 1:  # the bug distclip fixes: local shard norms, different on each rank, none right
            assert subsets[0] != subsets[1]
            assert all(rel_err(s, ref_subset) > 1e-2 for s in subsets), (subsets, ref_subset)
        else:
            assert all(rel_err(s, ref_subset) <= 1e-6 for s in subsets)


def flat_parameter_subset():
    """FSDP1 with use_orig_params=False: model.parameters() are FlatParameters; a subset of them is named by its originals."""
    accelerator = fsdp_accelerator(1, use_orig_params=False, auto_wrap_policy="transformer_based_wrap",
                                   transformer_cls_names_to_wrap=["TinyBlock"])
    model = accelerator.prepare(make_model())
    assert accelerator.num_processes == dist.get_world_size() == 2
    named = list(model.named_parameters())
    flat_blocks = [p for n, p in named if ".blocks." in f".{n}"]
    wanted = {id(p) for p in flat_blocks}
    return [distclip.canonical_name(n) for n, _ in named], distclip.accelerate._subset_spec(model, named, wanted)


def test_fsdp1_flat_parameter_subset_is_named_by_original_parameters():
    expected = [n for n, _ in make_model().named_parameters() if n.startswith("blocks.")]
    for flat_names, spec in run_ranks(flat_parameter_subset, 2):
        assert all(n.endswith("_flat_param") for n in flat_names) and len(flat_names) == 3  # root + 2 blocks
        assert spec == expected


def _reference_grads(step: int, world: int) -> dict[str, torch.nn.Parameter]:
    model = make_model(dtype=torch.float64)
    loss_fn(model, *global_batch(step, world)).backward()
    return dict(model.named_parameters())


FSDP_VARIANTS = {  # FSDP version, plugin settings; every variant wraps each block in its own FSDP unit
    "fsdp1": (1, {"use_orig_params": True}),
    "fsdp1-flat": (1, {"use_orig_params": False}),  # model.parameters() are FlatParameters
    "fsdp2": (2, {}),
}
WRAP_BLOCKS = {"auto_wrap_policy": "transformer_based_wrap", "transformer_cls_names_to_wrap": ["TinyBlock"]}


def train_fsdp(variant: str, p: float):
    version, settings = FSDP_VARIANTS[variant]
    accelerator = fsdp_accelerator(version, **settings, **WRAP_BLOCKS)
    distclip.accelerate.enable(accelerator, config_for(p))
    model = make_model()
    if version == 1:  # FSDP1: the optimizer is built on the wrapped model's parameters
        model = accelerator.prepare(model)
        optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=LR))
    else:  # FSDP2: Accelerate wants both at once
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    assert accelerator.num_processes == dist.get_world_size() == 2
    assert str(accelerator.distributed_type) == "DistributedType.FSDP"
    rank = dist.get_rank()
    accelerator.backward(loss_fn(model, *batch(0, rank)))
    subset = record(accelerator.clip_grad_norm_(subset_of(model), 0.1), accelerator)  # Accelerate alone: rank-local
    optimizer.zero_grad()  # no step taken: the run below starts from the initial weights
    records = []
    for step in range(STEPS):
        accelerator.backward(loss_fn(model, *batch(step, rank)))
        records.append(record(accelerator.clip_grad_norm_(model.parameters(), 0.1), accelerator))
        optimizer.step()
        optimizer.zero_grad()
    return records, subset


@pytest.mark.parametrize("variant,p", [("fsdp1", 2.0), ("fsdp1", math.inf), ("fsdp1-flat", 2.0),
                                       ("fsdp2", 2.0), ("fsdp2", math.inf)])
def test_fsdp_exact_full_and_subset_with_distclip(variant, p):
    """Full model and a parameter SUBSET (where Accelerate alone is rank-local under FSDP1), per group."""
    results = run_ranks(train_fsdp, 2, variant, p)
    refs = reference_run(config_for(p), 2, STEPS, LR)
    subset_ref = subset_reference(0, 2, config_for(p))
    for records, subset in results:
        assert rel_err(subset["total"], subset_ref["total"]) <= 1e-6, (subset, subset_ref["total"])
        for name, value in subset_ref["groups"].items():
            assert rel_err(subset["groups"][name], value) <= 1e-6 or value == 0.0
        for rec, ref in zip(records, refs):
            assert rel_err(rec["total"], ref["total"]) <= 1e-6, (rec, ref["total"])
            for name, value in ref["groups"].items():
                assert rel_err(rec["groups"][name], value) <= 1e-6, (name, rec, value)


# --------------------------------------------------------------------------- DeepSpeed
DS_CONFIG = {"max_norm": 2.0, "groups": [{"name": "embed", "match": ["embed.*"], "max_norm": 0.5},
                                         {"name": "attn", "match": ["blocks.*.attn.*"], "max_norm": 0.2}]}
DS_SCALE = 10.0  # norms ~4: DeepSpeed's own gradient_clipping=1.0, if still on, would show


def train_deepspeed(stage: int):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    reset_accelerate()
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    plugin = DeepSpeedPlugin(zero_stage=stage, gradient_clipping=1.0)  # distclip must turn this off
    accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    accelerator.state.deepspeed_plugin.deepspeed_config.update(
        {"train_micro_batch_size_per_gpu": 4, "zero_allow_untested_optimizer": True})
    distclip.accelerate.enable(accelerator, DS_CONFIG)
    model = make_model()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    assert accelerator.num_processes == dist.get_world_size() == 2
    assert str(accelerator.distributed_type) == "DistributedType.DEEPSPEED"
    records = []
    for step in range(STEPS):
        accelerator.backward(loss_fn(model, *batch(step, dist.get_rank()), scale=DS_SCALE))  # clips and steps
        records.append(record(accelerator.clip_grad_norm_(model.parameters(), DS_CONFIG["max_norm"]), accelerator))
        optimizer.step()  # a no-op under DeepSpeed (it stepped in backward)
        optimizer.zero_grad()
    return records


def deepspeed_reference() -> list[dict]:
    return reference_run(DS_CONFIG, 2, STEPS, LR,
                         step_loss=lambda model, step: loss_fn(model, *global_batch(step, 2), scale=DS_SCALE))


@pytest.mark.parametrize("stage", [1, 3])
def test_deepspeed_clips_inside_backward_exactly(stage):
    """Per-group clip inside DeepSpeed's step; the trajectory matches float64 (so DeepSpeed's own clip is off)."""
    refs = deepspeed_reference()
    assert refs[0]["total"] > 1.0  # DeepSpeed's gradient_clipping=1.0 would have changed the run
    for records in run_ranks(train_deepspeed, 2, stage, timeout=420):
        for rec, ref in zip(records, refs):
            assert rel_err(rec["total"], ref["total"]) <= 1e-6, (rec, ref["total"])
            for name, value in ref["groups"].items():
                assert rel_err(rec["groups"][name], value) <= 1e-6, (name, rec, value)
