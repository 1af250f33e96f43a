"""Bad steps and group roles on 2 and 4 gloo ranks (issue 19): attribution of a non-finite step under every
layout, streaks stopping every rank at the same clip, and measured-only / out-of-total groups against the
float64 reference.

Attribution: after backward, ONE element of ONE parameter's gradient is poisoned on ONE rank (or on every
holder of a replicated piece, as a NaN spread by the reduction would be); the expected parameter and
rank come from the layout's own metadata (FSDP1's flat-parameter shard info, the DTensor's local shard),
never from distclip. Every rank must report the same parameters and ranks, a good clip must issue ONE
collective and the bad one TWO (the attribution's all-gather), and ranks with an empty shard take part.

Two launches (2 and 4 ranks) check everything; their results are cached and asserted by focused tests.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from distclip.testing import run_ranks
from tests.helpers.checks import launch_once
from tests.helpers.models import TinyBlock, batch, global_batch, loss_fn, make_model
from tests.helpers.nd_helpers import check_sweep, count_collectives, full_grads_dtensor, local_of, sweep
from tests.helpers.nd_models import data, run_chunks, split_net

pytestmark = pytest.mark.multiprocess

ROLES = [
    {"name": "embed", "match": "embed.*", "max_norm": None, "in_total": False},  # measured only, out of the total
    {"name": "attn", "match": "blocks.*.attn.*", "max_norm": 0.02, "in_total": False},  # clipped, out of the total
    {"name": "head", "match": "head.*", "max_norm": None},  # measured only, in the total
]
ROLE_CONFIGS = [{"max_norm": 0.01, "norm_type": p, "groups": groups}
                for p in (1.0, 2.0, math.inf) for groups in (ROLES[:1], ROLES)]
ATTRIBUTED = {"max_norm": 0.1, "groups": [{"name": "embed", "match": "embed.*", "max_norm": None, "in_total": False}]}


# ------------------------------------------------------------------------------------ in-rank helpers
def poison(tensor: torch.Tensor, index: int = 0, value: float = math.nan) -> None:
    with torch.no_grad():
        local_of(tensor).view(-1)[index] = value


def attribution_case(target: Any, run_backward: Callable[[], None], poison_step: Callable[[], None],
                     config: dict[str, Any] = ATTRIBUTED, **kwargs: Any) -> dict[str, Any]:
    """A good clip then a poisoned one: collectives of each, and what the bad one reports."""
    clipper = distclip.GradClipper(target, config, **kwargs)
    run_backward()
    good, good_collectives = count_collectives(clipper.clip)
    run_backward()
    poison_step()
    bad, bad_collectives = count_collectives(clipper.clip)
    return {"good": (good_collectives, good.nonfinite_params, good.details()),
            "bad": (bad_collectives, bad.skipped, bad.skip_reason, bad.nonfinite_params, bad.nonfinite_ranks,
                    bad.nonfinite_where, bad.nonfinite_streak),
            "total_finite": math.isfinite(bad.total_norm.item())}


def tiny_backward(model: nn.Module, step: int = 0) -> Callable[[], None]:
    def run() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model, *batch(step, dist.get_rank())).backward()
    return run


def ddp_cases() -> dict[str, Any]:
    """DDP (a fresh wrapper per case: each clipper installs its comm hook, and DDP takes one)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = DDP(make_model(), bucket_cap_mb=0.002)
    name, last = list(model.module.named_parameters())[-1]  # rank r counts slice r of the gradients end to end
    own = attribution_case(model, tiny_backward(model), lambda: rank == world - 1 and poison(last.grad, -1))
    model = DDP(make_model(), bucket_cap_mb=0.002)
    spread = attribution_case(model, tiny_backward(model), lambda: poison(model.module.blocks[0].attn.weight.grad, 5))
    return {"ddp_one_rank": own, "ddp_every_replica": spread, "ddp_expected": (name, world - 1)}


