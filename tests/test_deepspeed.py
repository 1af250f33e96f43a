"""DeepSpeed ZeRO 0-3 on 2 and 4 gloo ranks against a float64 single-process reference on the same data.

Process start and ``import deepspeed`` cost seconds, a fresh engine in a running rank tens of
milliseconds: each ``run_ranks`` call therefore checks many configs (fresh engine per config), and
its results are cached and asserted by several focused tests. The ``deepspeed_shm_comm`` op that
DeepSpeed JIT-builds on its first initialisation is built once per session (``deepspeed_ops``).
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode

import distclip
from distclip.testing import run_ranks
from tests.checks import assert_same_on_all_ranks
from tests.models import batch, global_batch, loss_fn, make_model
from tests.reference import assign, norm64, reference_clip, reference_run, rel_err

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[1]
NORM_TYPES = [1.0, 2.0, 3.5, math.inf]
GROUPS = [
    {"name": "embed", "match": ["embed.*"], "max_norm": 0.05},
    {"name": "attn", "match": ["blocks.*.attn.*"], "max_norm": 0.02},
    {"name": "norm", "match": ["blocks.*.norm.*"], "max_norm": 0.01},  # holds the ZeRO-1/2 straddler
    {"name": "empty", "match": ["no_such_layer.*"], "max_norm": 1.0},  # empty on purpose
]
CONFIGS = [{"max_norm": 0.1, "norm_type": p, "groups": GROUPS if grouped else []}
           for p in NORM_TYPES for grouped in (False, True)]
PER_GROUP = {"max_norm": 0.1, "norm_type": 2.0, "groups": GROUPS}
STEPS, LR, MICRO = 2, 0.5, 4
NORM_RTOL = 1e-6  # distclip's norm vs the float64 reference
PARAM_RTOL = 2e-6  # parameters after fp32 steps vs float64, relative to each tensor's largest element


@pytest.fixture(scope="module", autouse=True)
def deepspeed_ops():
    """Build DeepSpeed's shm comm op once (about 1-2 min on a cold cache), so ranks only load it."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # forked ranks inherit it; silences DeepSpeed's probe
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run([sys.executable, "-c", "import distclip.deepspeed as d; d.build_ops()"],
                   check=True, timeout=900, env=env, capture_output=True)


# ---------------------------------------------------------------- in-rank helpers
def ds_config(stage: int, **extra: Any) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": MICRO, "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, **extra}


def new_engine(stage: int, momentum: float = 0.0, **ds_extra: Any):
    """A fresh engine on the shared model, torch SGD as client optimizer (no DeepSpeed op to build)."""
    import deepspeed

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage, **ds_extra))
    return engine


def close(engine) -> None:
    engine.destroy()  # no gc.collect() here: it costs about 1 s per engine with DeepSpeed's heap


def full_params(engine) -> dict[str, torch.Tensor]:
    named = list(engine.module.named_parameters())
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().double().clone() for n, p in named}
    return {n: p.detach().double().clone() for n, p in named}


def micro_step(engine, step: int, scale: float = 1.0) -> None:
    engine.backward(loss_fn(engine, *batch(step, dist.get_rank()), scale=scale))
    engine.step()


def count_clip_collectives(clipper) -> list[int]:
    """c10d collectives issued inside each clip (norm, reduction, coefficients), one entry per clip."""
    counts: list[int] = []
    run = clipper._run

    def counted(apply: bool):
        with CommDebugMode() as comm:
            report = run(apply)
        counts.append(comm.get_total_counts())
        return report

    clipper._run = counted
    return counts


def record(report) -> dict[str, Any]:
    return {"total": report.total_norm.item(), "groups": {k: v.item() for k, v in report.group_norms.items()},
            "coefs": {k: v.item() for k, v in report.coefs.items()}, "skipped": report.skipped}


