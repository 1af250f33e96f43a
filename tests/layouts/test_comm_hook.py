"""``comm_hook``: which path ``auto`` picks, and that both paths give the same, exact norm.

* The decision: ``auto`` measures inside the reduction where gradients are reduced by NCCL on CUDA,
  after backward elsewhere; ``true`` / ``false`` force either path (a pure function, plus its use at
  set-up, with the backend query patched where a GPU would be needed).
* DDP on 2 and 4 gloo ranks, p = 1, 2, inf, 1.5, uniform and per group (a group with its own p),
  with ``comm_hook: true`` (the hook, forced on CPU) and with the default: every norm within 1e-6
  of the float64 reference and bitwise equal across ranks (float64 slots); with the hook on, its
  float64 partials bitwise equal to those of its post-backward fallback on the same gradients, on
  DDP's initial buckets (step 0) and on its rebuilt ones (step 1), channels-last gradients too.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from distclip.adapters.ddp import DDPAdapter
from distclip.core.hook_choice import ReductionVenue, choose_hook
from distclip.testing import run_ranks
from tests.helpers.checks import (
    assert_same_on_all_ranks,
    check_against_reference,
    gathered_equal,
    launch_once,
    record_slots,
)
from tests.helpers.models import batch, loss_fn, make_model
from tests.helpers.reference import reference_run, rel_err

NORM_TYPES = [1.0, 2.0, math.inf, 1.5]
GROUPS = [
    {"name": "embed", "match": ["embed.*"], "max_norm": 0.05},
    {"name": "attn", "match": ["blocks.*.attn.*"], "max_norm": 0.02, "norm_type": 3.0},  # a p of its own: 2 passes
]
HOOKS = {"true": True, "auto": "auto"}
STEPS, LR = 2, 0.5


def config_for(p: float, grouped: bool) -> dict[str, Any]:
    return {"max_norm": 0.1, "norm_type": p, "groups": GROUPS if grouped else []}


# ------------------------------------------------------------------------ the decision
@pytest.mark.parametrize("setting, backend, device, enable", [
    ("auto", "gloo", "cpu", False),
    ("auto", "nccl", "cuda", True),
    ("auto", "cpu:gloo,cuda:nccl", "cuda", True),  # init_process_group() without a backend on a GPU machine
    ("auto", "cpu:gloo,cuda:nccl", "cpu", False),
    ("auto", "gloo", "cuda", False),  # gloo reducing CUDA tensors: not measured to pay
    ("auto", "mpi", "cpu", False),
    (True, "gloo", "cpu", True),
    (False, "nccl", "cuda", False),
])
def test_auto_uses_the_hook_only_with_nccl_on_cuda(setting, backend, device, enable):
    choice = choose_hook(setting, ReductionVenue(backend, device))
    assert choice.enable is enable and choice.auto is (setting == "auto")
    if setting == "auto":
        assert f"on {device}" in choice.reason  # the facts it decided from are recorded
    if setting == "auto" and not enable:
        assert choice.reason.startswith("post-backward (comm_hook: auto") and "comm_hook: true" in choice.reason


def test_auto_without_a_venue_leaves_it_to_the_layout():
    """Layouts with no reduction hook (plain, ZeRO, torchft's DDP) say why themselves."""
    assert choose_hook("auto", None).enable and choose_hook(False, None).enable is False


def default_clipper(venue: ReductionVenue | None) -> dict[str, Any]:
    """A DDP clipper with the default config, DDP's venue reported as ``venue`` (None: the real one, gloo on CPU)."""
    real = DDPAdapter.reduction_venue
    if venue is not None:
        DDPAdapter.reduction_venue = lambda self: venue  # the backend query, patched in this process only
    try:
        ddp = DDP(make_model(), bucket_cap_mb=0.002)
        clipper = distclip.GradClipper(ddp, {"max_norm": 0.1})
    except distclip.ConfigMismatchError as err:
        return {"error": str(err)}
    finally:
        DDPAdapter.reduction_venue = real
    loss_fn(ddp, *batch(0, dist.get_rank())).backward()
    return {"status": clipper.adapter.hook_status, "source": clipper.clip().source,
            "hooked": clipper.adapter.hook is not None}


def venue_cases() -> dict[str, dict[str, Any]]:
    nccl = ReductionVenue("nccl", "cuda")
    return {"gloo": default_clipper(None), "nccl": default_clipper(nccl),
            # rank 1 alone sees NCCL on CUDA: the ranks would take different paths, the set-up check refuses it
            "differ": default_clipper(nccl if dist.get_rank() == 1 else None)}


def test_auto_picks_at_set_up_from_the_backend():
    for r in run_ranks(venue_cases, 2):
        assert r["gloo"]["status"].startswith("post-backward (comm_hook: auto, gradients reduced by gloo on cpu"), r
        assert r["gloo"]["source"] == "post_backward" and not r["gloo"]["hooked"], r
        assert r["nccl"]["status"] == "comm_hook (comm_hook: auto, gradients reduced by nccl on cuda)", r
        assert r["nccl"]["source"] == "comm_hook" and r["nccl"]["hooked"], r
        assert "measured_in_reduction: rank 0 has False, rank 1 has True" in r["differ"]["error"], r


# ------------------------------------------------------------- exactness of both paths
def sweep() -> dict[Any, Any]:
    """Every (p, grouped, comm_hook) on a fresh DDP model: STEPS steps of clip + SGD (tiny buckets, rebuilt after
    step 0); per step the norms, the clipped gradients, the path, and the float64 partials and slots. With the hook
    on, each step is measured twice on the same gradients: by the hook (``measure``), then by its post-backward
    fallback (``clip``: the hook's result is handed out once)."""
    rank = dist.get_rank()
    out: dict[Any, Any] = {}
    for p in NORM_TYPES:
        for grouped in (False, True):
            for name, hook in HOOKS.items():
                model = make_model()
                ddp = DDP(model, bucket_cap_mb=0.002)
                clipper = distclip.GradClipper(ddp, {**config_for(p, grouped), "comm_hook": hook})
                seen: dict[str, torch.Tensor] = {}
                record_slots(clipper, seen)
                opt = torch.optim.SGD(ddp.parameters(), lr=LR)
                records = []
                for step in range(STEPS):
                    loss_fn(ddp, *batch(step, rank)).backward()
                    first = clipper.measure() if hook is True else None
                    in_hook = (first.source, seen["partials"]) if first is not None else None
                    report = clipper.clip()
                    assert_same_on_all_ranks(report.total_norm, *report.group_norms.values())
                    records.append({
                        "total": report.total_norm.item(), "source": report.source, "in_hook": in_hook,
                        "groups": {k: v.item() for k, v in report.group_norms.items()},
                        "grads": {n: q.grad.detach().clone() for n, q in model.named_parameters()},
                        "partials": seen["partials"], "slots_same_on_ranks": gathered_equal(seen["slots"]),
                    })
                    opt.step()
                    opt.zero_grad()
                out[p, grouped, name] = records
    out["channels_last"] = channels_last_partials()
    return out


def channels_last_partials() -> dict[str, Any]:
    """Conv weights in channels-last memory (non-contiguous gradients, which DDP's buckets hold in memory order),
    the hook on: this rank's float64 partials from the hook and from its post-backward fallback, and the norm
    against float64 over the (replicated) full gradients."""
    torch.manual_seed(0)
    convs = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 5, 3))
    convs = convs.to(memory_format=torch.channels_last)
    ddp = DDP(convs, bucket_cap_mb=0.0005)
    clipper = distclip.GradClipper(ddp, {"max_norm": 1.0, "norm_type": 1.5, "comm_hook": True})
    seen: dict[str, torch.Tensor] = {}
    record_slots(clipper, seen)
    torch.manual_seed(dist.get_rank())
    ddp(torch.randn(2, 3, 9, 9).to(memory_format=torch.channels_last)).pow(2).sum().backward()
    in_hook = clipper.measure()
    hook_partials = seen["partials"]
    fallback = clipper.measure()
    grads = [q.grad.detach().double() for q in convs.parameters()]
    return {"sources": (in_hook.source, fallback.source), "same": torch.equal(hook_partials, seen["partials"]),
            "total": fallback.total_norm.item(),
            "expected": torch.cat([g.flatten() for g in grads]).abs().pow(1.5).sum().pow(1 / 1.5).item(),
            "non_contiguous": any(not q.grad.is_contiguous() for q in convs.parameters())}