def fsdp1_flat_case() -> dict[str, Any]:
    """FSDP1 FULL_SHARD, flat parameters: rank 1 poisons the first parameter of its shard of the root unit,
    found from FSDP's own shard info (torch 2.13 private fields, read by the test only)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    model = FSDP(make_model(), device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({TinyBlock}))
    flat = model._handle.flat_param
    infos = [(fqn, info) for fqn, info in zip(flat._fqns, flat._shard_param_infos) if info.in_shard and info.numel_in_shard]
    name, info = infos[-1]  # the last parameter this rank holds a piece of (on rank 1: one straddling or after)
    result = attribution_case(model, tiny_backward(model),
                              lambda: dist.get_rank() == 1 and poison(flat.grad, info.offset_in_shard + info.numel_in_shard - 1))
    return {**result, "expected": (name, 1), "holders": [fqn for fqn, _ in infos]}


def fsdp2_model(mesh: Any) -> nn.Module:
    model = make_model()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local_rows(param: nn.Parameter) -> int:
    return local_of(param).numel()


def fsdp2_case(mesh: Any, name: str, poison_ranks: set[int]) -> dict[str, Any]:
    """FSDP2 (1-D or HSDP): the ranks in ``poison_ranks`` poison element 0 of their local shard of ``name``."""
    model = fsdp2_model(mesh)
    param = dict(model.named_parameters())[name]
    holds = local_rows(param) > 0
    result = attribution_case(model, tiny_backward(model),
                              lambda: dist.get_rank() in poison_ranks and poison(param.grad, 0, math.inf))
    return {**result, "holds": holds}


def pipeline_case(pp: int, dp: int, name: str, poisoner: int) -> dict[str, Any]:
    """(pp, dp) ranks: NDNet split into pp stages (FSDP2 over dp when dp > 1); ``poisoner`` poisons ``name``."""
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (pp, dp), mesh_dim_names=("pp", "dp"))
    pp_rank, dp_rank = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    stage = split_net(pp, 2)[pp_rank]
    if dp > 1:
        for block in stage.blocks.values():
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(stage, mesh=mesh["dp"])

    def run() -> None:
        stage.zero_grad(set_to_none=True)
        run_chunks([(pp_rank, stage)], pp, lambda s: (s % pp) * dp + rank % dp, *data(0, dp_rank))

    params = dict(stage.named_parameters())
    result = attribution_case(stage, run, lambda: rank == poisoner and poison(params[name].grad, 0),
                              pipeline_group=mesh["pp"])
    return {**result, "names": sorted(params)}


def streak_and_error_cases(mesh: Any) -> dict[str, Any]:
    """NaN on rank 1 only: ``max_consecutive: 2`` raises on every rank at the 2nd clip; ``error`` at the 1st."""
    out = {}
    for label, nonfinite in (("streak", {"action": "skip", "max_consecutive": 2}), ("error", "error")):
        model = fsdp2_model(mesh)
        clipper = distclip.GradClipper(model, {"max_norm": 0.1, "nonfinite": nonfinite})
        raised = []
        for step in range(3):
            tiny_backward(model, step)()
            if dist.get_rank() == 1:
                poison(model.head.weight.grad, 3)
            try:
                clipper.clip()
            except distclip.NonFiniteGradientError as err:
                raised.append((step, str(err), err.streak, err.nonfinite_params, err.nonfinite_ranks))
                break
        out[label] = raised
    return out


def roles_sweep(target: Any, model: nn.Module) -> dict[str, Any]:
    """Every role config on the same gradients (restored between clips), against the reference in the test."""
    return sweep(lambda c: distclip.GradClipper(target, c), ROLE_CONFIGS,
                 lambda: [local_of(p.grad) for p in model.parameters()], lambda: full_grads_dtensor(model))


def with_grads(model: nn.Module) -> nn.Module:
    tiny_backward(model)()
    return model


# ------------------------------------------------------------------------------------------ launches
def two_ranks() -> dict[str, Any]:
    warnings.simplefilter("ignore")
    mesh = init_device_mesh("cpu", (2,))
    out: dict[str, Any] = dict(ddp_cases())
    out["fsdp1_flat"] = fsdp1_flat_case()
    out["fsdp2"] = fsdp2_case(mesh, "head.weight", {1})
    out["pipeline"] = pipeline_case(2, 1, "blocks.1.up.weight", 1)
    out.update(streak_and_error_cases(mesh))
    ddp = DDP(make_model(), bucket_cap_mb=0.002)
    out["roles_ddp"] = roles_sweep(with_grads(ddp), ddp.module)
    fsdp = with_grads(fsdp2_model(mesh))
    out["roles_fsdp2"] = roles_sweep(fsdp, fsdp)
    return out


def four_ranks() -> dict[str, Any]:
    warnings.simplefilter("ignore")
    out: dict[str, Any] = {}
    flat = init_device_mesh("cpu", (4,))
    out["fsdp2_tiny"] = fsdp2_case(flat, "tiny", {1})  # 2 elements: ranks 2 and 3 hold an empty shard
    hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    out["hsdp"] = fsdp2_case(hsdp, "head.weight", {1, 3})  # both replicas of shard 1, as its all-reduce would
    out["pipeline_fsdp2"] = pipeline_case(2, 2, "head.weight", 3)
    model = fsdp2_model(flat)
    out["roles_fsdp2"] = roles_sweep(with_grads(model), model)
    return out


@launch_once
def results_two() -> list[dict[str, Any]]:
    return run_ranks(two_ranks, 2, timeout=300, collective_timeout=60)


@launch_once
def results_four() -> list[dict[str, Any]]:
    return run_ranks(four_ranks, 4, timeout=400, collective_timeout=90)


def same_everywhere(results: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The case's result on rank 0, after checking every rank reported the same attribution."""
    first = results[0][key]
    for rank, result in enumerate(results):
        assert result[key]["bad"] == first["bad"] and result[key]["good"] == first["good"], (key, rank, result[key])
    return first


