"""N-D parallelism on 4 gloo ranks (issue 11): tensor, sequence and expert parallelism next to data
parallelism, DTensor and hand-written (declared plain tensors), against float64 single-process references.

Every layout runs in ONE launch (:func:`results`, cached); each test checks one layout. Per layout:
p in {1, 2, 3.5, inf}, uniform and per group, one collective per clip, norms bitwise equal on every
rank, the clipped gradients gathered and compared with the reference's, and a negative control
(the naive count of the layout, computed independently of distclip) that is measurably wrong.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from distclip.testing import run_ranks
from tests.helpers.checks import assert_grad_close
from tests.helpers.nd_helpers import (
    check_naive,
    check_sweep,
    configs,
    count_collectives,
    full_grads_dtensor,
    local_of,
    naive_own_mesh,
    pnorm_partial,
    report_record,
    sweep,
    world_norm,
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
    sequence_parallel_net,
    split,
)
from tests.helpers.reference import reference_clip, reference_run, rel_err

pytestmark = pytest.mark.multiprocess

DP = TP = EP = 2
LR = 0.5
TP_GROUPS = [  # partial TP: the parameters outside tensor parallelism (DTensors on mesh["dp"]) in one group
    {"name": "outside_tp", "match": ["embed.*", "head.*", "norm.*", "blocks.*.norm.*"], "max_norm": 0.005},
    {"name": "up", "match": ["blocks.*.up.*"], "max_norm": 1e3},  # never clipped
]
SP_GROUPS = [  # full TP + SP: the tensor-parallel copies (SP norms, row-parallel biases) in one group
    {"name": "tp_copies", "match": ["norm.*", "blocks.*.norm.*", "blocks.*.down.bias"], "max_norm": 0.005},
    {"name": "embed", "match": ["embed.*"], "max_norm": 1e3},
]
EP_GROUPS = [
    {"name": "experts", "match": ["experts"], "max_norm": 0.004},  # expert parameters only
    {"name": "router", "match": ["router.*"], "max_norm": 1e3},
]
CONFIGS_TP, CONFIGS_SP, CONFIGS_EP = configs(TP_GROUPS), configs(SP_GROUPS), configs(EP_GROUPS)
TWO_STEPS = {"max_norm": 0.02, "norm_type": 2.0, "groups": TP_GROUPS}


def twice_counted(p: float) -> float:
    """A group counted on both ranks of a 2-way dimension: 2^(1/p) times its norm (the same max for inf)."""
    return 2.0 ** (1.0 / p)


# --------------------------------------------------------------------------------------- layouts
def tp_mesh():
    return init_device_mesh("cpu", (DP, TP), mesh_dim_names=("dp", "tp"))


def dtensor_grads(model: nn.Module) -> list[torch.Tensor]:
    return [local_of(p.grad) for p in model.parameters() if p.grad is not None]


def run_partial_tp(mesh) -> dict[str, Any]:
    dp_rank = mesh["dp"].get_local_rank()
    model = partial_tp_net(mesh)
    cross_entropy(model(data(0, dp_rank)[0]), data(0, dp_rank)[1]).backward()
    outside = [(n, p.grad) for n, p in model.named_parameters() if not (".up." in n or ".down." in n)]
    assert all(g.device_mesh.ndim == 1 for _, g in outside)  # the layout of the bug: DTensors on mesh["dp"]
    result = sweep(lambda c: distclip.GradClipper(model, c), CONFIGS_TP, lambda: dtensor_grads(model),
                   lambda: full_grads_dtensor(model),
                   naive=lambda p: {"outside_tp": naive_own_mesh(outside, p)})
    result["steps"] = {hook: two_steps(lambda: partial_tp_net(mesh), dp_rank, hook) for hook in (True, False)}
    return result


def two_steps(build, dp_rank: int, hook: bool) -> list[dict[str, Any]]:
    """Two steps of forward/backward, clip (collectives counted), SGD: the FSDP2 all-reduce hook path."""
    model = build()
    clipper = distclip.GradClipper(model, {**TWO_STEPS, "comm_hook": hook})
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    records = []
    for step in range(2):
        tokens, targets = data(step, dp_rank)
        cross_entropy(model(tokens), targets).backward()
        report, collectives = count_collectives(clipper.clip)
        records.append({**report_record(report), "collectives": collectives, "grads": full_grads_dtensor(model),
                        "hook_status": clipper.adapter.hook_status})
        opt.step()
        opt.zero_grad()
    return records


def run_sequence_parallel(mesh) -> dict[str, Any]:
    dp_rank = mesh["dp"].get_local_rank()
    model = sequence_parallel_net(mesh)
    tokens, targets = data(0, dp_rank)
    cross_entropy(model(tokens), targets).backward()
    named = [(n, p.grad) for n, p in model.named_parameters()]
    strided = sorted(n for n, g in named if any("StridedShard" in type(pl).__name__ for pl in g.placements))
    copies = [(n, g) for n, g in named if n.endswith(("norm.weight", "norm.bias", "down.bias"))]
    result = sweep(lambda c: distclip.GradClipper(model, c), CONFIGS_SP, lambda: dtensor_grads(model),
                   lambda: full_grads_dtensor(model),
                   naive=lambda p: {"tp_copies": world_norm(pnorm_partial([local_of(g) for _, g in copies], p), p)})
    result["strided"] = strided
    result["placements"] = {n: (tuple(g.device_mesh.mesh.shape), [str(pl) for pl in g.placements]) for n, g in named}
    return result


def ep_mesh():
    return init_device_mesh("cpu", (DP, EP), mesh_dim_names=("dp", "ep"))


def run_expert_parallel(mesh) -> dict[str, Any]:
    dp_rank = mesh["dp"].get_local_rank()
    model = ExpertParallelMoE(mesh)
    fully_shard(model, mesh=mesh["dp"], ignored_params={model.experts})  # dense parameters only
    tokens, targets = data(0, dp_rank)
    cross_entropy(model(tokens), targets).backward()
    experts = model.experts.grad
    assert isinstance(experts, DTensor) and experts.placements == (Shard(0),)
    local = experts.to_local()
    dist.all_reduce(local, group=mesh["dp"].get_group())  # the expert-data-parallel sync FSDP/DDP would do
    local.div_(DP)
    result = sweep(lambda c: distclip.GradClipper(model, c), CONFIGS_EP, lambda: dtensor_grads(model),
                   lambda: full_grads_dtensor(model),
                   naive=lambda p: {"experts": naive_own_mesh([("experts", experts)], p)})
    return result


def run_tp_ep_3d() -> dict[str, Any]:
    """(dp=1, tp=2, ep=2): one fully_shard group holding dense parameters copied over tp x ep and
    experts copied over tp only (two replica sets in one FSDP2 reduction), with the all-reduce hook."""
    mesh = init_device_mesh("cpu", (1, TP, EP), mesh_dim_names=("dp", "tp", "ep"))
    model = ExpertParallelMoE(mesh)
    fully_shard(model, mesh=mesh["dp"])  # experts too: (dp, ep) DTensors in the root's group
    hooked = distclip.GradClipper(model, {**CONFIGS_EP[3], "comm_hook": True})  # p = 2, per group
    tokens, targets = data(0, 0)
    cross_entropy(model(tokens), targets).backward()
    report, collectives = count_collectives(hooked.measure)
    result = sweep(lambda c: distclip.GradClipper(model, c), CONFIGS_EP, lambda: dtensor_grads(model),
                   lambda: full_grads_dtensor(model))
    result["hooked"] = {**report_record(report), "collectives": collectives, "status": hooked.adapter.hook_status}
    # the same backward again, then an in-place collective into a view of a hook-measured gradient
    # (to_local() in grad mode is a view of FSDP2's flat buffer); MAX over tp changes no value
    model.zero_grad()
    cross_entropy(model(tokens), targets).backward()
    dist.all_reduce(model.router.weight.grad.to_local(), op=dist.ReduceOp.MAX, group=mesh["tp"].get_group())
    result["written_after_hook"] = report_record(hooked.measure())
    return result


# ------------------------------------------------------- hand-written (Megatron-style) tensor parallel
class MegatronBlock(nn.Module):
    """A block whose up (column-parallel) and down (row-parallel) weights are this rank's plain shards."""

    def __init__(self, block: nn.Module, tp_rank: int, tp_group: Any) -> None:
        super().__init__()
        self.norm = block.norm
        self.up = nn.Linear(1, 1)
        self.up.weight = nn.Parameter(split(block.up.weight, TP, tp_rank, 0))
        self.up.bias = nn.Parameter(split(block.up.bias, TP, tp_rank, 0))
        self.down = nn.Linear(1, 1)
        self.down.weight = nn.Parameter(split(block.down.weight, TP, tp_rank, 1))
        self.down.bias = block.down.bias
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = nn.functional.linear(torch.tanh(self.up(self.norm(x))), self.down.weight)
        # torch's differentiable all-reduce: its backward sums the gradient over tp too, so every
        # rank backpropagates loss / tp and the copies' gradients are summed over tp afterwards
        return x + dist.nn.functional.all_reduce(partial, group=self.tp_group) + self.down.bias


