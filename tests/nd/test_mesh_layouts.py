"""Meshes as the frameworks build them (issue 17), on 4 gloo ranks, against float64 references.

torchtitan 0.3's ``ParallelDims`` makes ONE 1-D world mesh and ``_unflatten``s it into named
dimensions; its FSDP mesh under context parallelism is a ``_flatten`` of ``dp_shard`` and ``cp``;
Accelerate's ``ParallelismConfig`` makes an N-D mesh and flattens ``dp``, ``dp_shard_cp``,
``dp_cp``; expert parallelism may span a flattened dimension. The same N-D layouts as
``test_nd_parallel`` (partial TP, sequence parallel, expert parallel, HSDP, pipeline stages) are
built here on those meshes. Per layout: p in {1, 2, 3.5, inf}, uniform and per group, one
collective per clip, norms bitwise equal on every rank, clipped gradients against the reference.
All layouts run in ONE launch (cached); each test checks one.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
from accelerate.parallelism_config import ParallelismConfig
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import distclip
from distclip.testing import run_ranks
from tests.helpers.nd_helpers import (
    check_sweep,
    configs,
    full_grads_dtensor,
    local_of,
    sweep,
)
from tests.helpers.nd_models import (
    ExpertParallelMoE,
    cross_entropy,
    data,
    global_data,
    make_moe,
    make_net,
    partial_tp_net,
    reference_grads,
    run_chunks,
    sequence_parallel_net,
    split_net,
)

pytestmark = pytest.mark.multiprocess

WORLD = 4
GROUPS = [
    {"name": "outside_tp", "match": ["embed.*", "head.*", "norm.*", "blocks.*.norm.*"], "max_norm": 0.005},
    {"name": "up", "match": ["blocks.*.up.*"], "max_norm": 1e3},
]
EP_GROUPS = [
    {"name": "experts", "match": ["experts"], "max_norm": 0.004},
    {"name": "router", "match": ["router.*"], "max_norm": 1e3},
]
CONFIGS, CONFIGS_EP = configs(GROUPS), configs(EP_GROUPS)


def world_unflattened(sizes: tuple[int, ...], names: tuple[str, ...]):
    """torchtitan 0.3's ParallelDims.build_mesh: a 1-D world mesh, unflattened into named dimensions."""
    world = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("world",))
    return world._unflatten(0, sizes, names)


def grads_of(model: torch.nn.Module) -> Callable[[], list[torch.Tensor]]:
    return lambda: [local_of(p.grad) for p in model.parameters() if p.grad is not None]


def sweep_model(model: torch.nn.Module, config_list: list[dict[str, Any]], **clipper_kwargs: Any) -> dict[str, Any]:
    return sweep(lambda c: distclip.GradClipper(model, c, **clipper_kwargs), config_list, grads_of(model),
                 lambda: full_grads_dtensor(model))


# --------------------------------------------------------------------------------------- layouts
def titan_partial_tp() -> dict[str, Any]:
    """(dp_shard=2, tp=2) unflattened from the world: the layout torchtitan's first contact raised on."""
    mesh = world_unflattened((2, 2), ("dp", "tp"))
    model = partial_tp_net(mesh)
    cross_entropy(model(data(0, mesh["dp"].get_local_rank())[0]), data(0, mesh["dp"].get_local_rank())[1]).backward()
    return sweep_model(model, CONFIGS)


def titan_sequence_parallel_flattened() -> dict[str, Any]:
    """torchtitan's legacy FSDP mesh: (dp_shard=2, cp=1, tp=2) unflattened, FSDP over dp_shard x cp flattened."""
    mesh = world_unflattened((2, 1, 2), ("dp_shard", "cp", "tp"))
    fsdp = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    model = sequence_parallel_net({"dp": fsdp, "tp": mesh["tp"]})
    tokens, targets = data(0, fsdp.get_local_rank())
    cross_entropy(model(tokens), targets).backward()
    return sweep_model(model, CONFIGS)


def titan_hsdp() -> dict[str, Any]:
    """HSDP on (dp_replicate=2, dp_shard=2) unflattened from the world; every rank its own batch."""
    mesh = world_unflattened((2, 2), ("dp_replicate", "dp_shard"))
    model = make_net()
    for block in model.blocks:
        fully_shard(block, mesh=mesh["dp_replicate", "dp_shard"])
    fully_shard(model, mesh=mesh["dp_replicate", "dp_shard"])
    cross_entropy(model(data(0, dist.get_rank())[0]), data(0, dist.get_rank())[1]).backward()
    return sweep_model(model, CONFIGS)


def expert_parallel_over_flattened() -> dict[str, Any]:
    """ep over a flattened (dp, tp) of an unflattened world mesh: one expert per rank; the dense
    parameters fully_shard over dp (copies across tp). Every rank sees the same batch (ep spans all)."""
    mesh = world_unflattened((2, 2), ("dp", "tp"))
    ep = mesh["dp", "tp"]._flatten("ep")
    model = ExpertParallelMoE({"ep": ep})
    fully_shard(model, mesh=mesh["dp"], ignored_params={model.experts})
    cross_entropy(model(data(0, 0)[0]), data(0, 0)[1]).backward()
    return sweep_model(model, CONFIGS_EP)


