"""Mixed gradients (issue 19): DTensors on one or several meshes beside plain tensors, on 2 and 4 gloo ranks.

The layouts users hit, where ``torch.nn.utils.clip_grad_norm_`` raises (trl #4550, ktransformers #2145,
transformers #48208, accelerate #4219, pytorch #180346):

* **LoRA adapters left plain on an FSDP2 model**: the base model ``fully_shard``-ed first, the adapters
  attached after (PEFT on a model transformers sharded at load time): frozen DTensor base weights,
  trainable DTensor norms and head, plain replicated LoRA A/B;
* **experts as plain tensors**: each rank its own experts, declared ``sharded_over`` the ep group (and
  ``replicated_over`` dp on 4 ranks), beside DTensor dense weights and a plain replicated router;
* **three meshes and a plain tensor**: a block on a 1-D world mesh, a tensor-parallel block on a 2-D
  ``(dp, tp)`` mesh, the final norm and head on its ``dp`` sub-mesh, the embedding plain.

Per layout and world size, in ONE launch per world size: p in {1, 2, 3.5, inf}, uniform and per group,
with groups that mix DTensor and plain parameters in one group and groups split by kind; one collective
per clip; norms bitwise equal on every rank; norms and clipped gradients against the float64 reference
(of the gradients the ranks hold, 1e-6, and of the one-process model, 1e-5); two training steps with
FSDP2's all-reduce hook on. Negative controls: torch's clip on the same model raises; the per-mesh
workaround of accelerate / transformers costs a collective per mesh and miscounts declared experts;
undeclared experts are miscounted by distclip too (why ``distclip.declare`` exists).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import distclip
from distclip.testing import run_ranks
from tests.helpers.checks import assert_grad_close, launch_once
from tests.helpers.mixed_models import (
    average_plain_grads,
    lora_net,
    lora_on_fsdp2,
    multi_mesh_net,
    per_mesh_norm,
    plain_experts_moe,
    trainable_reference_grads,
)
from tests.helpers.nd_helpers import (
    MAX_NORM,
    check_sweep,
    configs,
    count_collectives,
    full_grads_dtensor,
    local_of,
    report_record,
    sweep,
)
from tests.helpers.nd_models import cross_entropy, data, global_data, make_moe, make_net
from tests.helpers.reference import norm64, reference_run, rel_err

pytestmark = pytest.mark.multiprocess

LR = 0.5
# per layout: groups mixing DTensor and plain parameters in ONE group, then groups split by kind
GROUPS = {
    "lora": (
        [{"name": "adapters_and_norms", "match": ["*.lora_*", "*norm.*"], "max_norm": 0.005},  # plain + DTensor
         {"name": "head", "match": ["head.*"], "max_norm": 1e3}],
        [{"name": "lora", "match": ["*.lora_*"], "max_norm": 0.005},  # plain only
         {"name": "norms", "match": ["*norm.*"], "max_norm": 1e3}],  # DTensors only; the head: default
    ),
    "experts": (
        [{"name": "experts_and_embed", "match": ["experts", "embed.*"], "max_norm": 0.004},  # declared shard + DTensor
         {"name": "router", "match": ["router.*"], "max_norm": 1e3}],  # plain replicated
        [{"name": "experts", "match": ["experts"], "max_norm": 0.004},
         {"name": "dense", "match": ["embed.*", "head.*"], "max_norm": 1e3}],  # the router: default
    ),
    "multi_mesh": (
        [{"name": "across_meshes", "match": ["embed.*", "blocks.0.up.*", "blocks.1.up.*", "norm.*"], "max_norm": 0.005},
         {"name": "down", "match": ["blocks.*.down.*"], "max_norm": 1e3}],  # plain + three meshes in one group
        [{"name": "world_mesh", "match": ["blocks.0.*"], "max_norm": 0.005},
         {"name": "dp_tp_mesh", "match": ["blocks.1.up.*", "blocks.1.down.*"], "max_norm": 1e3},
         {"name": "dp_submesh", "match": ["blocks.1.norm.*", "norm.*", "head.*"], "max_norm": 0.005}],  # embed: default
    ),
}
CONFIGS = {name: configs(mixed) + configs(split) for name, (mixed, split) in GROUPS.items()}
TWO_STEPS = {name: {"max_norm": 0.02, "norm_type": 2.0, "groups": mixed} for name, (mixed, _) in GROUPS.items()}
LAYOUTS = tuple(GROUPS)


# ---------------------------------------------------------------------------------- inside the ranks
class Meshes:
    """The meshes every layout shares (each new mesh makes process groups): a 1-D world mesh and a 2-D
    ``(dp, x)`` grid with x = 2 (tensor parallel, or expert parallel)."""

    def __init__(self) -> None:
        world = dist.get_world_size()
        self.world = init_device_mesh("cpu", (world,), mesh_dim_names=("world",))
        self.grid = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        self.dp = self.grid["dp"]
        self.dp_rank = self.dp.get_local_rank()


class Layout:
    """One layout on this rank: how to build it, run a backward (and the user's sync of plain gradients),
    and gather every gradient whole (float64, the reference's names)."""

    def __init__(self, name: str, meshes: Meshes) -> None:
        self.name, self.meshes = name, meshes
        self.ep_group = meshes.grid["tp"].get_group()

    def build(self, declare: bool = True) -> nn.Module:
        m = self.meshes
        if self.name == "lora":
            return lora_on_fsdp2(m.world)
        if self.name == "multi_mesh":
            return multi_mesh_net(m.world, m.grid)
        model = plain_experts_moe(m.world, self.ep_group)
        if declare:
            replicated = [m.dp.get_group()] if m.dp.size() > 1 else None
            distclip.declare(model.experts, sharded_over=self.ep_group, replicated_over=replicated)
        return model

    def backward(self, model: nn.Module, step: int) -> None:
        replica = dist.get_rank() if self.name == "lora" else self.meshes.dp_rank
        tokens, targets = data(step, replica)
        cross_entropy(model(tokens), targets).backward()
        if self.name == "experts":  # the router: a copy everywhere; the experts: copies across dp only
            average_plain_grads(model, skip=(model.experts,))
            dist.all_reduce(model.experts.grad, op=dist.ReduceOp.AVG, group=self.meshes.dp.get_group())
        else:
            average_plain_grads(model)

    def gather(self, model: nn.Module) -> dict[str, torch.Tensor]:
        grads = full_grads_dtensor(model)
        if self.name == "experts":  # this rank's experts: put the ep group's together
            local = model.experts.grad.detach().contiguous()
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.ep_group))]
            dist.all_gather(parts, local, group=self.ep_group)
            grads["experts"] = torch.cat(parts).double()
        return grads


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def local_grads(model: nn.Module) -> list[torch.Tensor]:
    return [local_of(p.grad) for p in model.parameters() if p.grad is not None]