class MegatronNet(nn.Module):
    def __init__(self, tp_rank: int, tp_group: Any) -> None:
        super().__init__()
        full = make_net()
        self.embed, self.norm, self.head = full.embed, full.norm, full.head
        self.blocks = nn.ModuleList(MegatronBlock(b, tp_rank, tp_group) for b in full.blocks)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


SHARD_DIMS = {"up.weight": 0, "up.bias": 0, "down.weight": 1}  # how each shard was cut from the full weight
DECLARED_GROUPS = TP_GROUPS
CONFIGS_DECLARED = configs(DECLARED_GROUPS)


def shard_dim(name: str) -> int | None:
    return next((d for suffix, d in SHARD_DIMS.items() if name.endswith(suffix)), None)


def megatron_model(mesh, declare: bool, wrong: bool = False) -> tuple[nn.Module, DDP]:
    tp_group, dp_group = mesh["tp"].get_group(), mesh["dp"].get_group()
    model = MegatronNet(mesh["tp"].get_local_rank(), tp_group)
    if declare:
        for name, p in model.named_parameters():
            if shard_dim(name) is not None and not (wrong and name == "blocks.0.up.weight"):
                distclip.declare(p, sharded_over=tp_group)
            else:  # a copy on every tp rank (or, wrongly declared, blocks.0.up.weight: a shard)
                distclip.declare(p, replicated_over=tp_group)
    return model, DDP(model, process_group=dp_group)


