"""Pipeline parallelism on 4 gloo ranks (issue 11): stages (plain, DDP, FSDP2, virtual, PipelineStage),
tied weights across stages, the set-up checks; against float64 single-process references.

Every layout runs in ONE launch (:func:`results`, cached); each test checks one layout. Per layout:
p in {1, 2, 3.5, inf}, uniform and per group (a group on one stage only; per-layer groups from
every stage), ONE collective per clip, norms bitwise equal on every rank, every stage's clipped
gradients gathered (through the rank results) and compared with the reference's, and a negative
control (each stage's own norm: the pipeline reduction missing; a tied copy counted twice).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from distclip.testing import run_ranks
from tests.helpers.nd_helpers import (
    check_sweep,
    configs,
    count_collectives,
    full_grads_dtensor,
    local_of,
    report_record,
    sweep,
)
from tests.helpers.nd_models import (
    DIM,
    VOCAB,
    cross_entropy,
    data,
    global_data,
    make_net,
    reference_grads,
    run_chunks,
    split_net,
)
from tests.helpers.reference import norm64, rel_err

pytestmark = pytest.mark.multiprocess

PP = DP = 2
LAST_STAGE_GROUPS = [  # "last_stage" lives on the last pipeline stage only
    {"name": "last_stage", "match": ["head.*", "norm.*"], "max_norm": 0.004},
    {"name": "embed", "match": ["embed.*"], "max_norm": 1e3},
]
PER_LAYER = {"depth": 2, "match": ["blocks.*"]}
CONFIGS_FSDP = configs(LAST_STAGE_GROUPS) + [
    {"max_norm": 0.01, "norm_type": 2.0, "groups": LAST_STAGE_GROUPS, "per_layer": PER_LAYER}]


def reference_config(config: dict[str, Any], blocks: int) -> dict[str, Any]:
    """The same clip for the reference, per_layer spelt out as explicit groups (in layer order, after the others)."""
    if "per_layer" not in config:
        return config
    layers = [{"name": f"blocks.{i}", "match": [f"blocks.{i}.*"]} for i in range(blocks)]
    return {k: v for k, v in config.items() if k != "per_layer"} | {"groups": [*config.get("groups", []), *layers]}


def merged(results: list[dict[str, Any]], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """One sweep result from every rank's: each rank gathered its own stage's gradients; replicas must agree."""
    def union(dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for d in dicts:
            for name, t in d.items():
                if name in out:
                    assert torch.equal(out[name], t), f"replicas of {name} differ"
                out[name] = t
        return {n: t for n, t in out.items() if n not in drop}

    records = []
    for i, rec in enumerate(results[0]["records"]):
        assert all(r["records"][i]["total"] == rec["total"] for r in results)  # also checked bitwise in the ranks
        records.append({**rec, "grads": union([r["records"][i]["grads"] for r in results])})
    return {"held": union([r["held"] for r in results]), "records": records}


def stage_norms(result: dict[str, Any], p: float) -> float:
    """The negative control: one stage's own norm (no reduction over the pipeline), from its gradients."""
    return norm64(list(result["held"].values()), p)


# ------------------------------------------------------- case 4: (pp=2, dp=2), FSDP2 per stage
def world_mesh():
    return init_device_mesh("cpu", (PP, DP), mesh_dim_names=("pp", "dp"))


def fsdp_stage(mesh, num_stages: int = PP, blocks: int = 2) -> nn.Module:
    stage = split_net(num_stages, blocks)[mesh["pp"].get_local_rank()]
    for block in stage.blocks.values():
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(stage, mesh=mesh["dp"])
    return stage


def pp_peer(stage: int) -> int:
    """The rank holding ``stage`` with this rank's dp coordinate, on the (pp, dp) mesh (rank = pp * DP + dp)."""
    return (stage % PP) * DP + dist.get_rank() % DP


