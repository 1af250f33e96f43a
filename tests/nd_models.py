"""Small models for the N-D parallelism tests, in the form the float64 reference runs them (one process).

``NDNet``: embedding -> blocks (LayerNorm, up, down) -> LayerNorm -> head, the shape torchtitan's
tensor-parallel plans address. ``MoENet``: embedding -> router + experts (one ``[E, D, D]``
weight) -> head. The distributed tests parallelise these very modules (or slices of their
weights), so that the reference and the ranks start from the same values.
"""

from __future__ import annotations

import torch
from torch import nn

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