def megatron_backward(mesh, model: nn.Module, ddp: DDP, step: int = 0) -> None:
    tokens, targets = data(step, mesh["dp"].get_local_rank())
    (cross_entropy(ddp(tokens), targets) / TP).backward()  # DDP averages over dp
    for name, p in model.named_parameters():
        if shard_dim(name) is None:  # the copies: each rank holds 1/tp of their gradient
            dist.all_reduce(p.grad, group=mesh["tp"].get_group())


def run_declared(mesh) -> dict[str, Any]:
    tp_rank = mesh["tp"].get_local_rank()
    model, ddp = megatron_model(mesh, declare=True)
    hooked = distclip.GradClipper(ddp, CONFIGS_DECLARED[3])  # DDP comm hook: measures inside backward
    megatron_backward(mesh, model, ddp)  # ... then the copies' gradients are summed over tp
    report, collectives = count_collectives(hooked.measure)
    hooked_record = {**report_record(report), "collectives": collectives}
    result = sweep(lambda c: distclip.GradClipper(ddp, c), CONFIGS_DECLARED,
                   lambda: [p.grad for p in model.parameters()], lambda: all_megatron_grads(model))
    # negative control: the same model without declarations (every parameter a dp copy)
    plain, plain_ddp = megatron_model(mesh, declare=False)
    megatron_backward(mesh, plain, plain_ddp)
    undeclared = distclip.GradClipper(plain_ddp, CONFIGS_DECLARED[2])  # p = 2, uniform
    report, collectives = count_collectives(undeclared.measure)
    result["undeclared"] = {"total": report.total_norm.item(), "collectives": collectives,
                            "reduce_ranks": dist.get_process_group_ranks(undeclared.adapter.reduce_group)}
    # a shard declared replicated: the set-up census refuses it on every rank
    wrong, wrong_ddp = megatron_model(mesh, declare=True, wrong=True)
    try:
        distclip.GradClipper(wrong_ddp, CONFIGS_DECLARED[2])
        result["wrong_declaration"] = None
    except Exception as err:  # noqa: BLE001 - recorded, checked by the test
        result["wrong_declaration"] = (type(err).__name__, str(err))
    result["tp_rank"] = tp_rank
    result["hooked"] = hooked_record
    return result