@launch_once
def two_ranks() -> list[dict]:
    return run_ranks(sweep, 2, timeout=300)


@launch_once
def four_ranks() -> list[dict]:
    return run_ranks(sweep, 4, timeout=400)


@pytest.mark.parametrize("world", [2, 4])
def test_both_paths_match_the_float64_reference_and_the_hook_its_fallback_bitwise(world):
    results = two_ranks() if world == 2 else four_ranks()
    for p in NORM_TYPES:
        for grouped in (False, True):
            refs = reference_run(config_for(p, grouped), world, STEPS, LR)
            for rank, result in enumerate(results):
                where = (world, rank, p, grouped)
                hooked, default = result[p, grouped, "true"], result[p, grouped, "auto"]
                # norms within 1e-6; gradients to fp32 backward's precision (the 2-element parameter's gradient is a
                # sum with cancellation: 2e-5 off float64's after one step on 4 ranks, with either path)
                check_against_reference(hooked, refs, rtol=1e-6, grad_rtol=1e-4)
                check_against_reference(default, refs, rtol=1e-6, grad_rtol=1e-4)
                assert [r["source"] for r in default] == ["post_backward"] * STEPS, where  # auto on gloo
                for step, r in enumerate(hooked):  # on DDP's initial buckets (step 0), then on its rebuilt ones
                    assert (r["in_hook"][0], r["source"]) == ("comm_hook", "post_backward"), (where, step)
                    assert torch.equal(r["in_hook"][1], r["partials"]), (where, step, r["in_hook"][1], r["partials"])
                for step, (a, b) in enumerate(zip(hooked, default)):
                    assert a["slots_same_on_ranks"] and b["slots_same_on_ranks"], (where, step)
                    assert abs(a["total"] - b["total"]) <= 1e-6 * abs(b["total"]), (where, step)
    for rank, result in enumerate(results):  # channels-last gradients: read in DDP's bucket order on both paths
        r = result["channels_last"]
        assert r["sources"] == ("comm_hook", "post_backward") and r["non_contiguous"] and r["same"], (world, rank, r)
        assert rel_err(r["total"], r["expected"]) <= 1e-6, (world, rank, r)