def run_fsdp_stages(mesh) -> dict[str, Any]:
    pp_rank, dp_rank = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    stage = fsdp_stage(mesh)
    run_chunks([(pp_rank, stage)], PP, pp_peer, *data(0, dp_rank))
    result = sweep(lambda c: distclip.GradClipper(stage, c, pipeline_group=mesh["pp"]), CONFIGS_FSDP,
                   lambda: [local_of(p.grad) for p in stage.parameters()], lambda: full_grads_dtensor(stage))
    result["group_names"] = distclip.GradClipper(stage, CONFIGS_FSDP[-1], pipeline_group=mesh["pp"]).group_names
    # two steps with the FSDP2 all-reduce hook (norms computed inside each stage's reduction)
    stage = fsdp_stage(mesh)
    clipper = distclip.GradClipper(stage, {"max_norm": 0.02, "norm_type": 2.0, "groups": LAST_STAGE_GROUPS,
                                           "comm_hook": True}, pipeline_group=mesh["pp"])
    opt = torch.optim.SGD(stage.parameters(), lr=0.5)
    steps = []
    for step in range(2):
        run_chunks([(pp_rank, stage)], PP, pp_peer, *data(step, dp_rank))
        report, collectives = count_collectives(clipper.clip)
        steps.append({**report_record(report), "collectives": collectives, "grads": full_grads_dtensor(stage)})
        opt.step()
        opt.zero_grad()
    result["steps"] = steps
    result["forgot_pipeline_group"] = error_of(lambda: distclip.GradClipper(stage, CONFIGS_FSDP[2]))
    return result


def error_of(fn: Callable[[], Any]) -> tuple[str, str] | None:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - recorded, checked by the test
        return type(err).__name__, str(err)
    return None


# ------------------------------------------------ case 5: pp=4 plain stages, a real PipelineStage
class LinearStage(nn.Module):
    def __init__(self, index: int, last: bool):
        super().__init__()
        torch.manual_seed(10 + index)
        self.layers = nn.ModuleDict({str(index): nn.Linear(DIM, DIM)})
        self.last = last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = next(iter(self.layers.values()))(x)
        return y if self.last else torch.tanh(y)


class LinearChain(nn.Module):
    """The reference: the four stages in one process."""

    def __init__(self, stages: int):
        super().__init__()
        parts = [LinearStage(i, i == stages - 1) for i in range(stages)]
        self.layers = nn.ModuleDict({k: v for part in parts for k, v in part.layers.items()})
        self.parts = parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers.values()):
            x = layer(x)
            x = x if i == len(self.layers) - 1 else torch.tanh(x)
        return x


LINEAR_GROUPS = [
    {"name": "last_stage", "match": ["layers.3.*"], "max_norm": 0.004},
    {"name": "first_stage", "match": ["layers.0.*"], "max_norm": 1e3},
]
CONFIGS_LINEAR = configs(LINEAR_GROUPS)


def linear_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(4, DIM, generator=g), torch.randn(4, DIM, generator=g)


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(output, target)


def run_pipeline_stage() -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    module = LinearStage(rank, rank == world - 1)
    stage = PipelineStage(module, rank, world, torch.device("cpu"))
    schedule = ScheduleGPipe(stage, n_microbatches=2, loss_fn=mse)
    x, y = linear_batch()
    if rank == 0:
        schedule.step(x)
    elif rank == world - 1:
        schedule.step(target=y)
    else:
        schedule.step()
    grads = lambda: {n: p.grad.detach().double().clone() for n, p in module.named_parameters()}  # noqa: E731
    result = sweep(lambda c: distclip.GradClipper(stage, c, pipeline_group=dist.group.WORLD), CONFIGS_LINEAR,
                   lambda: [p.grad for p in module.parameters()], grads)
    result["group_names"] = distclip.GradClipper(stage, {"per_layer": {"depth": 2}},
                                                 pipeline_group=dist.group.WORLD).group_names
    return result