def nan_hook_on_rank1(engine):
    """NaN into one element of ``head.bias``'s gradient on rank 1 only: after the reduction only the
    rank whose partition holds that element sees it locally (ZeRO-1/2/3)."""
    if dist.get_rank() != 1:
        return None
    return engine.module.head.bias.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), math.nan))


def spy_local_finite(clipper) -> list[bool]:
    seen: list[bool] = []
    counted_pieces = clipper.adapter.counted_pieces

    def spy():
        pieces, groups = counted_pieces()
        seen.append(all(bool(torch.isfinite(p).all()) for p in pieces))
        return pieces, groups

    clipper.adapter.counted_pieces = spy
    return seen


# ------------------------------------------------------------- rank functions
def fp32_stage_checks(stage: int, extras: bool) -> dict[str, Any]:
    """Every norm config for STEPS steps; with ``extras`` also the NaN, accumulation and control runs."""
    out: dict[str, Any] = {"runs": []}
    for config in CONFIGS:
        engine = new_engine(stage)
        clipper = distclip.deepspeed.attach(engine, config)
        counts = count_clip_collectives(clipper)
        steps = []
        for step in range(STEPS):
            micro_step(engine, step)
            report = clipper.last_report
            assert_same_on_all_ranks(report.total_norm, *report.group_norms.values(), *report.coefs.values())
            steps.append({**record(report), "ggn": engine.get_global_grad_norm().item(), "params": full_params(engine)})
        out["runs"].append({"steps": steps, "collectives": counts, "clips": clipper.steps})
        if stage in (1, 2):
            out["straddlers"] = sorted(n for n, p in engine.module.named_parameters()
                                       if p._hp_mapping is not None and p._hp_mapping.lp_fragment_address.numel < p.numel())
        close(engine)
    if extras:
        out.update(**nonfinite_on_one_rank(stage), **accumulation(stage), **controls(stage))
    return out


def nonfinite_on_one_rank(stage: int) -> dict[str, Any]:
    engine = new_engine(stage, momentum=0.9)
    clipper = distclip.deepspeed.attach(engine, PER_GROUP)
    micro_step(engine, 0)  # a healthy step first: momentum state exists
    before, skipped_before = full_params(engine), engine.skipped_steps
    local_finite = spy_local_finite(clipper)
    handle = nan_hook_on_rank1(engine)
    micro_step(engine, 1)
    if handle is not None:
        handle.remove()
    report, after = clipper.last_report, full_params(engine)
    nan_step = {"skipped": report.skipped, "ggn": engine.get_global_grad_norm().item(),
                "skipped_steps": engine.skipped_steps - skipped_before, "local_finite": local_finite[-1],
                "unchanged": all(torch.equal(before[n], after[n]) for n in before)}
    micro_step(engine, 2)  # training goes on
    moved = any(not torch.equal(after[n], p) for n, p in full_params(engine).items())
    nan_step.update(next_skipped=clipper.last_report.skipped, next_moved=moved,
                    next_finite=math.isfinite(clipper.last_report.total_norm.item()))
    close(engine)
    return {"nan": nan_step}


def accumulation(stage: int) -> dict[str, Any]:
    """Two micro-steps per optimizer step: one clip, at the boundary, on the accumulated gradients."""
    world = dist.get_world_size()
    engine = new_engine(stage, gradient_accumulation_steps=2, train_batch_size=MICRO * 2 * world)
    clipper = distclip.deepspeed.attach(engine, PER_GROUP)
    counts = count_clip_collectives(clipper)
    micro_step(engine, 0)
    clips_after_first = clipper.steps
    micro_step(engine, 1)
    result = {"accum": {**record(clipper.last_report), "clips_after_first": clips_after_first, "clips": clipper.steps,
                        "collectives": counts, "params": full_params(engine)}}
    close(engine)
    return result


