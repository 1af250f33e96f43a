"""distclip on a torchtitan-style N-D layout on CPU (gloo): tensor + sequence parallel, FSDP2, pipeline.

    torchrun --nproc_per_node 4 launch/nd_example.py --layout 2d    # (dp=2, tp=2): TP/SP then fully_shard
    torchrun --nproc_per_node 4 launch/nd_example.py --layout 3d    # (pp=2, dp=1, tp=2): + 2 pipeline stages
    torchrun --nproc_per_node 8 launch/nd_example.py --layout 3d    # (pp=2, dp=2, tp=2)

The model is parallelised as torchtitan does (``parallelize_module`` with its TP/SP plan on
``mesh["tp"]``, then ``fully_shard`` on ``mesh["dp"]``; under ``3d`` the layers are split into two
pipeline stages that exchange activations by send/recv, and ``pipeline_group=mesh["pp"]``). Each
step prints, on rank 0, distclip's exact norms per group, the collectives its clip issued (one),
and, for comparison, torchtitan's recipe on the same gradients: torch's ``get_total_norm`` over the
DTensor gradients (``full_tensor``), plus an all-reduce of ``norm ** p`` over ``pp``.
"""

from __future__ import annotations

import argparse
import logging
import math
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

import distclip

VOCAB, DIM, SEQ, BATCH, LAYERS = 64, 32, 8, 4, 4
CONFIG = {
    "max_norm": 1.0,
    "norm_type": 2.0,
    "groups": [
        {"name": "embeddings", "match": ["tok_embeddings.*", "output.*"], "max_norm": 0.5},
        {"name": "norms", "match": ["*norm.*"], "max_norm": 0.1},  # the TP copies (SequenceParallel)
    ],
    "per_layer": {"depth": 2, "match": ["layers.*"], "max_norm": 0.3},  # one group per layer, all stages
    "comm_hook": True,  # measured inside FSDP's reduction here on CPU too (auto does that with NCCL on CUDA only)
}


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(DIM, 4 * DIM)
        self.w2 = nn.Linear(4 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.nn.functional.gelu(self.w1(x)))


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ffn_norm = nn.LayerNorm(DIM)
        self.feed_forward = FeedForward()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """torchtitan's module names (tok_embeddings, layers.N, norm, output); a pipeline stage keeps only
    its own parts, under the full model's names (``None`` for the others), as torchtitan's split does."""

    def __init__(self, first: bool = True, last: bool = True, layers: range = range(LAYERS)) -> None:
        super().__init__()
        torch.manual_seed(0)  # every rank and stage starts from the same full model
        full = [nn.Embedding(VOCAB, DIM), nn.ModuleDict({str(i): Layer() for i in range(LAYERS)}),
                nn.LayerNorm(DIM), nn.Linear(DIM, VOCAB)]
        self.tok_embeddings = full[0] if first else None
        self.layers = nn.ModuleDict({str(i): full[1][str(i)] for i in layers})
        self.norm, self.output = (full[2], full[3]) if last else (None, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tok_embeddings is not None:
            x = self.tok_embeddings(x)
        for layer in self.layers.values():
            x = layer(x)
        return self.output(self.norm(x)) if self.output is not None else x


def parallelize(model: Transformer, mesh) -> Transformer:
    """torchtitan's TP/SP plan on mesh["tp"], then fully_shard of each layer and the root on mesh["dp"]."""
    plan = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.output is not None:
        plan["norm"] = SequenceParallel()
        plan["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    parallelize_module(model, mesh["tp"], plan)
    for layer in model.layers.values():
        parallelize_module(layer, mesh["tp"], {
            "ffn_norm": SequenceParallel(),
            "feed_forward.w1": ColwiseParallel(input_layouts=Shard(1)),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        })
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model


def batch(step: int, dp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def forward_backward(model: Transformer, mesh, step: int, pipelined: bool) -> float:
    """One batch through the model (two stages exchanging activations under ``3d``); returns the loss."""
    tokens, targets = batch(step, mesh["dp"].get_local_rank())
    if not pipelined:
        loss = loss_of(model(tokens), targets)
        loss.backward()
        return loss.item()
    pp_rank = mesh["pp"].get_local_rank()
    peer = dist.get_global_rank(mesh["pp"].get_group(), 1 - pp_rank)
    if pp_rank == 0:
        out = model(tokens)  # this tp rank's sequence shard (SequenceParallel)
        dist.send(out.detach().contiguous(), peer)
        grad = torch.empty_like(out)
        dist.recv(grad, peer)
        out.backward(grad)
        return math.nan
    x = torch.empty(BATCH, SEQ // mesh["tp"].size(), DIM)
    dist.recv(x, peer)
    x.requires_grad_()
    loss = loss_of(model(x), targets)
    loss.backward()
    dist.send(x.grad.contiguous(), peer)
    return loss.item()


def torchtitan_norm(model: nn.Module, mesh, p: float, pipelined: bool) -> tuple[float, int]:
    """torchtitan's clip_grad_norm_ measurement: get_total_norm over the DTensor gradients, then over pp
    (the norm, and the collectives it issued)."""
    with CommDebugMode() as comm:
        total = torch.nn.utils.get_total_norm([q.grad for q in model.parameters() if q.grad is not None], p)
        total = total.full_tensor() if isinstance(total, DTensor) else total
        if pipelined:
            total = total ** p
            dist.all_reduce(total, group=mesh["pp"].get_group())
            total = total ** (1.0 / p)
    return total.item(), comm.get_total_counts()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", choices=["2d", "3d"], default="2d")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world = dist.get_world_size()
    pipelined = args.layout == "3d"
    if pipelined:
        mesh = init_device_mesh("cpu", (2, world // 4, 2), mesh_dim_names=("pp", "dp", "tp"))
        stage = mesh["pp"].get_local_rank()
        half = LAYERS // 2
        model = Transformer(first=stage == 0, last=stage == 1, layers=range(stage * half, (stage + 1) * half))
    else:
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        model = Transformer()
    parallelize(model, mesh)
    clipper = distclip.GradClipper(model, CONFIG, pipeline_group=mesh["pp"] if pipelined else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if dist.get_rank() == 0:
        print(f"mesh {dict(zip(mesh.mesh_dim_names, mesh.mesh.shape))}, groups {clipper.group_names}")
    for step in range(args.steps):
        loss = forward_backward(model, mesh, step, pipelined)
        theirs, their_collectives = torchtitan_norm(model, mesh, CONFIG["norm_type"], pipelined)  # before clipping
        with CommDebugMode() as comm:
            report = clipper.clip()
        collectives = comm.get_total_counts()
        losses = torch.tensor([loss if not math.isnan(loss) else -1.0])
        dist.all_reduce(losses, op=dist.ReduceOp.MAX)
        if dist.get_rank() == 0:
            groups = ", ".join(f"{k} {v.item():.5f}" for k, v in report.group_norms.items())
            print(f"step {step}: loss {losses.item():.4f}  distclip total {report.total_norm.item():.6f} "
                  f"({collectives} collective, {report.source});  torchtitan recipe {theirs:.6f} "
                  f"({their_collectives} collectives)\n    {groups}")
        optimizer.step()
        optimizer.zero_grad()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
