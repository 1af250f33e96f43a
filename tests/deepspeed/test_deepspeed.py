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
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode

import distclip
from distclip.testing import run_ranks
from tests.helpers import REPO
from tests.helpers.checks import assert_same_on_all_ranks
from tests.helpers.deepspeed import (
    MICRO,
    close,
    count_clip_collectives,
    ds_config,
    error_of,
    full_params,
    precision,
)
from tests.helpers.models import batch, global_batch, loss_fn, make_model
from tests.helpers.reference import assign, reference_clip, reference_run, rel_err

import deepspeed  # noqa: E402,F401  (a dev dependency: missing, the tests fail)
pytestmark = [pytest.mark.multiprocess, pytest.mark.usefixtures("deepspeed_ops")]

ROOT = REPO
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
STEPS, LR = 2, 0.5
NORM_RTOL = 1e-6  # distclip's norm vs the float64 reference
PARAM_RTOL = 2e-6  # parameters after fp32 steps vs float64, relative to each tensor's largest element




# ---------------------------------------------------------------- in-rank helpers


def new_engine(stage: int, momentum: float = 0.0, **ds_extra: Any):
    """A fresh engine on the shared model, torch SGD as client optimizer (no DeepSpeed op to build)."""

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage, **ds_extra))
    return engine






def micro_step(engine, step: int, scale: float = 1.0) -> None:
    engine.backward(loss_fn(engine, *batch(step, dist.get_rank()), scale=scale))
    engine.step()




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
        if stage > 0:
            out.update(**offload(stage))
    return out


OFFLOAD_CONFIGS = [CONFIGS[3], CONFIGS[6]]  # p = 2 per group, p = inf uniform


def offload(stage: int) -> dict[str, Any]:
    """Optimizer offload to CPU: the reduced gradients sit in the fp32 partitions when the norm runs."""
    runs = []
    for config in OFFLOAD_CONFIGS:
        engine = new_engine(stage, zero_force_ds_cpu_optimizer=False,
                            zero_optimization={"stage": stage, "offload_optimizer": {"device": "cpu"}})
        clipper = distclip.deepspeed.attach(engine, config)
        counts = count_clip_collectives(clipper)
        optimizer = engine.optimizer
        offloaded = bool(getattr(optimizer, "cpu_offload", False) or getattr(optimizer, "offload_optimizer", False))
        steps = []
        for step in range(STEPS):
            micro_step(engine, step)
            steps.append({**record(clipper.last_report), "params": full_params(engine)})
        before, handle = full_params(engine), nan_hook_on_rank1(engine)  # then a NaN step and a healthy one
        micro_step(engine, STEPS)
        if handle is not None:
            handle.remove()
        nan = {"skipped": clipper.last_report.skipped, "skipped_steps": engine.skipped_steps,
               "unchanged": all(torch.equal(before[n], p) for n, p in full_params(engine).items())}
        micro_step(engine, STEPS + 1)
        nan["next_skipped"] = clipper.last_report.skipped
        runs.append({"steps": steps, "collectives": counts, "offloaded": offloaded, "nan": nan})
        close(engine)
    return {"offload": runs}


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


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_optimizer_offload_matches_float64_reference(stage):
    """Offload to CPU (torch SGD, no DeepSpeed op): norms and steps as without offload; a NaN step is skipped."""
    refs = references()
    for res in fp32_results(stage):
        for config, run in zip(OFFLOAD_CONFIGS, res["offload"]):
            assert run["offloaded"] and run["collectives"][:STEPS] == [1] * STEPS
            assert run["nan"] == {"skipped": True, "skipped_steps": 1, "unchanged": True, "next_skipped": False}
            for step, (rec, ref) in enumerate(zip(run["steps"], refs[CONFIGS.index(config)])):
                assert rel_err(rec["total"], ref["total"]) <= NORM_RTOL, (config, step)
                for name, value in ref["groups"].items():
                    assert rel_err(rec["groups"][name], value) <= NORM_RTOL or value == 0.0, (config, step, name)
                for name, expected in ref["params"].items():
                    scale = expected.abs().max().item()
                    torch.testing.assert_close(rec["params"][name], expected, rtol=PARAM_RTOL, atol=PARAM_RTOL * scale)


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