def torch_clip(params: list[torch.Tensor]) -> tuple[str, str] | float:
    """torch's own clip (p = 2, the gradients restored after): its norm, or the error it raised."""
    saved = [local_of(p.grad).clone() for p in params if p.grad is not None]
    try:
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM, norm_type=2.0)
        out: tuple[str, str] | float = (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()
    except Exception as err:  # noqa: BLE001 - what torch does is the result
        out = (type(err).__name__, str(err))
    with torch.no_grad():
        for g, s in zip([local_of(p.grad) for p in params if p.grad is not None], saved):
            g.copy_(s)
    return out


def controls(layout: Layout, model: nn.Module) -> dict[str, Any]:
    """What torch's clip, the field's per-mesh workaround, and (experts) an undeclared model give here."""
    params = trainable(model)
    out: dict[str, Any] = {"torch": torch_clip(params),
                           "torch_dtensors_only": torch_clip([p for p in params if isinstance(p, DTensor)])}
    norm, collectives = count_collectives(lambda: per_mesh_norm(params, 2.0))
    out["per_mesh"] = {"norm": norm.item(), "collectives": collectives}
    if layout.name == "experts":
        undeclared = layout.build(declare=False)
        layout.backward(undeclared, 0)
        report, collectives = count_collectives(distclip.GradClipper(undeclared, {"norm_type": 2.0}).measure)
        out["undeclared"] = {"total": report.total_norm.item(), "collectives": collectives}
    return out


def two_steps(layout: Layout, model: nn.Module) -> list[dict[str, Any]]:
    """Two steps of backward, the user's sync, clip (FSDP2's all-reduce hook on), SGD."""
    model.zero_grad()
    clipper = distclip.GradClipper(model, {**TWO_STEPS[layout.name], "comm_hook": True})  # the hook, also on CPU
    opt = torch.optim.SGD(trainable(model), lr=LR)
    records = []
    for step in range(2):
        layout.backward(model, step)
        report, collectives = count_collectives(clipper.clip)
        records.append({**report_record(report), "collectives": collectives, "grads": layout.gather(model),
                        "hook_status": clipper.adapter.hook_status})
        opt.step()
        opt.zero_grad()
    return records


def run_layout(layout: Layout) -> dict[str, Any]:
    model = layout.build()
    layout.backward(model, 0)
    result = sweep(lambda c: distclip.GradClipper(model, c), CONFIGS[layout.name], lambda: local_grads(model),
                   lambda: layout.gather(model))
    result["controls"] = controls(layout, model)
    result["steps"] = two_steps(layout, model)
    return result


def run_all() -> dict[str, Any]:
    warnings.filterwarnings("ignore", message=".*returned a view tensor")  # FSDP2 on a residual model
    meshes = Meshes()
    return {name: run_layout(Layout(name, meshes)) for name in LAYOUTS}


RESULTS: dict[int, Callable[[], list[dict[str, Any]]]] = {
    world: launch_once(lambda world=world: run_ranks(run_all, world, timeout=400)) for world in (2, 4)}


# ------------------------------------------------------------------------------ in the test process
MODELS: dict[str, Callable[[torch.dtype], nn.Module]] = {"lora": lora_net, "experts": make_moe, "multi_mesh": make_net}


def replicas(name: str, world: int) -> int:
    """Data-parallel replicas (distinct batches): every rank its own under LoRA, one per tp/ep pair otherwise."""
    return world if name == "lora" else world // 2


def batch_of(name: str, world: int) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    return lambda step: global_data(step, replicas(name, world))


@functools.cache
def reference(name: str, world: int) -> dict[str, torch.Tensor]:
    return trainable_reference_grads(MODELS[name](torch.float64), *batch_of(name, world)(0))


def layout_results(name: str, world: int) -> list[dict[str, Any]]:
    return [r[name] for r in RESULTS[world]()]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", LAYOUTS)
def test_mixed_layout_matches_float64_in_one_collective(name: str, world: int) -> None:
    """p in {1, 2, 3.5, inf}, uniform, per group mixing DTensor and plain parameters, per group by kind."""
    check_sweep(f"{name}/{world}", layout_results(name, world), CONFIGS[name], reference(name, world))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", LAYOUTS)
def test_mixed_layout_two_steps_with_the_all_reduce_hook(name: str, world: int) -> None:
    batch = batch_of(name, world)
    refs = reference_run(TWO_STEPS[name], world, 2, LR, make_model=MODELS[name],
                         step_loss=lambda model, step: cross_entropy(model(batch(step)[0]), batch(step)[1]))
    for rank, result in enumerate(layout_results(name, world)):
        for step, (rec, ref) in enumerate(zip(result["steps"], refs)):
            where = (name, world, rank, step)
            assert rec["hook_status"] == "all_reduce_hook" and rec["source"] == "comm_hook", (*where, rec["hook_status"])
            assert rec["collectives"] == 1, (*where, rec["collectives"])
            assert rel_err(rec["total"], ref["total"]) <= 1e-5, (*where, rec["total"], ref["total"])
            for group, value in ref["groups"].items():
                assert rel_err(rec["groups"][group], value) <= 1e-5, (*where, group, rec["groups"][group], value)
            for param, grad in ref["clipped"].items():
                assert_grad_close(rec["grads"][param], grad, 1e-5)
        assert any(c < 1 for c in result["steps"][1]["coefs"].values())


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", LAYOUTS)
def test_torch_clip_fails_where_distclip_is_exact(name: str, world: int) -> None:
    """The negative control: torch.nn.utils.clip_grad_norm_ on the same model raises (every layout has a
    plain tensor beside DTensors); the three-mesh model raises even without its plain tensor."""
    exact = norm64(list(reference(name, world).values()), 2.0)
    for result in layout_results(name, world):
        kind, message = result["controls"]["torch"]
        assert kind == "RuntimeError" and "mixed torch.Tensor and DTensor" in message, (name, world, message)
        only = result["controls"]["torch_dtensors_only"]
        if name == "multi_mesh":  # pytorch #180346
            assert isinstance(only, tuple) and "same mesh" in only[1], (name, world, only)
        else:  # one mesh: torch is right on the DTensors, which are not the whole model
            assert isinstance(only, float) and rel_err(only, exact) > 1e-3, (name, world, only, exact)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", LAYOUTS)
def test_per_mesh_workaround_costs_a_collective_per_mesh_and_miscounts_plain_shards(name: str, world: int) -> None:
    """accelerate's / transformers' per-mesh norm: right where plain tensors are copies, at the cost of a
    collective per mesh; wrong, and different across ep ranks, where they are shards (plain experts)."""
    exact = norm64(list(reference(name, world).values()), 2.0)
    per_mesh = [r["controls"]["per_mesh"] for r in layout_results(name, world)]
    if name == "experts":
        assert all(rel_err(m["norm"], exact) > 1e-3 for m in per_mesh), (world, per_mesh, exact)
        assert per_mesh[0]["norm"] != per_mesh[1]["norm"], per_mesh  # ep ranks disagree
    else:
        assert all(rel_err(m["norm"], exact) <= 1e-5 for m in per_mesh), (name, world, per_mesh, exact)
    if name == "multi_mesh":
        assert all(m["collectives"] > 1 for m in per_mesh), per_mesh  # distclip: 1


@pytest.mark.parametrize("world", [2, 4])
def test_undeclared_plain_experts_are_miscounted(world: int) -> None:
    """Without distclip.declare, plain experts beside DTensors are taken for copies: the norm is wrong (the
    reason to declare them); declared, it is exact (the tests above)."""
    exact = norm64(list(reference("experts", world).values()), 2.0)
    for result in layout_results("experts", world):
        undeclared = result["controls"]["undeclared"]
        assert undeclared["collectives"] == 1 and rel_err(undeclared["total"], exact) > 1e-3, (undeclared, exact)
