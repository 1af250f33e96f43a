"""FSDP1 (every sharding strategy) on 2 gloo ranks (HSDP on 4) against a float64 single-process reference."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms._comm_hooks import default_hooks
from torch.distributed.fsdp import CPUOffload, MixedPrecision, ShardingStrategy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

import distclip
from distclip.core.names import canonical_name
from distclip.testing import run_ranks
from tests.helpers.checks import assert_same_on_all_ranks
from tests.helpers.fsdp_helpers import (
    GROUPS,
    all_pieces,
    check_runs,
    enable_cpu_offload_shims,
    make_net,
    reference_norm,
    run_configs,
)
from tests.helpers.models import TinyBlock, batch, global_batch, loss_fn
from tests.helpers.reference import reference_clip, rel_err

pytestmark = pytest.mark.multiprocess

CPU = torch.device("cpu")
LAYOUTS = {  # 2 ranks
    "full_shard": {"strategy": "FULL_SHARD"},
    "full_shard_orig_params": {"strategy": "FULL_SHARD", "orig": True},
    "shard_grad_op": {"strategy": "SHARD_GRAD_OP"},
    "shard_grad_op_orig_params": {"strategy": "SHARD_GRAD_OP", "orig": True},
    "no_shard": {"strategy": "NO_SHARD", "naive": "world_sum"},
    "no_shard_orig_params": {"strategy": "NO_SHARD", "orig": True, "naive": "world_sum"},
    "no_shard_blocks_in_full_shard_root": {"strategy": "FULL_SHARD", "blocks": "NO_SHARD"},
    "ignored_params": {"strategy": "FULL_SHARD", "orig": True, "ignored": True, "naive": "world_sum"},
    "fsdp_units_under_plain_root": {"strategy": "FULL_SHARD", "plain_root": True, "naive": "world_sum"},
    "cpu_offload": {"strategy": "FULL_SHARD", "offload": True},
    "mixed_precision_bf16": {"strategy": "FULL_SHARD", "orig": True, "bf16": True},
}
HYBRID_LAYOUTS = {  # 4 ranks, 2x2 mesh (replicate, shard)
    "hybrid_shard": {"strategy": "HYBRID_SHARD"},
    "hybrid_shard_orig_params": {"strategy": "HYBRID_SHARD", "orig": True},
    "hybrid_shard_zero2": {"strategy": "_HYBRID_SHARD_ZERO2"},
}
ALL_LAYOUTS = {**LAYOUTS, **HYBRID_LAYOUTS}
_MESH: list = []


def build(spec: dict):
    """(module to run, what distclip gets, parameters FSDP does not manage) for a layout."""
    if spec.get("offload"):
        enable_cpu_offload_shims()
    model = make_net()
    kwargs = {"device_id": CPU, "use_orig_params": spec.get("orig", False),
              "sharding_strategy": ShardingStrategy[spec["strategy"]]}
    if "HYBRID" in spec["strategy"]:
        if not _MESH:  # one 2x2 mesh per process (creating one makes new process groups)
            from torch.distributed.device_mesh import init_device_mesh

            _MESH.append(init_device_mesh("cpu", (2, 2)))
        kwargs["device_mesh"] = _MESH[0]
    if spec.get("offload"):
        kwargs["cpu_offload"] = CPUOffload(offload_params=True)
    if spec.get("bf16"):
        kwargs["mixed_precision"] = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    if spec.get("plain_root"):  # nested units only: embed, odd, head, tiny stay plain
        for i, block in enumerate(model.blocks):
            model.blocks[i] = FSDP(block, **kwargs)
        unmanaged = [p for n, p in model.named_parameters() if not n.startswith("blocks.")]
        return model, model, unmanaged
    if spec.get("blocks"):  # NO_SHARD blocks inside a FULL_SHARD root
        for i, block in enumerate(model.blocks):
            model.blocks[i] = FSDP(block, **{**kwargs, "sharding_strategy": ShardingStrategy[spec["blocks"]]})
    else:
        kwargs["auto_wrap_policy"] = ModuleWrapPolicy({TinyBlock})
    unmanaged = []
    if spec.get("ignored"):
        kwargs["ignored_states"] = [model.head]
        unmanaged = list(model.head.parameters())
    fsdp = FSDP(model, **kwargs)
    return fsdp, fsdp, unmanaged


def local_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    """What a naive clip sees: the local .grad of every parameter (flat shards, or original-parameter shards)."""
    return [p.grad for p in model.parameters() if p.grad is not None]


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gather every original gradient, by name, from the ranks' shards (FSDP handle metadata)."""
    pieces, managed = [], set()
    for prefix, unit in model.named_modules():
        if not isinstance(unit, FSDP) or unit._handle is None:
            continue
        flat = unit._handle.flat_param
        managed.add(id(flat))
        managed.update(id(p) for p in flat._params or [])
        for k, (fqn, info, shape) in enumerate(zip(flat._fqns, flat._shard_param_infos, flat._shapes)):
            if not info.in_shard:
                continue
            if unit._handle._use_orig_params:
                values = flat._params[k].grad.reshape(-1)
            else:
                values = flat.grad[info.offset_in_shard: info.offset_in_shard + info.numel_in_shard]
            name = canonical_name(f"{prefix}.{fqn}" if prefix else fqn)
            pieces.append((name, info.intra_param_start_idx, values, tuple(shape)))
    for name, p in model.named_parameters():
        if id(p) not in managed:
            pieces.append((canonical_name(name), 0, p.grad.reshape(-1), tuple(p.shape)))
    return all_pieces(pieces)