# ------------------------------------------- case 6: pp=2 x DDP dp=2, embedding tied to the head
class TiedNet(nn.Module):
    """embed -> mid -> head, head.weight IS embed.weight (the reference)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.mid = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB)
        self.head.weight = self.embed.weight

    def first(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mid(self.embed(tokens)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.first(tokens))


class TiedStage(nn.Module):
    """Stage 0: embed and mid; stage 1: head, whose weight is a separate copy of embed.weight."""

    def __init__(self, index: int, rename_embed: bool = False) -> None:
        super().__init__()
        full = TiedNet()
        self.index = index
        if index == 0:  # rename_embed: a replica whose parameter names differ (the set-up check refuses it)
            setattr(self, "emb" if rename_embed else "embed", full.embed)
            self.mid = full.mid
        else:
            self.head = nn.Linear(DIM, VOCAB)
            self.head.weight = nn.Parameter(full.embed.weight.detach().clone())
            self.head.bias = full.head.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.index == 0:
            embed = self.embed if hasattr(self, "embed") else self.emb
            return torch.tanh(self.mid(embed(x)))
        return self.head(x)


TIED_GROUPS = [
    {"name": "embed", "match": ["embed.*"], "max_norm": 0.004},  # the tied weight, counted once
    {"name": "head", "match": ["head.*"], "max_norm": 1e3},  # head.bias (head.weight follows the tie)
]
CONFIGS_TIED = configs(TIED_GROUPS)
TIE = [("embed.weight", "head.weight")]


def tied_stage(mesh, rename_embed: bool = False) -> tuple[nn.Module, DDP]:
    module = TiedStage(mesh["pp"].get_local_rank(), rename_embed)
    return module, DDP(module, process_group=mesh["dp"].get_group())


def tied_backward(mesh, module: nn.Module, ddp: DDP) -> None:
    run_chunks([(mesh["pp"].get_local_rank(), ddp)], PP, pp_peer, *data(0, mesh["dp"].get_local_rank()))
    tied = module.embed.weight if mesh["pp"].get_local_rank() == 0 else module.head.weight
    dist.all_reduce(tied.grad, group=mesh["pp"].get_group())  # the user keeps the tie: sum of both stages'


def run_tied(mesh) -> dict[str, Any]:
    module, ddp = tied_stage(mesh)
    hooked = distclip.GradClipper(ddp, {**CONFIGS_TIED[2], "comm_hook": True}, pipeline_group=mesh["pp"], tied=TIE)
    tied_backward(mesh, module, ddp)
    grads = lambda: {n: p.grad.detach().double().clone() for n, p in module.named_parameters()}  # noqa: E731
    report, collectives = count_collectives(hooked.measure)
    result = {"hooked": {**report_record(report), "collectives": collectives}}
    result.update(sweep(lambda c: distclip.GradClipper(ddp, c, pipeline_group=mesh["pp"], tied=TIE), CONFIGS_TIED,
                        lambda: [p.grad for p in module.parameters()], grads))
    # DDP stages without a hand-made sync: the norm is measured inside DDP's reduction, as post-backward
    plain_module, plain_ddp = tied_stage(mesh)
    in_hook = distclip.GradClipper(plain_ddp, {**CONFIGS_TIED[3], "comm_hook": True}, pipeline_group=mesh["pp"])
    run_chunks([(mesh["pp"].get_local_rank(), plain_ddp)], PP, pp_peer, *data(0, mesh["dp"].get_local_rank()))
    after = distclip.GradClipper(plain_ddp, {**CONFIGS_TIED[3], "comm_hook": False}, pipeline_group=mesh["pp"])
    result["ddp_stage_hook"] = (report_record(in_hook.measure()), report_record(after.measure()))
    # negative control: the same clips without tied= (the copy counted as a parameter of its own)
    untied = distclip.GradClipper(ddp, {**CONFIGS_TIED[2], "comm_hook": False}, pipeline_group=mesh["pp"])
    result["untied"] = untied.measure().total_norm.item()
    result["untied_tie_group"] = {p: distclip.GradClipper(ddp, tie_group_config(p), pipeline_group=mesh["pp"]).measure(
        ).group_norms["tie"].item() for p in (1.0, 2.0, 3.5)}
    return result


def tie_group_config(p: float) -> dict[str, Any]:
    """A group holding only the tied weight (both names): without tied= both copies are counted in it."""
    return {"max_norm": 0.01, "norm_type": p, "comm_hook": False,
            "groups": [{"name": "tie", "match": ["embed.weight", "head.weight"]}]}


# ------------------------------------------ case 7: pp=2 x dp=2, two virtual stages per rank (FSDP2)
VIRTUAL_STAGES = 4
CONFIGS_VIRTUAL = [c for c in CONFIGS_FSDP if c["norm_type"] in (1.0, math.inf) or "per_layer" in c]


def run_virtual(mesh) -> dict[str, Any]:
    pp_rank, dp_rank = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    stages = split_net(VIRTUAL_STAGES, blocks=4)
    mine = [(s, stages[s]) for s in range(pp_rank, VIRTUAL_STAGES, PP)]  # loop style: stages r, r + pp
    for _, chunk in mine:
        for block in chunk.blocks.values():
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(chunk, mesh=mesh["dp"])
    run_chunks(mine, VIRTUAL_STAGES, pp_peer, *data(0, dp_rank))
    chunks = [chunk for _, chunk in mine]

    def gather() -> dict[str, torch.Tensor]:
        return {n: t for chunk in chunks for n, t in full_grads_dtensor(chunk).items()}

    result = sweep(lambda c: distclip.GradClipper(chunks, c, pipeline_group=mesh["pp"]), CONFIGS_VIRTUAL,
                   lambda: [local_of(p.grad) for chunk in chunks for p in chunk.parameters()], gather)
    result["group_names"] = distclip.GradClipper(chunks, CONFIGS_VIRTUAL[-1], pipeline_group=mesh["pp"]).group_names
    return result


# --------------------------------------------------------------------------- the set-up checks
def run_setup_checks(mesh) -> dict[str, Any]:
    pp_rank = mesh["pp"].get_local_rank()
    module, ddp = tied_stage(mesh)
    out = {"stage_configs_differ": error_of(lambda: distclip.GradClipper(
        ddp, {**CONFIGS_TIED[3], "max_norm": 0.01 if pp_rank == 0 else 0.5}, pipeline_group=mesh["pp"], tied=TIE))}
    extra = [{"name": "mid", "match": ["mid.*"]}] if pp_rank == 1 else []  # stage 1's ranks: one group more
    out["stage_groups_differ"] = error_of(lambda: distclip.GradClipper(
        ddp, {**CONFIGS_TIED[3], "groups": TIED_GROUPS + extra}, pipeline_group=mesh["pp"], tied=TIE))
    # declarations on one stage only: the census runs on every rank (it hung the other stage's ranks)
    declared, declared_ddp = tied_stage(mesh)
    if pp_rank == 0:
        distclip.declare(declared.mid.bias, replicated_over=mesh["dp"])  # redundant under DDP, valid
    out["declared_on_one_stage"] = error_of(lambda: distclip.GradClipper(
        declared_ddp, CONFIGS_TIED[3], pipeline_group=mesh["pp"], tied=TIE))
    wrong, wrong_ddp = tied_stage(mesh)
    if pp_rank == 0:  # wrong: the other stage holds no copy of mid.weight
        distclip.declare(wrong.mid.weight, replicated_over=mesh["pp"])
    out["declared_across_stages"] = error_of(lambda: distclip.GradClipper(
        wrong_ddp, CONFIGS_TIED[3], pipeline_group=mesh["pp"], tied=TIE))
    renamed, renamed_ddp = tied_stage(mesh, rename_embed=dist.get_rank() == 1)  # rank 1: a replica of stage 0
    out["replica_layouts_differ"] = error_of(lambda: distclip.GradClipper(
        renamed_ddp, CONFIGS_TIED[3], pipeline_group=mesh["pp"]))
    # ... with tied=: the pipeline of ranks 1 and 3 has no embed.weight (it hung ranks 0 and 2)
    out["tie_unknown_on_one_pipeline"] = error_of(lambda: distclip.GradClipper(
        renamed_ddp, CONFIGS_TIED[3], pipeline_group=mesh["pp"], tied=TIE))
    return out


# ------------------------------------------------------------------------------ the one launch
def all_layouts() -> dict[str, Any]:
    warnings.filterwarnings("ignore", category=UserWarning)
    mesh = world_mesh()
    return {"fsdp_stages": run_fsdp_stages(mesh), "pipeline_stage": run_pipeline_stage(), "tied": run_tied(mesh),
            "virtual": run_virtual(mesh), "setup": run_setup_checks(mesh)}


@functools.lru_cache(maxsize=None)
def results() -> tuple[dict[str, Any], ...]:
    return tuple(run_ranks(all_layouts, 4, timeout=400))


def layout(name: str) -> list[dict[str, Any]]:
    return [r[name] for r in results()]


def net_reference(blocks: int = 2) -> dict[str, torch.Tensor]:
    return reference_grads(make_net(torch.float64, blocks=blocks), *global_data(0, DP))


# ------------------------------------------------------------------------------------- the tests
def test_fsdp2_stages_pp2_dp2():
    """(pp=2, dp=2), each stage fully_shard over mesh["dp"] of the (pp, dp) world mesh, pipeline_group=mesh["pp"]."""
    ref = net_reference()
    ranks = layout("fsdp_stages")
    whole = merged(ranks)
    check_sweep("fsdp_stages", [whole], [reference_config(c, 2) for c in CONFIGS_FSDP], ref)
    for r in ranks:  # per_layer groups: every stage's, in stage order, on every rank
        assert r["group_names"] == ["last_stage", "embed", "blocks.0", "blocks.1", "default"], r["group_names"]
    # negative control: each stage's own norm misses the other stage (torchtitan #596)
    stage_of = {0: [0, 1], 1: [2, 3]}
    for p in (1.0, 2.0):
        exact = norm64(list(ref.values()), p)
        own = [stage_norms(ranks[stage_of[s][0]], p) for s in (0, 1)]
        assert all(rel_err(o, exact) > 0.05 for o in own), (p, own, exact)
        assert rel_err(sum(o ** p for o in own) ** (1 / p), exact) <= 1e-5


def test_fsdp2_stages_all_reduce_hook_two_steps():
    from tests.helpers.reference import reference_run

    config = {"max_norm": 0.02, "norm_type": 2.0, "groups": LAST_STAGE_GROUPS}
    refs = reference_run(config, DP, 2, 0.5, make_model=lambda dtype: make_net(dtype),
                         step_loss=lambda m, step: cross_entropy(m(global_data(step, DP)[0]), global_data(step, DP)[1]))
    ranks = layout("fsdp_stages")
    for step, ref in enumerate(refs):
        recs = [r["steps"][step] for r in ranks]
        assert all(rec["source"] == "comm_hook" and rec["collectives"] == 1 for rec in recs), recs
        assert rel_err(recs[0]["total"], ref["total"]) <= 1e-5, (step, recs[0]["total"], ref["total"])
        grads = merged([{"held": {}, "records": [rec]} for rec in recs])["records"][0]["grads"]
        for name, grad in ref["clipped"].items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item())


def test_forgetting_pipeline_group_is_refused():
    for r in layout("fsdp_stages"):
        kind, message = r["forgot_pipeline_group"]
        assert kind == "ConfigMismatchError", message
        assert "pipeline_group" in message, message


def test_pipeline_stage_gpipe_pp4_plain():
    """pp=4, one Linear per stage, a real PipelineStage driven by ScheduleGPipe, the PipelineStage passed."""
    chain = LinearChain(4).double()
    ref = {n: g for n, g in reference_grads_mse(chain, *linear_batch()).items()}
    ranks = layout("pipeline_stage")
    check_sweep("pipeline_stage", [merged(ranks)], CONFIGS_LINEAR, ref)
    for r in ranks:
        assert r["group_names"] == ["layers.0", "layers.1", "layers.2", "layers.3", "default"], r["group_names"]
    for p in (1.0, 2.0):  # negative control: one stage's own norm
        exact = norm64(list(ref.values()), p)
        assert all(rel_err(stage_norms(r, p), exact) > 0.05 for r in ranks)


def reference_grads_mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    mse(model(x.double()), y.double()).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_tied_embedding_and_head_across_stages():
    """pp=2 x DDP dp=2, embed.weight on stage 0 tied to head.weight on stage 1 (gradients summed by the user)."""
    ref = reference_grads(TiedNet().double(), *global_data(0, DP))
    assert "head.weight" not in ref  # one tied parameter
    ranks = layout("tied")
    whole = merged(ranks)
    for rec in whole["records"]:  # both copies scaled by the same coefficient: bitwise equal
        assert torch.equal(rec["grads"]["embed.weight"], rec["grads"]["head.weight"])
    check_sweep("tied", [merged(ranks, drop=("head.weight",))], CONFIGS_TIED, ref)
    # the DDP comm hook measured in backward, then the user's all-reduce of the tie changed the
    # gradients: the hook's result is stale, the clip measures after backward, still exact
    for r in ranks:
        assert r["hooked"]["source"] == "post_backward" and r["hooked"]["collectives"] == 1
        assert rel_err(r["hooked"]["total"], norm64(list(ref.values()), 2.0)) <= 1e-5
    for r in ranks:
        hooked, after = r["ddp_stage_hook"]
        assert (hooked["source"], after["source"]) == ("comm_hook", "post_backward"), (hooked, after)
        assert rel_err(hooked["total"], after["total"]) <= 1e-6
        assert all(rel_err(hooked["groups"][g], v) <= 1e-6 for g, v in after["groups"].items())
    # negative control: without tied= the copy is counted too: total^2 = exact^2 + |tie|^2, and a
    # group of only the tied weight is 2^(1/p) too large (sqrt(2) for p = 2: Megatron-LM PR #7227)
    exact, tie = norm64(list(ref.values()), 2.0), norm64([ref["embed.weight"]], 2.0)
    for r in ranks:
        assert rel_err(r["untied"], exact) > 0.01, (r["untied"], exact)
        assert rel_err(r["untied"], math.sqrt(exact ** 2 + tie ** 2)) <= 1e-5, (r["untied"], exact, tie)
        for p, wrong in r["untied_tie_group"].items():
            assert rel_err(wrong, 2 ** (1 / p) * norm64([ref["embed.weight"]], p)) <= 1e-5, (p, wrong)


def test_virtual_stages_list_of_fsdp2_chunks():
    """pp=2 x dp=2, each rank two chunks (stages 0, 2 and 1, 3), fully_shard each; a list per rank."""
    ref = net_reference(blocks=4)
    check_sweep("virtual", [merged(layout("virtual"))], [reference_config(c, 4) for c in CONFIGS_VIRTUAL], ref)
    for r in layout("virtual"):  # stage order, not rank order (0, 2, 1, 3)
        assert r["group_names"] == ["last_stage", "embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "default"], \
            r["group_names"]
        for p in (1.0, 2.0):  # negative control: this rank's two chunks alone
            assert rel_err(stage_norms(r, p), norm64(list(ref.values()), p)) > 0.05


def test_setup_check_refuses_differing_stages_and_replicas():
    for r in layout("setup"):
        kind, message = r["stage_configs_differ"]
        assert kind == "ConfigMismatchError" and "max_norm" in message, message
        kind, message = r["stage_groups_differ"]
        assert kind == "ConfigMismatchError" and "groups" in message and "group_order" in message, message
        assert r["declared_on_one_stage"] is None, r["declared_on_one_stage"]
        kind, message = r["declared_across_stages"]  # stage 0 would span 4 ranks: every rank is told
        assert kind == "ConfigMismatchError" and "do not make up the 4 ranks" in message, message
        kind, message = r["replica_layouts_differ"]
        assert kind == "ConfigMismatchError" and "stage_layout" in message, message
        kind, message = r["tie_unknown_on_one_pipeline"]
        assert kind == "ConfigMismatchError" and "'embed.weight'] is not a trainable parameter" in message, message


# ------------------------------------------------- the functional API keeps its clipper per stage list
def run_functional_parameter_lists() -> dict[str, Any]:
    """Stages given as parameter lists to the functional API: the second call reuses the clipper (no new
    set-up exchange), and the norm equals the float64 norm over every stage."""
    stage = split_net(dist.get_world_size(), 4)[dist.get_rank()]
    tokens, targets = data(0, 0)
    run_chunks([(dist.get_rank(), stage)], dist.get_world_size(), lambda s: s, tokens, targets)
    built = []
    original = distclip.GradClipper.__init__

    def counted(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    distclip.GradClipper.__init__ = counted
    try:
        norms = [distclip.global_grad_norm([list(stage.parameters())], pipeline_group=dist.group.WORLD).item()
                 for _ in range(2)]
    finally:
        distclip.GradClipper.__init__ = original
    return {"norms": norms, "built": len(built), "grads": {n: p.grad.double() for n, p in stage.named_parameters()}}


def test_functional_api_keeps_the_clipper_of_parameter_list_stages():
    results = run_ranks(run_functional_parameter_lists, 2, timeout=120)
    grads = {n: g for r in results for n, g in r["grads"].items()}
    expected = norm64(list(grads.values()), 2.0)
    for r in results:
        assert r["built"] == 1, r["built"]  # the second call reused the clipper
        assert r["norms"][0] == r["norms"][1] == results[0]["norms"][0]
        assert rel_err(r["norms"][0], expected) <= 1e-6