def controls(stage: int) -> dict[str, Any]:
    """DeepSpeed's own clipping (uniform L2) on the same data; collectives per engine.step() both ways;
    distclip.global_grad_norm(engine) measured between backward and step."""
    out: dict[str, Any] = {}
    for name, attach in (("deepspeed_own", False), ("distclip", True)):
        engine = new_engine(stage, gradient_clipping=0.1)
        clipper = distclip.deepspeed.attach(engine, {"max_norm": 0.1}) if attach else None
        engine.backward(loss_fn(engine, *batch(0, dist.get_rank())))
        measured = distclip.global_grad_norm(engine).item()
        with CommDebugMode() as comm:
            engine.step()
        ggn = engine.get_global_grad_norm()
        out[name] = {"ggn": None if ggn is None else float(ggn), "params": full_params(engine), "measured": measured,
                     "step_collectives": comm.get_total_counts(),
                     "total": clipper.last_report.total_norm.item() if clipper else None}
        close(engine)
    return {"controls": out}


# ------------------------------------------------------------------- caching
@functools.lru_cache(maxsize=None)
def fp32_results(stage: int, world: int = 2, extras: bool = True) -> list[dict[str, Any]]:
    return run_ranks(fp32_stage_checks, world, stage, extras, timeout=420)


@functools.lru_cache(maxsize=None)
def references() -> list[list[dict[str, Any]]]:
    return [reference_run(config, 2, STEPS, LR) for config in CONFIGS]


def check_runs(results: list[dict[str, Any]], refs: list[list[dict[str, Any]]]) -> None:
    for rank, res in enumerate(results):
        for config, run, ref_steps in zip(CONFIGS, res["runs"], refs):
            for step, (rec, ref) in enumerate(zip(run["steps"], ref_steps)):
                where = (rank, config["norm_type"], bool(config["groups"]), step)
                assert rel_err(rec["total"], ref["total"]) <= NORM_RTOL, (where, rec["total"], ref["total"])
                for name, value in ref["groups"].items():
                    assert rel_err(rec["groups"][name], value) <= NORM_RTOL or value == 0.0, (where, name)
                for name, expected in ref["params"].items():
                    scale = expected.abs().max().item()
                    torch.testing.assert_close(rec["params"][name], expected, rtol=PARAM_RTOL, atol=PARAM_RTOL * scale,
                                               msg=lambda m: f"{where} {name}: {m}")
    # the configs exercise clipping: some group is clipped at some step
    assert any(c < 1.0 for run in results[0]["runs"] for s in run["steps"] for c in s["coefs"].values())


# ----------------------------------------------------------------------- tests
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_norms_and_step_match_float64_reference(stage):
    """p in {1, 2, 3.5, inf}, uniform and 4 groups (one empty): norms (rel 1e-6) and the parameters after
    each step (rel 2e-6 of each tensor's scale) equal a float64 single process on the concatenated batch."""
    check_runs(fp32_results(stage), references())


@pytest.mark.parametrize("stage", [2, 3])
def test_four_ranks_match_float64_reference(stage):
    """4 ranks: new partition boundaries; at ZeRO-3 the 2-element ``tiny`` leaves ranks 2, 3 an empty shard."""
    results = fp32_results(stage, 4, False)
    refs = [reference_run(config, 4, STEPS, LR) for config in CONFIGS]
    check_runs(results, refs)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_exactly_one_collective_per_clip(stage):
    for res in fp32_results(stage):
        for run in res["runs"]:
            assert run["collectives"] == [1] * STEPS and run["clips"] == STEPS


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_get_global_grad_norm_is_the_pre_clip_norm(stage):
    refs = references()
    for res in fp32_results(stage):
        for run, ref_steps in zip(res["runs"], refs):
            for rec, ref in zip(run["steps"], ref_steps):
                assert rec["ggn"] == rec["total"]  # the report's pre-clip norm, at ZeRO-0 too
                assert rel_err(rec["ggn"], ref["total"]) <= NORM_RTOL