# ------------------------------------------------------------ bf16 and fp16
MIXED_CONFIGS = [PER_GROUP, {"max_norm": 0.1, "norm_type": math.inf}]
MIXED_STAGES = (1, 2, 3)




def fp32_masters(engine) -> list[torch.Tensor]:
    optimizer = engine.optimizer
    flats = getattr(optimizer, "single_partition_of_fp32_groups", None) or optimizer.fp32_partitioned_groups_flat
    return [t.detach().clone() for t in flats]


def global_update_norm(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    local = sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(after, before))
    total = torch.as_tensor(local, dtype=torch.float64).reshape(1)
    dist.all_reduce(total)
    return total.sqrt().item()


def mixed_precision_checks(prec: str) -> dict[str, Any]:
    from deepspeed.utils import safe_get_full_grad

    out: dict[str, Any] = {}
    for stage in MIXED_STAGES:
        res: dict[str, Any] = {"exact": []}
        # (a) the norm of the gradients DeepSpeed reduced, in their own precision, divided by the loss scale
        for config in MIXED_CONFIGS:
            engine = new_engine(stage, **precision(prec))
            clipper = distclip.deepspeed.attach(engine, config)
            for step in range(STEPS):
                engine.backward(loss_fn(engine, *batch(step, dist.get_rank())))
                scale = float(engine.optimizer.loss_scale)
                grads = {n: safe_get_full_grad(p).double() / scale for n, p in engine.module.named_parameters()}
                expected = reference_clip(grads, config)
                engine.step()
                report = clipper.last_report
                assert_same_on_all_ranks(report.total_norm, *report.group_norms.values())
                res["exact"].append({**record(report), "expected": expected["total"], "expected_groups": expected["groups"]})
            close(engine)
        # (b) a non-finite step (bf16: NaN in one element on rank 1; fp16: an overflow on rank 1), and
        #     the same steps without distclip: DeepSpeed's own skip and loss-scale trajectory
        res["skip"] = {}
        for name, attach in (("distclip", True), ("deepspeed_own", False)):
            engine = new_engine(stage, momentum=0.9, **precision(prec))
            clipper = distclip.deepspeed.attach(engine, PER_GROUP) if attach else None
            scales = [float(engine.optimizer.loss_scale)]
            micro_step(engine, 0)
            scales.append(float(engine.optimizer.loss_scale))
            before, masters = full_params(engine), fp32_masters(engine)
            handle = nan_hook_on_rank1(engine) if prec == "bf16" else None
            micro_step(engine, 1, scale=1e6 if prec == "fp16" and dist.get_rank() == 1 else 1.0)
            if handle is not None:
                handle.remove()
            scales.append(float(engine.optimizer.loss_scale))
            unchanged = all(torch.equal(before[n], p) for n, p in full_params(engine).items())
            unchanged = unchanged and all(torch.equal(a, b) for a, b in zip(masters, fp32_masters(engine)))
            skipped, skipped_steps = (clipper.last_report.skipped if clipper else None), engine.skipped_steps
            micro_step(engine, 2)
            scales.append(float(engine.optimizer.loss_scale))
            res["skip"][name] = {"skipped": skipped, "skipped_steps": skipped_steps, "unchanged": unchanged,
                                 "scales": scales, "final_skipped_steps": engine.skipped_steps,
                                 "next_skipped": clipper.last_report.skipped if clipper else None}
            close(engine)
        if prec == "fp16":
            res["growth"] = loss_scale_growth(stage)
        out[stage] = res
    return out


def loss_scale_growth(stage: int) -> dict[str, Any]:
    """fp16, no clipping (max_norm inf / gradient_clipping 0), the loss scale doubling every 2 steps:
    the size of each SGD update, with distclip and with DeepSpeed's own unscaling."""
    out = {}
    for name, attach in (("distclip", True), ("deepspeed_own", False)):
        engine = new_engine(stage, gradient_clipping=0.0, **precision("fp16", loss_scale_window=2))
        clipper = distclip.deepspeed.attach(engine, {"max_norm": "inf"}) if attach else None
        steps = []
        for step in range(3):
            masters, scale = fp32_masters(engine), float(engine.optimizer.loss_scale)
            engine.backward(loss_fn(engine, *batch(step, dist.get_rank())))
            grads = [safe_grad.double() / scale for safe_grad in _full_grads(engine)]
            grad_norm = torch.cat([g.flatten() for g in grads]).norm().item()
            with CommDebugMode() as comm:
                engine.step()
            steps.append({"scale_before": scale, "scale_after": float(engine.optimizer.loss_scale),
                          "update": global_update_norm(masters, fp32_masters(engine)), "grad_norm": grad_norm,
                          "step_collectives": comm.get_total_counts(),
                          "total": clipper.last_report.total_norm.item() if clipper else None})
        out[name] = steps
        close(engine)
    return out