def check_attribution(case: dict[str, Any], name: str, ranks: tuple[int, ...]) -> None:
    good, bad = case["good"], case["bad"]
    assert good == (1, None, {}), good  # a good clip: the one collective, nothing attributed
    collectives, skipped, reason, params, found_ranks, where, streak = bad
    assert (skipped, reason, streak) == (True, "nonfinite", 1), bad
    assert collectives == 2, bad  # the clip's collective and the attribution's one all-gather
    assert params == (name,) and found_ranks == ranks and where == {name: ranks}, (bad, name, ranks)


# -------------------------------------------------------------------------------------------- tests
def test_ddp_attribution_finds_the_rank_and_every_replica():
    results = results_two()
    name, rank = results[0]["ddp_expected"]
    check_attribution(same_everywhere(results, "ddp_one_rank"), name, (rank,))
    check_attribution(same_everywhere(results, "ddp_every_replica"), "blocks.0.attn.weight", (0, 1))


def test_fsdp1_flat_shard_attribution():
    results = results_two()
    case = same_everywhere(results, "fsdp1_flat")
    name = results[1]["fsdp1_flat"]["expected"][0]  # from rank 1's own shard info
    assert name in results[1]["fsdp1_flat"]["holders"]
    check_attribution(case, name, (1,))


def test_fsdp2_attribution_on_two_ranks():
    check_attribution(same_everywhere(results_two(), "fsdp2"), "head.weight", (1,))


def test_fsdp2_shard_held_by_one_rank_of_four():
    results = results_four()
    assert [r["fsdp2_tiny"]["holds"] for r in results] == [True, True, False, False]  # FSDP2's own layout
    check_attribution(same_everywhere(results, "fsdp2_tiny"), "tiny", (1,))


def test_hsdp_2d_mesh_attribution_names_both_replicas():
    results = results_four()
    check_attribution(same_everywhere(results, "hsdp"), "head.weight", (1, 3))


def test_pipeline_stage_attribution():
    two = results_two()
    assert "blocks.1.up.weight" in two[1]["pipeline"]["names"] and "blocks.1.up.weight" not in two[0]["pipeline"]["names"]
    check_attribution(same_everywhere(two, "pipeline"), "blocks.1.up.weight", (1,))
    four = results_four()
    check_attribution(same_everywhere(four, "pipeline_fsdp2"), "head.weight", (3,))


def test_streak_and_error_raise_on_every_rank_at_the_same_clip():
    results = results_two()
    for label, step, streak in (("streak", 1, 2), ("error", 0, 1)):
        raised = [r[label] for r in results]
        assert raised[0] == raised[1] and len(raised[0]) == 1, raised  # the same error, message included
        at, message, count, params, ranks = raised[0][0]
        assert (at, count, params, ranks) == (step, streak, ("head.weight",), (1,)), raised[0]
        assert "head.weight (ranks [1])" in message, message


@pytest.mark.parametrize("world, key", [(2, "roles_ddp"), (2, "roles_fsdp2"), (4, "roles_fsdp2")])
def test_roles_match_the_float64_reference(world, key):
    results = results_two() if world == 2 else results_four()
    model = make_model(dtype=torch.float64)
    loss_fn(model, *global_batch(0, world)).backward()
    reference = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    check_sweep(f"{key} on {world} ranks", [r[key] for r in results], ROLE_CONFIGS, reference)
    for rank_result in results:  # the measured-only groups are never scaled, the rest is
        for config, rec in zip(ROLE_CONFIGS, rank_result[key]["records"]):
            assert rec["coefs"]["embed"] == 1.0 and rec["coefs"]["default"] < 1.0, (config, rec["coefs"])
