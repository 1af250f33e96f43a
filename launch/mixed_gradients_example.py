"""Mixed gradients on CPU (gloo): DTensors on one or several meshes beside plain tensors, clipped by distclip.

    torchrun --nproc_per_node 4 launch/mixed_gradients_example.py --layout lora      # LoRA left plain on FSDP2
    torchrun --nproc_per_node 4 launch/mixed_gradients_example.py --layout experts   # plain experts, declared
    torchrun --nproc_per_node 4 launch/mixed_gradients_example.py --layout meshes    # three meshes + a plain tensor
    torchrun --nproc_per_node 4 launch/mixed_gradients_example.py --layout experts-undeclared   # what declare fixes

(2 ranks work too.) On rank 0, per p: distclip's norm and the collectives its clip issued; the float64
norm of the gradients the ranks hold (gathered whole, summed in one process); what torch's
``clip_grad_norm_`` does on the same parameters; and the per-mesh workaround of accelerate 1.16
(``Accelerator._clip_grad_norm_dtensor_aware``) and transformers 5.24 (``Trainer._mixed_mesh_grad_norm``),
written out here. Then one per-group clip, each group's norm next to float64.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import math
import warnings
from collections import defaultdict
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn.utils import get_total_norm

import distclip

VOCAB, DIM, SEQ, BATCH, EXPERTS, RANK = 32, 16, 8, 4, 4, 4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, 2 * DIM)
        self.down = nn.Linear(2 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class LoraLinear(nn.Module):
    """A frozen base Linear plus a trainable low-rank update B(A(x)) (PEFT's LoRA)."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, RANK, bias=False)
        self.lora_B = nn.Linear(RANK, base.out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x))


class ToGroup(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the expert group (each rank ran its own experts)."""

    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class FromGroup(torch.autograd.Function):
    """Forward sums the experts' partial outputs over the group; identity backward."""

    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


class MoE(nn.Module):
    """Embedding, router, this rank's experts (a plain [E/ep, D, D] tensor), head."""

    def __init__(self, ep_group: Any) -> None:
        super().__init__()
        self.embed, self.router, self.head = nn.Embedding(VOCAB, DIM), nn.Linear(DIM, EXPERTS), nn.Linear(DIM, VOCAB)
        every = torch.randn(EXPERTS, DIM, DIM) / DIM ** 0.5  # the same on every rank (same seed)
        per = EXPERTS // dist.get_world_size(ep_group)
        self.first, self.group = dist.get_rank(ep_group) * per, ep_group
        self.experts = nn.Parameter(every[self.first:self.first + per].clone())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        gate = ToGroup.apply(torch.softmax(self.router(x), dim=-1), self.group)
        x_in = ToGroup.apply(x, self.group)
        mine = sum(gate[..., self.first + k, None] * torch.tanh(x_in @ w) for k, w in enumerate(self.experts))
        return self.head(x + FromGroup.apply(mine, self.group))


# ------------------------------------------------------------------------------------------ layouts
def average_plain(model: nn.Module, group: Any = None, skip: tuple[Any, ...] = ()) -> None:
    """Average the gradients FSDP2 does not manage (the HF Trainer does this for PEFT adapters)."""
    for p in model.parameters():
        if p.grad is not None and not isinstance(p.grad, DTensor) and all(p is not s for s in skip):
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG, group=group)


def lora_layout(world: int) -> tuple[nn.Module, Callable[[], None], list[dict[str, Any]]]:
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    model = Net()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the base model is sharded first (as transformers does at load time) ...
    for block in model.blocks:  # ... then the adapters attached: plain tensors FSDP2 does not manage
        block.up, block.down = LoraLinear(block.up), LoraLinear(block.down)
    for name, p in model.named_parameters():
        p.requires_grad_(not (name.startswith("embed.") or ".base." in name))  # trainable: LoRA, norms, head

    def backward() -> None:
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(dist.get_rank()))
        nn.functional.cross_entropy(model(tokens).reshape(-1, VOCAB), tokens.reshape(-1)).backward()
        average_plain(model)

    groups = [{"name": "adapters_and_norms", "match": ["*.lora_*", "*norm.*"], "max_norm": 0.05}]
    return model, backward, groups


def experts_layout(world: int, declare: bool = True) -> tuple[nn.Module, Callable[[], None], list[dict[str, Any]]]:
    grid = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "ep"))
    flat = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    ep, dp = grid["ep"].get_group(), grid["dp"].get_group()
    model = MoE(ep)
    fully_shard(model, mesh=flat, ignored_params={model.experts, *model.router.parameters()})
    if declare:  # each rank its own experts (copies across dp): without it, taken for copies on every rank
        distclip.declare(model.experts, sharded_over=ep, replicated_over=dp if world > 2 else None)

    def backward() -> None:
        seed = grid["dp"].get_local_rank()  # every rank of an ep group sees the same tokens
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
        nn.functional.cross_entropy(model(tokens).reshape(-1, VOCAB), tokens.reshape(-1)).backward()
        average_plain(model, skip=(model.experts,))  # the router: a copy on every rank
        dist.all_reduce(model.experts.grad, op=dist.ReduceOp.AVG, group=dp)  # experts: copies across dp

    groups = [{"name": "experts_and_embed", "match": ["experts", "embed.*"], "max_norm": 0.05}]
    model.gather_experts = ep  # type: ignore[attr-defined]  (for the float64 check below)
    return model, backward, groups