def all_megatron_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every gradient as a full float64 tensor: shards all-gathered over tp and put back together."""
    out = {}
    tp = dist.get_process_group_ranks(model.blocks[0].tp_group)
    for name, p in model.named_parameters():
        grad, dim = p.grad.detach().double().clone(), shard_dim(name)
        if dim is None:
            out[name] = grad
            continue
        parts = [torch.empty_like(grad) for _ in tp]
        dist.all_gather(parts, grad.contiguous(), group=model.blocks[0].tp_group)
        out[name] = torch.cat(parts, dim=dim)
    return out


# ------------------------------------------------------------------------------ the one launch
def all_layouts() -> dict[str, Any]:
    warnings.filterwarnings("ignore", message=".*distributed.nn.functional.all_reduce is deprecated")
    warnings.filterwarnings("ignore", message=".*returned a view tensor")  # FSDP2 on a residual model
    mesh = tp_mesh()
    out = {"partial_tp": run_partial_tp(mesh), "sequence_parallel": run_sequence_parallel(mesh),
           "declared": run_declared(mesh)}
    out["expert_parallel"] = run_expert_parallel(ep_mesh())
    out["tp_ep_3d"] = run_tp_ep_3d()
    return out


@functools.lru_cache(maxsize=None)
def results() -> tuple[dict[str, Any], ...]:
    return tuple(run_ranks(all_layouts, 4, timeout=400))


def layout(name: str) -> list[dict[str, Any]]:
    """Each rank's results for one layout (rank order)."""
    return [r[name] for r in results()]


def net_reference() -> dict[str, torch.Tensor]:
    return reference_grads(make_net(torch.float64), *global_data(0, DP))


# ------------------------------------------------------------------------------------- the tests
def test_partial_tp_submesh_copies_counted_once():
    """(dp=2, tp=2), TP on up/down only: embedding, head and LayerNorms are DTensors on mesh["dp"]."""
    ref = net_reference()
    for result in layout("partial_tp"):
        check_sweep("partial_tp", [result], CONFIGS_TP, ref)
    check_naive("partial_tp", layout("partial_tp")[0], CONFIGS_TP, ref, "outside_tp", twice_counted)


def test_partial_tp_two_steps_all_reduce_hook_and_post_backward():
    """Two steps with the FSDP2 all-reduce hook, and with comm_hook off: the same norms, the reference's."""
    refs = reference_run(TWO_STEPS, DP, 2, LR, make_model=lambda dtype: make_net(dtype),
                         step_loss=lambda m, step: cross_entropy(m(global_data(step, DP)[0]), global_data(step, DP)[1]))
    for result in layout("partial_tp"):
        hooked, plain = result["steps"][True], result["steps"][False]
        assert [r["source"] for r in hooked] == ["comm_hook", "comm_hook"], [r["hook_status"] for r in hooked]
        assert hooked[0]["hook_status"] == "all_reduce_hook"
        assert [r["source"] for r in plain] == ["post_backward", "post_backward"]
        for step, (a, b, ref) in enumerate(zip(hooked, plain, refs)):
            assert a["collectives"] == b["collectives"] == 1
            assert rel_err(a["total"], b["total"]) <= 1e-6, (step, a["total"], b["total"])
            for rec in (a, b):
                assert rel_err(rec["total"], ref["total"]) <= 1e-5, (step, rec["total"], ref["total"])
                for group, value in ref["groups"].items():
                    assert rel_err(rec["groups"][group], value) <= 1e-5, (step, group)
                for name, grad in ref["clipped"].items():
                    assert_grad_close(rec["grads"][name], grad, 1e-5)
        assert any(c < 1 for c in hooked[1]["coefs"].values())


