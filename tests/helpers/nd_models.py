"""Small models for the N-D parallelism tests, in the form the float64 reference runs them (one process).

``NDNet``: embedding -> blocks (LayerNorm, up, down) -> LayerNorm -> head, the shape torchtitan's
tensor-parallel plans address. ``MoENet``: embedding -> router + experts (one ``[E, D, D]``
weight) -> head. The distributed tests parallelise these very modules (or slices of their
weights), so that the reference and the ranks start from the same values. The parallel layouts of
these models (:func:`partial_tp_net`, :func:`sequence_parallel_net`, :class:`ExpertParallelMoE`) take
``mesh``: anything indexable by the dimension names they use ("dp", "tp", "ep"), so that the same
layout can be built on meshes made in different ways (sliced, flattened, unflattened).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from tests.helpers.nd_helpers import CopyToGroup, ReduceFromGroup

VOCAB, DIM, SEQ, BATCH, EXPERTS = 16, 8, 4, 2, 4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, 2 * DIM)
        self.down = nn.Linear(2 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(self.norm(x))))


class NDNet(nn.Module):
    """Names: embed.weight, blocks.N.{norm,up,down}.{weight,bias}, norm.*, head.*."""

    def __init__(self, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(blocks))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def make_net(dtype: torch.dtype = torch.float32, blocks: int = 2, seed: int = 0) -> NDNet:
    torch.manual_seed(seed)
    return NDNet(blocks).to(dtype)


class MoENet(nn.Module):
    """A softly routed mixture of experts: y = x + sum_e softmax(router(x))_e tanh(x W_e).

    ``expert_slice(w, first)`` lets a rank run only its own experts: ``w`` its local ``[E/ep, D, D]``
    weights, ``first`` the index of the first; the caller combines the ranks' outputs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.router = nn.Linear(DIM, EXPERTS)
        self.experts = nn.Parameter(torch.randn(EXPERTS, DIM, DIM) / DIM ** 0.5)
        self.head = nn.Linear(DIM, VOCAB)

    def gate_and_input(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(tokens)
        return x, torch.softmax(self.router(x), dim=-1)

    @staticmethod
    def mix(x: torch.Tensor, gate: torch.Tensor, weights: torch.Tensor, first: int) -> torch.Tensor:
        return sum(gate[..., first + k, None] * torch.tanh(x @ weights[k]) for k in range(weights.shape[0]))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x, gate = self.gate_and_input(tokens)
        return self.head(x + self.mix(x, gate, self.experts, 0))


def make_moe(dtype: torch.dtype = torch.float32, seed: int = 1) -> MoENet:
    torch.manual_seed(seed)
    return MoENet().to(dtype)


def data(step: int, replica: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-parallel replica ``replica``'s batch at ``step`` (the same on every rank of that replica)."""
    g = torch.Generator().manual_seed(100 * step + replica)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def global_data(step: int, replicas: int) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [data(step, r) for r in range(replicas)]
    return torch.cat([t for t, _ in parts]), torch.cat([y for _, y in parts])


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def reference_grads(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """float64 gradients of the mean loss over the whole batch, in one process."""
    model.zero_grad()
    cross_entropy(model(tokens), targets).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def split(t: torch.Tensor, parts: int, index: int, dim: int) -> torch.Tensor:
    return t.detach().chunk(parts, dim=dim)[index].clone()



# ------------------------------------------------------------------ parallel layouts
def partial_tp_net(mesh) -> nn.Module:
    """Blocks' up/down tensor parallel, each block then fully_shard over dp; the rest only over dp."""
    model = make_net()
    for block in model.blocks:
        parallelize_module(block, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model


def sequence_parallel_net(mesh) -> nn.Module:
    """torchtitan's plan: embedding row-parallel to Shard(1), SP norms, up/down Colwise/Rowwise over
    sequence shards, head Colwise to Replicate; then fully_shard over dp (``_StridedShard`` weights)."""
    model = make_net()
    parallelize_module(model, mesh["tp"], {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    })
    for block in model.blocks:
        parallelize_module(block, mesh["tp"], {
            "norm": SequenceParallel(),
            "up": ColwiseParallel(input_layouts=Shard(1)),
            "down": RowwiseParallel(output_layouts=Shard(1)),
        })
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model


class ExpertParallelMoE(nn.Module):
    """MoENet with its ``[E, D, D]`` expert weight a DTensor Shard(0) on mesh["ep"] (copies across dp).

    Every rank of an ep group sees the same tokens and runs its own experts; Megatron's f/g
    functions make the dense gradients identical across ep (real forward and backward).
    """

    def __init__(self, mesh) -> None:
        super().__init__()
        reference = make_moe()
        self.embed, self.router, self.head = reference.embed, reference.router, reference.head
        self.experts = nn.Parameter(distribute_tensor(reference.experts.detach(), mesh["ep"], [Shard(0)]))
        self.group = mesh["ep"].get_group()
        self.first = mesh["ep"].get_local_rank() * (EXPERTS // mesh["ep"].size())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x, gate = MoENet.gate_and_input(self, tokens)
        mine = MoENet.mix(CopyToGroup.apply(x, self.group), CopyToGroup.apply(gate, self.group),
                          self.experts.to_local(), self.first)
        return self.head(x + ReduceFromGroup.apply(mine, self.group))


# ------------------------------------------------------------------ pipeline stages of an NDNet
class NetStage(nn.Module):
    """Some consecutive parts of an NDNet, under the full model's names (as torchtitan's pipeline split)."""

    def __init__(self, full: nn.Module, blocks: list[int], first: bool, last: bool):
        super().__init__()
        self.embed = full.embed if first else None
        self.blocks = nn.ModuleDict({str(i): full.blocks[i] for i in blocks})
        self.norm, self.head = (full.norm, full.head) if last else (None, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        for block in self.blocks.values():
            x = block(x)
        return self.head(self.norm(x)) if self.head is not None else x


def split_net(num_stages: int, blocks: int) -> list[NetStage]:
    """Stage s holds blocks s * per .. (s+1) * per - 1; the first the embedding, the last norm and head."""
    full = make_net(blocks=blocks)
    per = blocks // num_stages
    return [NetStage(full, list(range(s * per, (s + 1) * per)), s == 0, s == num_stages - 1) for s in range(num_stages)]


def run_chunks(chunks: list[tuple[int, nn.Module]], num_stages: int, peer: Callable[[int], int],
               tokens: torch.Tensor, targets: torch.Tensor) -> None:
    """Forward then backward of one batch through ``num_stages`` stages, this rank running ``chunks``
    ((stage index, module)); activations and their gradients travel by send/recv to ``peer(stage)``."""
    held = dict(chunks)
    outputs: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    shape = (*tokens.shape, DIM)
    for s in range(num_stages):
        if s not in held:
            continue
        if s == 0:
            x = tokens
        else:
            x = torch.empty(shape)
            dist.recv(x, peer(s - 1))
            x.requires_grad_()
        out = held[s](x)
        if s + 1 < num_stages:
            dist.send(out.detach().contiguous(), peer(s + 1))
        outputs[s] = (out, x if s > 0 else None)
    for s in reversed(range(num_stages)):
        if s not in held:
            continue
        out, x = outputs[s]
        if s + 1 == num_stages:
            cross_entropy(out, targets).backward()
        else:
            grad = torch.empty_like(out)
            dist.recv(grad, peer(s + 1))
            out.backward(grad)
        if x is not None:
            dist.send(x.grad.contiguous(), peer(s - 1))
