"""Small deterministic models and data shared by the tests (single-process and multi-rank)."""

from __future__ import annotations

import torch
from torch import nn

VOCAB, SEQ, DIM = 40, 6, 16


class TinyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.attn = nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.Tanh(), nn.Linear(2 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + torch.tanh(self.attn(self.norm(x)))
        return x + self.mlp(x)


class TinyNet(nn.Module):
    """Embedding -> blocks -> head. Names: embed.weight, blocks.N.{norm,attn,mlp.M}.*, head.*, tiny (2 elements)."""

    def __init__(self, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(TinyBlock() for _ in range(blocks))
        self.head = nn.Linear(DIM, VOCAB)
        self.tiny = nn.Parameter(torch.tensor([0.5, -0.25]))  # smaller than the world size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x * self.tiny.sum())


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, blocks: int = 2) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(blocks).to(dtype)


def batch(step: int, rank: int, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch at ``step``: different on every rank and step, reproducible anywhere."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, VOCAB, (size, SEQ), generator=g)
    targets = torch.randint(0, VOCAB, (size, SEQ), generator=g)
    return tokens, targets


def loss_fn(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    logits = model(tokens)
    return scale * nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def global_batch(step: int, world: int, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' batches concatenated: what one process sees for the same step."""
    parts = [batch(step, r, size) for r in range(world)]
    return torch.cat([t for t, _ in parts]), torch.cat([y for _, y in parts])