def _full_grads(engine) -> list[torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    return [safe_get_full_grad(p) for _, p in engine.module.named_parameters()]


@functools.lru_cache(maxsize=None)
def mixed_results(prec: str) -> list[dict[str, Any]]:
    return run_ranks(mixed_precision_checks, 2, prec, timeout=420)


@pytest.mark.parametrize("prec", ["bf16", "fp16"])
@pytest.mark.parametrize("stage", MIXED_STAGES)
def test_mixed_precision_norm_is_exact_on_the_reduced_gradients(prec, stage):
    """The norm DeepSpeed's reduced bf16/fp16 gradients have (float64, loss scale divided out), rel 1e-6."""
    for res in mixed_results(prec):
        for rec in res[stage]["exact"]:
            assert rel_err(rec["total"], rec["expected"]) <= NORM_RTOL, rec
            for name, value in rec["expected_groups"].items():
                assert rel_err(rec["groups"][name], value) <= NORM_RTOL or value == 0.0, (name, rec)


@pytest.mark.parametrize("prec", ["bf16", "fp16"])
@pytest.mark.parametrize("stage", MIXED_STAGES)
def test_mixed_precision_nonfinite_step_is_skipped_as_deepspeed_does(prec, stage):
    """Skipped on every rank with parameters and fp32 masters bitwise unchanged; fp16: the loss scale
    backs off once (256 -> 128) exactly as DeepSpeed's own overflow handling does, and training goes on."""
    for res in mixed_results(prec):
        ours, own = res[stage]["skip"]["distclip"], res[stage]["skip"]["deepspeed_own"]
        assert ours["skipped"] and ours["skipped_steps"] == 1 and ours["unchanged"], ours
        assert not ours["next_skipped"] and ours["final_skipped_steps"] == 1
        if prec == "fp16":
            assert ours["scales"] == own["scales"] == [256.0, 256.0, 128.0, 128.0], (ours["scales"], own["scales"])
            assert own["skipped_steps"] == 1 and own["unchanged"]


@pytest.mark.parametrize("stage", MIXED_STAGES)
def test_fp16_update_uses_the_loss_scale_the_gradients_carry(stage):
    """Negative control: when the dynamic loss scale grows (here at the 3rd step), DeepSpeed 0.19.8 divides
    the gradients by the NEW scale and the update is halved (see DeepSpeed PR #8588); distclip divides by
    the scale the gradients were computed with. Also: fewer collectives per fp16 step than DeepSpeed."""
    for res in mixed_results("fp16"):
        ours, own = res[stage]["growth"]["distclip"], res[stage]["growth"]["deepspeed_own"]
        assert [s["scale_after"] / s["scale_before"] for s in ours] == [1.0, 1.0, 2.0]
        for s in ours:
            assert rel_err(s["total"], s["grad_norm"]) <= NORM_RTOL
            assert rel_err(s["update"], LR * s["grad_norm"]) <= 1e-3, s  # no clipping: the full SGD step
        assert rel_err(own[2]["update"], 0.5 * LR * own[2]["grad_norm"]) <= 1e-3, own[2]  # DeepSpeed: halved
        assert ours[0]["step_collectives"] < own[0]["step_collectives"]


# -------------------------------------------------------------------- config
def attach_capturing(engine, *args: Any, **kwargs: Any) -> tuple[Any, list[str]]:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clipper = distclip.deepspeed.attach(engine, *args, **kwargs)
    return clipper, [str(w.message) for w in caught if "distclip" in str(w.message)]




def config_checks() -> dict[str, Any]:
    section = {"max_norm": 0.3, "norm_type": "inf", "groups": [GROUPS[0]]}
    out: dict[str, Any] = {}

    engine = new_engine(2, distclip=section)  # DeepSpeed accepts the extra top-level key
    clipper, out["section_warnings"] = attach_capturing(engine)
    micro_step(engine, 0)
    out["section"] = (clipper.config.max_norm, clipper.config.norm_type, clipper.group_names, clipper.steps)
    out["gradient_clipping_after"] = (engine.gradient_clipping(), engine.optimizer.clip_grad)
    out["twice"] = error_of(lambda: distclip.deepspeed.attach(engine))
    close(engine)

    engine = new_engine(2, distclip=section)
    clipper, out["argument_warnings"] = attach_capturing(engine, {"max_norm": 0.2}, norm_type=1)
    out["argument"] = (clipper.config.max_norm, clipper.config.norm_type)
    close(engine)

    os.environ["DISTCLIP_CONFIG"] = "{max_norm: 0.7, norm_type: 3}"
    engine = new_engine(1)
    clipper, out["env_warnings"] = attach_capturing(engine)
    out["env"] = (clipper.config.max_norm, clipper.config.norm_type)
    del os.environ["DISTCLIP_CONFIG"]
    close(engine)

    engine = new_engine(3, gradient_clipping=0.25)
    _, out["explicit_clipping_warnings"] = attach_capturing(engine, {"max_norm": 0.5})
    out["explicit_clipping_after"] = (engine.gradient_clipping(), engine.optimizer.clip_grad)
    close(engine)

    engine = new_engine(2, **precision("fp16"))
    clipper, out["fp16_warnings"] = attach_capturing(engine, {"nonfinite": "error"})
    out["fp16_nonfinite"] = clipper.config.nonfinite
    close(engine)

    out["bad_section"] = error_of(lambda: distclip.deepspeed.attach(new_engine(2, distclip={"max_nrom": 1.0})))
    out["not_an_engine"] = error_of(lambda: distclip.deepspeed.attach(make_model()))
    out["zero0_bf16"] = error_of(lambda: distclip.deepspeed.attach(new_engine(0, bf16={"enabled": True})))

    engine = new_engine(1)
    engine.backward(loss_fn(engine, *batch(0, dist.get_rank())))
    out["clip_without_attach"] = error_of(lambda: distclip.clip_grad_norm_(engine, 1.0))
    close(engine)

    out["nonfinite_modes"] = {}
    for stage in (2, 3):
        for mode in ("zero", "ignore", "error"):
            engine = new_engine(stage)
            clipper = distclip.deepspeed.attach(engine, {**PER_GROUP, "nonfinite": mode})
            before = full_params(engine)
            handle = engine.module.head.bias.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), math.nan))
            error = error_of(lambda: micro_step(engine, 0))
            handle.remove()
            after = full_params(engine)
            out["nonfinite_modes"][(stage, mode)] = {
                "error": error, "skipped_steps": engine.skipped_steps,
                "skipped": None if error else clipper.last_report.skipped,
                "unchanged": all(torch.equal(before[n], p) for n, p in after.items()),
                "all_finite": all(bool(torch.isfinite(p).all()) for p in after.values())}
            close(engine)
    return out