def meshes_layout(world: int) -> tuple[nn.Module, Callable[[], None], list[dict[str, Any]]]:
    flat = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    grid = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    model = Net()
    fully_shard(model.blocks[0], mesh=flat)  # a 1-D mesh of every rank
    parallelize_module(model.blocks[1], grid["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    fully_shard(model.blocks[1], mesh=grid["dp"])  # DTensors on the 2-D (dp, tp) mesh
    fully_shard(model, mesh=grid["dp"], ignored_params={model.embed.weight})  # norm, head: the dp sub-mesh

    def backward() -> None:
        seed = grid["dp"].get_local_rank()  # the ranks of a tp group see the same tokens
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
        nn.functional.cross_entropy(model(tokens).reshape(-1, VOCAB), tokens.reshape(-1)).backward()
        average_plain(model)  # the embedding: a plain copy on every rank

    groups = [{"name": "across_meshes", "match": ["embed.*", "blocks.0.up.*", "blocks.1.up.*", "norm.*"],
               "max_norm": 0.05}]
    return model, backward, groups


LAYOUTS = {"lora": lora_layout, "experts": experts_layout, "meshes": meshes_layout,
           "experts-undeclared": lambda world: experts_layout(world, declare=False)}


# --------------------------------------------------------------------------------------- measuring
def float64_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every gradient whole, in float64 (DTensors: full_tensor; plain experts: gathered over ep)."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        if name == "experts":  # this rank's experts: the ep group's put together
            parts = [torch.empty_like(grad) for _ in range(dist.get_world_size(model.gather_experts))]
            dist.all_gather(parts, grad.contiguous(), group=model.gather_experts)
            grad = torch.cat(parts)
        out[name] = grad.detach().double()
    return out


def norm64(grads: list[torch.Tensor], p: float) -> float:
    flat = torch.cat([g.flatten() for g in grads]).abs()
    return flat.max().item() if math.isinf(p) else flat.pow(p).sum().pow(1 / p).item()


def counted(fn: Callable[[], Any]) -> tuple[Any, int]:
    with CommDebugMode() as comm:
        out = fn()
    return out, comm.get_total_counts()


def torch_clip(params: list[torch.Tensor], p: float) -> str:
    """torch.nn.utils.clip_grad_norm_ (max_norm=inf: measures only): its norm, or the error it raised."""
    try:
        norm = torch.nn.utils.clip_grad_norm_(params, math.inf, norm_type=p)
        return f"{(norm.full_tensor() if isinstance(norm, DTensor) else norm).item():.9f}"
    except Exception as err:  # noqa: BLE001 - what torch does is the point
        return f"{type(err).__name__}: {str(err).split(', need')[0].splitlines()[0][:80]}"


def per_mesh(params: list[torch.Tensor], p: float) -> torch.Tensor:
    """accelerate's / transformers' workaround: torch's norm per mesh (plain tensors: one more group), combined."""
    by_mesh: dict[Any, list[torch.Tensor]] = defaultdict(list)
    for param in params:
        if param.grad is not None:
            by_mesh[param.grad.device_mesh if isinstance(param.grad, DTensor) else None].append(param.grad)
    norms = [get_total_norm(g, p) for g in by_mesh.values()]
    return torch.linalg.vector_norm(torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]), p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=list(LAYOUTS), default="lora")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)  # full_tensor's notes
    torch.manual_seed(0)
    world, rank = dist.get_world_size(), dist.get_rank()
    model, backward, groups = LAYOUTS[args.layout](world)
    backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = float64_grads(model)
    lines = [f"{args.layout} on {world} ranks: {len(params)} trainable tensors, "
             f"{sum(isinstance(p, DTensor) for p in params)} DTensors on "
             f"{len({(p.device_mesh.shape, tuple(p.device_mesh.mesh.flatten().tolist())) for p in params if isinstance(p, DTensor)})} "
             f"meshes, {sum(not isinstance(p, DTensor) for p in params)} plain"]
    for p in (1.0, 2.0, math.inf):
        clipper = distclip.GradClipper(model, {"norm_type": p, "comm_hook": False})
        report, collectives = counted(clipper.measure)
        exact = norm64(list(grads.values()), p)
        workaround, workaround_collectives = counted(lambda: per_mesh(params, p))
        lines.append(f"p={p:<4} distclip {report.total_norm.item():.9f} ({collectives} collective)  "
                     f"float64 {exact:.9f}  rel.err {abs(report.total_norm.item() - exact) / exact:.1e}")
        lines.append(f"         per-mesh workaround {workaround.item():.9f} ({workaround_collectives} collectives, "
                     f"rel.err {abs(workaround.item() - exact) / exact:.1e})  torch: {torch_clip(params, p)}")
    if args.layout == "meshes":  # without its plain tensor, torch still cannot span the meshes (pytorch #180346)
        lines.append(f"torch on the DTensors only: {torch_clip([p for p in params if isinstance(p, DTensor)], 2.0)}")
    config = {"max_norm": 1.0, "norm_type": 2.0, "groups": groups}
    report, collectives = counted(distclip.GradClipper(model, {**config, "comm_hook": False}).clip)
    members: dict[str, list[torch.Tensor]] = defaultdict(list)
    for name, grad in grads.items():
        group = next((g["name"] for g in groups if any(fnmatch.fnmatchcase(name, m) for m in g["match"])), "default")
        members[group].append(grad)
    lines.append(f"per group, p=2 ({collectives} collective): " + "  ".join(
        f"{g} {report.group_norms[g].item():.9f} (float64 {norm64(members[g], 2.0):.9f}, coef "
        f"{report.coefs[g].item():.4f})" for g in report.group_norms))
    if rank == 0:
        print("\n".join(lines), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
