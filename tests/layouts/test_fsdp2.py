"""FSDP2 (fully_shard, DTensor gradients) on 2 and 4 gloo ranks against a float64 single-process reference."""

from __future__ import annotations

import math
import time
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

import distclip
from distclip.testing import run_ranks
from tests.helpers.checks import assert_same_on_all_ranks
from tests.helpers.fsdp_helpers import (
    GROUPS,
    check_runs,
    make_net,
    reference_norm,
    run_configs,
)
from tests.helpers.models import batch, global_batch, loss_fn
from tests.helpers.reference import norm64, reference_clip, rel_err

pytestmark = pytest.mark.multiprocess

# blocks / root: the mesh shape each is sharded on; "plain" root: not sharded (plain parameters)
LAYOUTS = {  # 2 ranks
    "one_d": {"blocks": (2,), "root": (2,)},
    "different_meshes": {"blocks": (2,), "root": (1, 2)},
    "plain_params_beside_dtensors": {"blocks": (2,), "root": None, "naive": "world_sum"},
    "mixed_precision_bf16": {"blocks": (2,), "root": (2,), "bf16": True},
    "cpu_offload": {"blocks": (2,), "root": (2,), "offload": True},
}
LAYOUTS_4 = {  # 4 ranks
    "one_d_4_ranks_empty_shards": {"blocks": (4,), "root": (4,)},
    "hsdp_2x2": {"blocks": (2, 2), "root": (2, 2)},
    "different_meshes_4_ranks": {"blocks": (4,), "root": (2, 2)},
}
ALL_LAYOUTS = {**LAYOUTS, **LAYOUTS_4}
_MESHES: dict[tuple[int, ...], object] = {}


def mesh(shape: tuple[int, ...]):
    """One mesh per shape per process (each new mesh creates process groups)."""
    if shape not in _MESHES:
        names = ("replicate", "shard") if len(shape) == 2 else ("shard",)
        _MESHES[shape] = init_device_mesh("cpu", shape, mesh_dim_names=names)
    return _MESHES[shape]


def build(spec: dict):
    """(module, what distclip gets, plain parameters FSDP does not manage) for a layout."""
    model = make_net()
    kwargs = {}
    if spec.get("bf16"):
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    if spec.get("offload"):
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=False)  # pinning needs an accelerator
    for block in model.blocks:
        fully_shard(block, mesh=mesh(spec["blocks"]), **kwargs)
    if spec["root"] is None:
        return model, model, [p for n, p in model.named_parameters() if not n.startswith("blocks.")]
    fully_shard(model, mesh=mesh(spec["root"]), **kwargs)
    return model, model, []


def local_grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in model.parameters() if p.grad is not None]


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().double().clone()
            for n, p in model.named_parameters()}


def run_layouts(names: list[str]) -> dict[str, list[list[dict]]]:
    return {name: run_configs(lambda: build(ALL_LAYOUTS[name]), local_grads, full_grads) for name in names}


def check_layout(name: str, runs: list[list[dict]], world: int) -> None:
    spec = ALL_LAYOUTS[name]
    if spec.get("bf16"):  # bf16 compute, 8 mantissa bits (eps 3.9e-3): the precision's tolerance against fp64
        check_runs(name, runs, world, "comm_hook", spec.get("naive", "local"), tol=1e-2, later_tol=None)
    else:
        check_runs(name, runs, world, "comm_hook", spec.get("naive", "local"))


def test_fsdp2_matches_float64_reference_2_ranks():
    names = list(LAYOUTS)
    for result in run_ranks(run_layouts, 2, names, timeout=400):
        for name in names:
            check_layout(name, result[name], world=2)


def test_fsdp2_matches_float64_reference_4_ranks():
    names = list(LAYOUTS_4)
    for result in run_ranks(run_layouts, 4, names, timeout=500):
        for name in names:
            check_layout(name, result[name], world=4)


def parameters_and_torch_clip():
    """An iterable of DTensor parameters (no module: post-backward), and what torch's own clip does on two meshes."""
    rank = dist.get_rank()
    out = {}
    for name in ("one_d", "different_meshes"):
        model, _, _ = build(LAYOUTS[name])
        loss_fn(model, *batch(0, rank)).backward()
        per_group = distclip.global_grad_norm(list(model.named_parameters()), 3.5, groups=GROUPS)
        total = distclip.clip_grad_norm_(model.parameters(), 1e-3, norm_type=3.5)  # a generator of DTensors
        assert type(total) is torch.Tensor and not isinstance(total, DTensor)
        try:
            model.zero_grad()
            loss_fn(model, *batch(0, rank)).backward()
            theirs = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3, norm_type=3.5)
            torch_result = theirs.full_tensor().item() if isinstance(theirs, DTensor) else theirs.item()
        except Exception as err:  # noqa: BLE001  (recorded, reported)
            torch_result = f"{type(err).__name__}: {str(err)[:200]}"
        out[name] = (per_group.item(), total.item(), torch_result)
    return out