@functools.lru_cache(maxsize=None)
def config_results() -> dict[str, Any]:
    return run_ranks(config_checks, 1, timeout=300)[0]


def test_config_from_the_deepspeed_json_section():
    r = config_results()
    assert r["section"] == (0.3, math.inf, ["embed", "default"], 1) and r["section_warnings"] == []
    assert "max_nrom" in r["bad_section"] and "DeepSpeed config 'distclip' section" in r["bad_section"]


def test_config_argument_and_environment():
    r = config_results()
    assert r["argument"] == (0.2, 1.0)
    assert any("section ignored" in w for w in r["argument_warnings"])
    assert r["env"] == (0.7, 3.0)


def test_deepspeed_clipping_is_turned_off_and_an_explicit_setting_is_reported():
    r = config_results()
    assert r["gradient_clipping_after"] == (0.0, 0.0)  # DeepSpeed's default 1.0, silently off
    assert r["explicit_clipping_after"] == (0.0, 0.0)
    assert len(r["explicit_clipping_warnings"]) == 1
    assert "gradient_clipping=0.25" in r["explicit_clipping_warnings"][0] and "max_norm=0.5" in r["explicit_clipping_warnings"][0]


def test_fp16_always_skips_nonfinite_steps():
    r = config_results()
    assert r["fp16_nonfinite"] == "skip" and any("loss-scale overflow" in w for w in r["fp16_warnings"])