def accelerate_partial_tp() -> dict[str, Any]:
    """Accelerate's ParallelismConfig(dp_shard=2, tp=2) mesh: FSDP over its flattened ``dp_shard_cp``."""
    mesh = ParallelismConfig(dp_shard_size=2, tp_size=2).build_device_mesh("cpu")
    model = partial_tp_net({"dp": mesh["dp_shard_cp"], "tp": mesh["tp"]})
    tokens, targets = data(0, mesh["dp_shard_cp"].get_local_rank())
    cross_entropy(model(tokens), targets).backward()
    return sweep_model(model, CONFIGS)


def accelerate_hsdp() -> dict[str, Any]:
    """Accelerate's ParallelismConfig(dp_replicate=2, dp_shard=2): HSDP on (dp_replicate, dp_shard_cp),
    a root dimension sliced together with a flattened one."""
    mesh = ParallelismConfig(dp_replicate_size=2, dp_shard_size=2).build_device_mesh("cpu")
    hsdp = mesh["dp_replicate", "dp_shard_cp"]
    model = make_net()
    for block in model.blocks:
        fully_shard(block, mesh=hsdp)
    fully_shard(model, mesh=hsdp)
    cross_entropy(model(data(0, dist.get_rank())[0]), data(0, dist.get_rank())[1]).backward()
    return sweep_model(model, CONFIGS)


def titan_pipeline(as_mesh: bool) -> dict[str, Any]:
    """(pp=2, dp_shard=2) unflattened from the world, FSDP2 per stage; the pipeline group as torchtitan's
    ``pp_mesh`` (a DeviceMesh) or as its ProcessGroup."""
    mesh = world_unflattened((2, 2), ("pp", "dp"))
    pp, dp = mesh["pp"], mesh["dp"]
    stage = split_net(2, 2)[pp.get_local_rank()]
    for block in stage.blocks.values():
        fully_shard(block, mesh=dp)
    fully_shard(stage, mesh=dp)
    peer = lambda s: int(mesh.mesh[s, dp.get_local_rank()])  # noqa: E731
    run_chunks([(pp.get_local_rank(), stage)], 2, peer, *data(0, dp.get_local_rank()))
    result = sweep_model(stage, CONFIGS, pipeline_group=pp if as_mesh else pp.get_group())
    return result


LAYOUTS: dict[str, Callable[[], dict[str, Any]]] = {
    "titan_partial_tp": titan_partial_tp,
    "titan_sequence_parallel_flattened": titan_sequence_parallel_flattened,
    "titan_hsdp": titan_hsdp,
    "expert_parallel_over_flattened": expert_parallel_over_flattened,
    "accelerate_partial_tp": accelerate_partial_tp,
    "accelerate_hsdp": accelerate_hsdp,
    "titan_pipeline_mesh": functools.partial(titan_pipeline, True),
    "titan_pipeline_group": functools.partial(titan_pipeline, False),
}


def run_all() -> dict[str, Any]:
    return {name: build() for name, build in LAYOUTS.items()}


@functools.cache
def results() -> list[dict[str, Any]]:
    return run_ranks(run_all, WORLD, timeout=300)


def merged_stages(per_rank: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pipeline sweeps: each rank gathered its own stage's gradients; the full model's are their union."""
    out = []
    for result in per_rank:
        held: dict[str, torch.Tensor] = {}
        records = [dict(r) for r in result["records"]]
        for other in per_rank:
            held.update(other["held"])
            for rec, theirs in zip(records, other["records"]):
                rec["grads"] = {**rec["grads"], **theirs["grads"]}
        out.append({"held": held, "records": records})
    return out


# ------------------------------------------------------------------------------------------ tests
def dense_reference(replicas: int) -> dict[str, torch.Tensor]:
    return reference_grads(make_net(torch.float64), *global_data(0, replicas))


@pytest.mark.parametrize("name, replicas", [
    ("titan_partial_tp", 2), ("titan_sequence_parallel_flattened", 2), ("titan_hsdp", 4),
    ("accelerate_partial_tp", 2), ("accelerate_hsdp", 4)])
def test_dense_layouts_on_framework_meshes(name: str, replicas: int) -> None:
    check_sweep(name, [r[name] for r in results()], CONFIGS, dense_reference(replicas))


def test_expert_parallel_over_a_flattened_dimension() -> None:
    reference = reference_grads(make_moe(torch.float64), *data(0, 0))
    check_sweep("expert_parallel_over_flattened", [r["expert_parallel_over_flattened"] for r in results()],
                CONFIGS_EP, reference)


@pytest.mark.parametrize("name", ["titan_pipeline_mesh", "titan_pipeline_group"])
def test_pipeline_stages_on_an_unflattened_mesh(name: str) -> None:
    check_sweep(name, merged_stages([r[name] for r in results()]), CONFIGS, dense_reference(2))