def run_layouts(names: list[str]) -> dict[str, list[list[dict]]]:
    return {name: run_configs(lambda: build(ALL_LAYOUTS[name]), local_grads, full_grads) for name in names}


def check_layout(name: str, runs: list[list[dict]], world: int) -> None:
    spec = ALL_LAYOUTS[name]
    source = "post_backward" if "HYBRID" in spec["strategy"] else "comm_hook"
    if spec.get("bf16"):  # bf16 compute, 8 mantissa bits (eps 3.9e-3): the precision's tolerance against fp64
        check_runs(name, runs, world, source, spec.get("naive", "local"), tol=1e-2, later_tol=None)
    else:
        check_runs(name, runs, world, source, spec.get("naive", "local"))


# several layouts per launch: starting ranks costs more than a layout's checks
BATCHES = {
    "full_shard_and_shard_grad_op": ["full_shard", "full_shard_orig_params", "shard_grad_op", "shard_grad_op_orig_params"],
    "no_shard_and_mixed_units": ["no_shard", "no_shard_orig_params", "no_shard_blocks_in_full_shard_root"],
    "unmanaged_params": ["ignored_params", "fsdp_units_under_plain_root"],
    "cpu_offload_and_mixed_precision": ["cpu_offload", "mixed_precision_bf16"],
}


@pytest.mark.parametrize("batch_name", list(BATCHES))
def test_fsdp1_matches_float64_reference(batch_name):
    names = BATCHES[batch_name]
    for result in run_ranks(run_layouts, 2, names, timeout=400):
        for name in names:
            check_layout(name, result[name], world=2)


def test_fsdp1_hybrid_sharding_on_2x2_mesh():
    names = list(HYBRID_LAYOUTS)
    for result in run_ranks(run_layouts, 4, names, timeout=500):
        for name in names:
            check_layout(name, result[name], world=4)