def test_clear_errors():
    r = config_results()
    assert r["twice"].startswith("RuntimeError") and "already attached" in r["twice"]
    assert r["not_an_engine"].startswith("TypeError")
    assert r["zero0_bf16"].startswith("UnsupportedDeepSpeedSetup") and "ZeRO stage 0" in r["zero0_bf16"]
    assert r["clip_without_attach"].startswith("RuntimeError") and "distclip.deepspeed.attach" in r["clip_without_attach"]


# ---------------------------------------------------------------------- demo
def test_deepspeed_demo_runs_under_torchrun():
    """The README's DeepSpeed demo: config from the JSON's distclip section, ZeRO-3 override, 6 steps."""
    import re

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "launch/train_char_lstm_deepspeed.py", "--stage", "3", "--steps", "6", "--text-bytes", "200000"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "distclip DeepSpeed demo: 2 ranks (gloo), ZeRO stage 3" in out
    assert "groups: ['embed', 'lstm', 'default']; DeepSpeed gradient_clipping now 0.0" in out
    steps = re.findall(r"step +(\d+) \| loss +[\d.]+ \| norm +([\d.e+-]+) \| get_global_grad_norm +([\d.e+-]+) \| embed", out)
    assert [int(s) for s, _, _ in steps] == [1, 2, 3, 4, 5, 6]
    assert all(norm == ggn and float(norm) > 0 for _, norm, ggn in steps)
    assert re.search(r"clipped on \d+ of 6 steps, skipped 0; held-out bits per char: [\d.]+", out)


@pytest.mark.parametrize("stage", [2, 3])
def test_nonfinite_zero_ignore_error_inside_deepspeed(stage):
    """Not only skip: 'zero' steps on zeroed gradients (SGD: no change), 'ignore' applies the NaN (torch
    semantics), 'error' raises from engine.step(). DeepSpeed never turns them into its own skip."""
    modes = config_results()["nonfinite_modes"]
    zero, ignore, error = (modes[(stage, m)] for m in ("zero", "ignore", "error"))
    assert zero == {"error": None, "skipped_steps": 0, "skipped": False, "unchanged": True, "all_finite": True}
    assert ignore["error"] is None and ignore["skipped_steps"] == 0 and not ignore["all_finite"]
    assert error["error"].startswith("NonFiniteGradientError") and error["unchanged"]


# ------------------------------------------------------------------ observability (issue 13)
def observed(stage: int, path: str, diverge: bool) -> dict[str, Any]:
    """The clip inside DeepSpeed's step writes its metrics (rank 0) and is audited (checksums only: APPLY
    happens later, inside the step, so the audit does not measure it there)."""
    engine = new_engine(stage)
    clipper = distclip.deepspeed.attach(engine, {**PER_GROUP, "log": {"jsonl": path}, "audit": {"every": 1}})
    if diverge and dist.get_rank() == 1:
        original = clipper.policy.coefficients
        clipper.policy.coefficients = lambda norms, total: (original(norms, total)[0], original(norms, total)[1] * 0.5)
    out: dict[str, Any] = {"metrics": [], "error": None}
    try:
        for step in range(STEPS):
            micro_step(engine, step)
            out["metrics"].append(clipper.last_report.to_metrics())
    except distclip.ClipAuditError as err:
        out["error"] = str(err)
    clipper.close()
    close(engine)
    return out


@pytest.mark.parametrize("stage", [2])
def test_metrics_log_and_audit_inside_the_deepspeed_step(stage, tmp_path):
    import json

    results = run_ranks(observed, 2, stage, str(tmp_path / "clip.jsonl"), False, timeout=300)
    assert results[0] == results[1] and results[0]["error"] is None
    lines = [json.loads(line) for line in (tmp_path / "clip.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines[1:]] == list(range(1, STEPS + 1))
    assert [{k: v for k, v in r.items() if k != "step"} for r in lines[1:]] == results[0]["metrics"]
    assert any(v == 1.0 for k, v in results[0]["metrics"][0].items() if k.startswith("clipped/"))
    diverged = run_ranks(observed, 2, stage, str(tmp_path / "other.jsonl"), True, timeout=300)
    assert diverged[0]["error"] == diverged[1]["error"] and "ranks [1] did not clip like the others" in diverged[0]["error"]