def test_full_tp_sequence_parallel_strided_shards():
    """torchtitan's TP + SP plan, then fully_shard over dp (``_StridedShard``): exact."""
    ref = net_reference()
    for result in layout("sequence_parallel"):
        assert result["strided"], result["placements"]  # the layout really has strided shards
        check_sweep("sequence_parallel", [result], CONFIGS_SP, ref)
    check_naive("sequence_parallel", layout("sequence_parallel")[0], CONFIGS_SP, ref, "tp_copies", twice_counted)


def test_expert_parallel_dtensor_experts_on_ep_submesh():
    """(dp=2, ep=2): experts Shard(0) on mesh["ep"], copies across dp; dense fully_shard over dp."""
    ref = reference_grads(make_moe(torch.float64), *global_data(0, DP))
    for result in layout("expert_parallel"):
        check_sweep("expert_parallel", [result], CONFIGS_EP, ref)
    check_naive("expert_parallel", layout("expert_parallel")[0], CONFIGS_EP, ref, "experts", twice_counted)


def test_tp_ep_3d_two_replica_sets_in_one_fsdp_group():
    """(dp=1, tp=2, ep=2): the all-reduce hook slices each replica set of a group on its own."""
    ref = reference_grads(make_moe(torch.float64), *data(0, 0))
    expected = reference_clip(ref, CONFIGS_EP[3])
    for result in layout("tp_ep_3d"):
        check_sweep("tp_ep_3d", [result], CONFIGS_EP, ref)
        hooked = result["hooked"]
        assert hooked["source"] == "comm_hook" and hooked["collectives"] == 1, hooked
        assert rel_err(hooked["total"], expected["total"]) <= 1e-5, (hooked, expected["total"])
        for group, value in expected["groups"].items():
            assert rel_err(hooked["groups"][group], value) <= 1e-5, (group, hooked["groups"][group], value)
        written = result["written_after_hook"]  # c10d bumps no version: the write is seen by distclip's watch
        assert written["source"] == "post_backward", written
        assert rel_err(written["total"], expected["total"]) <= 1e-5, (written, expected["total"])


def test_declared_megatron_tensor_parallel_under_ddp():
    """Hand-written column/row-parallel shards and declared copies, DDP over dp; reassembled gradients."""
    ref = net_reference()
    for result in layout("declared"):
        check_sweep("declared", [result], CONFIGS_DECLARED, ref)
        # the comm hook measured before the copies were summed over tp (an in-place all_reduce, which
        # bumps no version counter): its result is stale, the clip measures after backward
        hooked = result["hooked"]
        assert hooked["source"] == "post_backward" and hooked["collectives"] == 1, hooked
        expected = reference_clip(ref, CONFIGS_DECLARED[3])
        assert rel_err(hooked["total"], expected["total"]) <= 1e-5, (hooked, expected["total"])
    # negative control: without declarations DDP's rule counts every tensor as a dp copy: the norm is
    # tp rank's own (shards of the other tp rank missing), different on the two tp ranks
    exact = reference_clip(ref, CONFIGS_DECLARED[2])["total"]
    undeclared = [r["undeclared"] for r in layout("declared")]
    assert all(u["collectives"] == 1 for u in undeclared)
    assert all(len(u["reduce_ranks"]) == DP for u in undeclared)
    by_tp = {r["tp_rank"]: r["undeclared"]["total"] for r in layout("declared")}
    assert by_tp[0] != by_tp[1], by_tp
    assert all(rel_err(v, exact) > 0.05 for v in by_tp.values()), (by_tp, exact)


def test_wrong_declaration_is_a_clear_error_on_every_rank():
    for result in layout("declared"):
        kind, message = result["wrong_declaration"]
        assert kind == "UsageError", message
        assert "not copies" in message and "sharded_over" in message, message
        assert "['blocks.0.up.weight'] differ" in message, message  # names the culprit, and only it