def test_iterable_of_dtensor_parameters():
    ref = reference_norm({"max_norm": 1e-3, "norm_type": 3.5}, 2)
    for out in run_ranks(parameters_and_torch_clip, 2):
        for name, (per_group, total, torch_result) in out.items():
            assert rel_err(per_group, ref) <= 1e-6 and rel_err(total, ref) <= 1e-6, (name, per_group, total, ref)
        # torch's own clip is fine on one mesh; on two meshes it raised in torch 2.13 (pytorch #180346)
        assert isinstance(out["one_d"][2], float) and rel_err(out["one_d"][2], ref) <= 1e-5


def hook_validity():
    rank = dist.get_rank()
    out = {}
    config = {"max_norm": 0.1, "norm_type": 2.0, "groups": GROUPS, "comm_hook": True}
    for case in ("accumulate_without_sync_off", "accumulate_with_sync_off", "modified_after_backward", "existing_hook",
                 "hsdp_paths_differ"):
        # hsdp_paths_differ: HSDP on a (2, 1) mesh, each parameter copied on both ranks (a Replicate dimension)
        model, target, _ = build({"blocks": (2, 1), "root": (2, 1)} if case == "hsdp_paths_differ" else LAYOUTS["one_d"])
        if case == "existing_hook":  # FSDP allows one: distclip warns and measures after backward
            model.set_all_reduce_hook(lambda reduce_output: None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            clipper = distclip.GradClipper(target, config)
        warned = any("already has an all-reduce hook" in str(w.message) for w in caught)
        assert warned == (case == "existing_hook"), [str(w.message) for w in caught]
        if case == "accumulate_with_sync_off":
            model.set_requires_gradient_sync(False)
        scale = 0.5 if case.startswith("accumulate") else 1.0
        loss_fn(model, *batch(0, rank), scale=scale).backward()
        if case.startswith("accumulate"):
            model.set_requires_gradient_sync(True)
            loss_fn(model, *batch(1, rank), scale=0.5).backward()
        elif case == "modified_after_backward":
            for p in model.parameters():
                p.grad.mul_(0.25)
        elif case == "hsdp_paths_differ" and rank == 1:  # same values, new versions: rank 1 measures after backward
            for p in model.parameters():
                p.grad.mul_(1.0)
        report = clipper.measure()
        assert_same_on_all_ranks(report.total_norm, *report.group_norms.values())
        out[case] = (report.source, report.total_norm.item(), {k: v.item() for k, v in report.group_norms.items()})
    return out


def test_reduce_hook_result_used_only_when_valid():
    config = {"max_norm": 0.1, "norm_type": 2.0, "groups": GROUPS}
    model = make_net(torch.float64)
    for step in (0, 1):
        loss_fn(model, *global_batch(step, 2), scale=0.5).backward()
    accumulated = reference_clip({n: p.grad for n, p in model.named_parameters()}, config)
    expected = {"accumulate_without_sync_off": ("post_backward", accumulated["total"]),
                "accumulate_with_sync_off": ("comm_hook", accumulated["total"]),
                "modified_after_backward": ("post_backward", 0.25 * reference_norm(config, 2)),
                "existing_hook": ("post_backward", reference_norm(config, 2))}
    for rank, out in enumerate(run_ranks(hook_validity, 2)):
        # the copies are split alike on both paths (per FSDP parameter group): ranks on different paths count
        # each element once
        expected["hsdp_paths_differ"] = (["comm_hook", "post_backward"][rank], reference_norm(config, 2))
        for case, (source, total) in expected.items():
            assert out[case][0] == source, (case, out[case])
            assert rel_err(out[case][1], total) <= 1e-6, (case, out[case][1], total)


def nan_on_one_rank(mode: str, shape: tuple[int, ...]):
    """NaN in ONE element of rank 1's local shard after backward: same decision everywhere, no hang."""
    rank = dist.get_rank()
    model, target, _ = build({"blocks": shape, "root": shape})
    clipper = distclip.GradClipper(target, {"max_norm": 0.1, "groups": GROUPS, "nonfinite": mode, "comm_hook": True})
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn(model, *batch(0, rank)).backward()
    if rank == 1:
        model.blocks[0].mlp[0].weight.grad.to_local().view(-1)[0] = math.nan
    before = [p.detach().to_local().clone() for p in model.parameters()]
    raised, report = None, None
    try:
        report = clipper.clip()
    except distclip.NonFiniteGradientError as err:
        raised = str(err)
        opt.zero_grad()
    opt.step()
    unchanged = all(torch.equal(a, b.detach().to_local()) for a, b in zip(before, model.parameters()))
    opt.zero_grad()
    loss_fn(model, *batch(1, rank)).backward()
    after = clipper.clip()
    return {"raised": raised, "skipped": None if report is None else report.skipped, "unchanged": unchanged,
            "next_finite": bool(torch.isfinite(after.total_norm))}


@pytest.mark.parametrize("mode", ["skip", "error"])
def test_nan_on_one_rank(mode):
    for r in run_ranks(nan_on_one_rank, 2, mode, (2,)):
        assert r["unchanged"] and r["next_finite"], r
        if mode == "skip":
            assert r["skipped"] is True and r["raised"] is None
        else:
            assert r["raised"] is not None and "non-finite" in r["raised"]


class ManySmall(nn.Module):
    """``n`` small 8x16 parameters; loss = sum_i <p_i, c_i>, so each gradient is a known constant."""

    def __init__(self, n: int):
        super().__init__()
        torch.manual_seed(0)
        self.weights = nn.ParameterList(nn.Parameter(0.1 * torch.randn(8, 16)) for _ in range(n))

    def forward(self, scale: float) -> torch.Tensor:
        return sum((w * (scale * (i % 7 + 1))).sum() for i, w in enumerate(self.weights))


def many_small_params(n: int):
    rank = dist.get_rank()
    model = ManySmall(n)
    fully_shard(model, mesh=mesh((2,)))
    clipper = distclip.GradClipper(model, {"max_norm": 1.0, "groups": [{"name": "odd", "match": ["weights.1*"]}],
                                           "comm_hook": True})
    model(1.0 + rank).backward()  # rank r's gradient: (r + 1) * c_i; averaged: 1.5 * c_i
    start = time.perf_counter()
    with CommDebugMode() as comm:
        report = clipper.clip()
    seconds = time.perf_counter() - start
    return report.total_norm.item(), report.source, comm.get_total_counts(), seconds


def dtensor_gradients_laid_out_unlike_parameters():
    """DTensor parameters without FSDP: autograd's gradients need not share the parameters' placements."""
    model = ManySmall(5)
    for i, w in enumerate(model.weights):
        model.weights[i] = nn.Parameter(distribute_tensor(w.detach(), mesh((2,)), [Shard(0)]))
    model(1.0).backward()  # the same on every rank (SPMD: what a Replicate placement promises)
    placements = sorted({str(tuple(w.grad.placements)) for w in model.weights})
    expected = norm64([w.grad.full_tensor() for w in model.weights], 3.5)
    distclip.global_grad_norm(model, norm_type=3.5, max_norm=1e-3)  # builds the clipper: its one set-up all-gather
    with CommDebugMode() as comm:
        total = distclip.clip_grad_norm_(model, 1e-3, norm_type=3.5)
    return placements, total.item(), expected, comm.get_total_counts()


def test_dtensor_gradients_laid_out_unlike_their_parameters():
    for placements, total, expected, collectives in run_ranks(dtensor_gradients_laid_out_unlike_parameters, 2):
        assert placements != ["(Shard(dim=0),)"], placements  # the case under test: e.g. Replicate gradients
        assert rel_err(total, expected) <= 1e-6 and collectives == 1


def test_thousands_of_small_parameters_clip_in_linear_time():
    n = 2000
    expected = 1.5 * math.sqrt(sum(8 * 16 * (i % 7 + 1) ** 2 for i in range(n)))
    results = run_ranks(many_small_params, 2, n, timeout=300)
    for total, source, collectives, seconds in results:
        assert rel_err(total, expected) <= 1e-6 and source == "comm_hook" and collectives == 1
    print(f"\ndistclip clip of {n} FSDP2 parameters on 2 ranks: {max(r[3] for r in results) * 1e3:.1f} ms")


def fp16_reduction():
    """fp16 reduction on 4 ranks: FSDP divides by 2 before and by 2 AFTER the all-reduce hook."""
    rank = dist.get_rank()
    model = make_net()
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float16)
    for block in model.blocks:
        fully_shard(block, mesh=mesh((4,)), mp_policy=policy)
    fully_shard(model, mesh=mesh((4,)), mp_policy=policy)
    clipper = distclip.GradClipper(model, {"max_norm": 1.0, "groups": GROUPS, "comm_hook": True})
    post_backward = distclip.GradClipper(model, {"max_norm": 1.0, "groups": GROUPS, "comm_hook": False})
    loss_fn(model, *batch(0, rank)).backward()
    report = clipper.measure()
    return report.source, report.total_norm.item(), post_backward.measure().total_norm.item()


def test_reduction_divided_after_the_hook_is_not_used():
    ref = reference_norm({"max_norm": 1.0}, 4)
    for source, total, post_backward_total in run_ranks(fp16_reduction, 4):
        assert source == "post_backward" and total == post_backward_total
        assert rel_err(total, ref) <= 2e-3  # fp16 reduction: 11 mantissa bits