def hybrid_hook_status():
    model, target, _ = build(HYBRID_LAYOUTS["hybrid_shard"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clipper = distclip.GradClipper(target, {"max_norm": 1.0, "comm_hook": True})
    ours = [str(w.message) for w in caught if "distclip" in str(w.message)]
    return clipper.adapter.hook_status, clipper.adapter.hook is None, ours


def test_hybrid_sharding_falls_back_to_post_backward_without_warning():
    for status, no_hook, warned in run_ranks(hybrid_hook_status, 4, timeout=120):
        assert "hybrid" in status and no_hook and warned == []


def hook_validity():
    """Cases where the comm-hook result must not (or may) be used; the norm is exact either way."""
    rank = dist.get_rank()
    out = {}
    config = {"max_norm": 0.1, "norm_type": 2.0, "groups": GROUPS, "comm_hook": True}
    for case in ("accumulate_without_no_sync", "accumulate_with_no_sync", "modified_after_backward", "existing_comm_hook",
                 "no_shard_paths_differ"):
        model, target, _ = build(LAYOUTS["no_shard" if case == "no_shard_paths_differ" else "full_shard"])
        if case == "existing_comm_hook":  # FSDP allows one: distclip warns and measures after backward
            model.register_comm_hook(default_hooks.DefaultState(model.process_group), default_hooks.reduce_scatter_hook)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            clipper = distclip.GradClipper(target, config)
        warned = any("already has an FSDP communication hook" in str(w.message) for w in caught)
        assert warned == (case == "existing_comm_hook"), [str(w.message) for w in caught]
        if case == "accumulate_with_no_sync":
            with model.no_sync():
                loss_fn(model, *batch(0, rank), scale=0.5).backward()
        else:
            loss_fn(model, *batch(0, rank), scale=0.5 if case.startswith("accumulate") else 1.0).backward()
        if case.startswith("accumulate"):
            loss_fn(model, *batch(1, rank), scale=0.5).backward()
        elif case == "modified_after_backward":
            for p in model.parameters():
                p.grad.mul_(0.25)
        elif case == "no_shard_paths_differ" and rank == 1:  # same values, new versions: rank 1 measures after backward
            for p in model.parameters():
                p.grad.mul_(1.0)
        report = clipper.measure()
        assert_same_on_all_ranks(report.total_norm, *report.group_norms.values())
        out[case] = (report.source, report.total_norm.item(), {k: v.item() for k, v in report.group_norms.items()})
    return out


def test_hook_result_used_only_when_valid():
    config = {"max_norm": 0.1, "norm_type": 2.0, "groups": GROUPS}
    model = make_net(torch.float64)
    for step in (0, 1):
        loss_fn(model, *global_batch(step, 2), scale=0.5).backward()
    accumulated = reference_clip({n: p.grad for n, p in model.named_parameters()}, config)
    single = reference_norm(config, 2)
    expected = {"accumulate_without_no_sync": ("post_backward", accumulated["total"]),
                "accumulate_with_no_sync": ("comm_hook", accumulated["total"]),
                "modified_after_backward": ("post_backward", 0.25 * single),
                "existing_comm_hook": ("post_backward", single)}
    for rank, out in enumerate(run_ranks(hook_validity, 2)):
        # NO_SHARD replicas split each unit alike on both paths: ranks on different paths count each element once
        expected["no_shard_paths_differ"] = (["comm_hook", "post_backward"][rank], single)
        for case, (source, total) in expected.items():
            assert out[case][0] == source, (case, out[case])
            assert rel_err(out[case][1], total) <= 1e-6, (case, out[case][1], total)
        for group, value in accumulated["groups"].items():
            assert rel_err(out["accumulate_with_no_sync"][2][group], value) <= 1e-6


def nan_on_one_rank(mode: str, layout: str, where: str):
    """A NaN on rank 1 only: every rank must take the same decision, and nothing hangs.

    ``where="shard"``: NaN written into ONE element of rank 1's local shard after backward (the
    other ranks never see it locally). ``where="loss"``: rank 1's loss is NaN, FSDP's reduction
    spreads it (how a replicated layout gets one: its replicas are identical by construction).
    """
    rank = dist.get_rank()
    model, target, _ = build(LAYOUTS[layout])
    clipper = distclip.GradClipper(target, {"max_norm": 0.1, "groups": GROUPS, "nonfinite": mode, "comm_hook": True})
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn(model, *batch(0, rank), scale=math.nan if (where == "loss" and rank == 1) else 1.0).backward()
    if where == "shard" and rank == 1:
        next(p for p in model.parameters() if p.grad is not None and p.grad.numel()).grad.view(-1)[0] = math.nan
    before = [p.detach().clone() for p in model.parameters()]
    raised, report = None, None
    try:
        report = clipper.clip()
    except distclip.NonFiniteGradientError as err:
        raised = str(err)
        opt.zero_grad()  # the training loop's reaction to the error: drop the step
    opt.step()
    unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.zero_grad()
    loss_fn(model, *batch(1, rank)).backward()  # the next step runs normally: nothing hangs
    after = clipper.clip()
    return {"raised": raised, "skipped": None if report is None else report.skipped,
            "source": None if report is None else report.source,
            "unchanged": unchanged, "next_finite": bool(torch.isfinite(after.total_norm))}


@pytest.mark.parametrize("layout, where", [("full_shard", "shard"), ("full_shard_orig_params", "loss"),
                                           ("no_shard_orig_params", "loss")])
def test_nan_on_one_rank_skip_everywhere(layout, where):
    results = run_ranks(nan_on_one_rank, 2, "skip", layout, where)
    for r in results:
        assert r["skipped"] is True and r["raised"] is None and r["unchanged"] and r["next_finite"], r
    # rank 1's edit after backward invalidates its hook result (rank 0's stays valid: paths may
    # differ across ranks, the collective and the decision do not); a NaN loss goes through the hook
    assert [r["source"] for r in results] == (["comm_hook", "post_backward"] if where == "shard" else ["comm_hook"] * 2)


def test_nan_on_one_rank_error_everywhere():
    for r in run_ranks(nan_on_one_rank, 2, "error", "full_shard", "shard"):
        assert r["raised"] is not None and "non-finite" in r["raised"] and r["next_finite"]


def functional_api():
    rank = dist.get_rank()
    model, _, _ = build(LAYOUTS["shard_grad_op"])
    loss_fn(model, *batch(0, rank)).backward()
    measured = distclip.global_grad_norm(model, 3.5)
    clipped = distclip.clip_grad_norm_(model, 1e-3, norm_type=3.5)
    try:
        distclip.clip_grad_norm_(list(model.parameters()), 1.0)
        refused = None
    except distclip.UnsupportedModelError as err:
        refused = str(err)
    return measured.item(), clipped.item(), type(clipped).__name__, refused


def test_functional_api_on_fsdp1_module():
    ref = reference_norm({"max_norm": 1e-3, "norm_type": 3.5}, 2)
    for measured, clipped, kind, refused in run_ranks(functional_api, 2):
        assert kind == "Tensor" and rel_err(measured, ref) <= 1e-6 and rel_err(clipped, ref) <= 1e-6
    # bare FSDP1 parameters are local shards: refused with a clear error rather than a silently local norm
    assert refused is not None and "FSDP" in refused