@pytest.mark.parametrize("stage", [1, 2])
def test_a_parameter_straddles_the_partition_boundary(stage):
    """The per-group configs really exercise a parameter split between two ranks' partitions."""
    straddlers = [set(res["straddlers"]) for res in fp32_results(stage)]
    both = set.intersection(*straddlers)
    assert both, straddlers
    assert {assign(name, GROUPS) for name in both} <= {"norm"}, both  # an explicit group, not default


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_nan_on_one_rank_skips_the_step_everywhere(stage):
    results = [res["nan"] for res in fp32_results(stage)]
    for r in results:
        assert r["skipped"] and r["skipped_steps"] == 1 and r["unchanged"], r
        assert not math.isfinite(r["ggn"])
        assert not r["next_skipped"] and r["next_moved"] and r["next_finite"], r
    if stage > 0:  # partitioned: some rank saw only finite gradients locally and still skipped
        assert any(r["local_finite"] for r in results) and not all(r["local_finite"] for r in results)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_gradient_accumulation_clips_once_on_the_large_batch(stage):
    world = 2
    model = make_model(dtype=torch.float64)
    for step in (0, 1):
        loss_fn(model, *global_batch(step, world), scale=0.5).backward()
    ref = reference_clip({n: p.grad for n, p in model.named_parameters()}, PER_GROUP)
    for res in fp32_results(stage):
        acc = res["accum"]
        assert acc["clips_after_first"] == 0 and acc["clips"] == 1 and acc["collectives"] == [1]
        assert rel_err(acc["total"], ref["total"]) <= NORM_RTOL
        for name, value in ref["groups"].items():
            assert rel_err(acc["groups"][name], value) <= NORM_RTOL or value == 0.0
        for name, p in model.named_parameters():
            expected = p.detach() - LR * ref["clipped"][name]
            scale = expected.abs().max().item()
            torch.testing.assert_close(acc["params"][name], expected, rtol=PARAM_RTOL, atol=PARAM_RTOL * scale)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_negative_control_deepspeed_clipping_is_not_per_group(stage):
    """DeepSpeed's own clipping is a uniform L2 clip: right for that, far from the per-group reference.
    At ZeRO-0 DeepSpeed reports no norm at all; distclip reports the exact one."""
    uniform = reference_run({"max_norm": 0.1, "norm_type": 2.0}, 2, 1, LR)[0]
    per_group = reference_run(PER_GROUP, 2, 1, LR)[0]
    for res in fp32_results(stage):
        own, ours = res["controls"]["deepspeed_own"], res["controls"]["distclip"]
        if stage == 0:
            assert own["ggn"] is None
        else:
            assert rel_err(own["ggn"], uniform["total"]) <= NORM_RTOL
        assert ours["ggn"] == ours["total"] and rel_err(ours["total"], uniform["total"]) <= NORM_RTOL
        assert rel_err(ours["measured"], ours["total"]) <= 1e-7  # distclip.global_grad_norm(engine) before the step
        assert rel_err(own["measured"], uniform["total"]) <= NORM_RTOL
        for name, expected in uniform["params"].items():
            scale = expected.abs().max().item()
            torch.testing.assert_close(own["params"][name], expected, rtol=PARAM_RTOL, atol=PARAM_RTOL * scale)
            torch.testing.assert_close(ours["params"][name], expected, rtol=PARAM_RTOL, atol=PARAM_RTOL * scale)
        worst = max((own["params"][n] - p).abs().max().item() / p.abs().max().item() for n, p in per_group["params"].items())
        assert worst > 1e-3, worst  # the per-group clip changes the step far beyond the tolerance


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_distclip_step_issues_no_more_collectives_than_deepspeed_clipping(stage):
    """In fp32 distclip's one reduction replaces DeepSpeed's norm all-reduce (whatever p and the groups)."""
    for res in fp32_results(stage):
        own, ours = res["controls"]["deepspeed_own"], res["controls"]["distclip"]
        assert ours["step_collectives"] == own["step_collectives"], (ours["step_collectives"], own["step_collectives"])
