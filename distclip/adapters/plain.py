"""Plain module or parameters: gradients are rank-local, counted where they are (torch semantics)."""

from __future__ import annotations

import torch

from .base import GradAdapter


class PlainAdapter(GradAdapter):
    """Every local gradient counts; no collective (each rank clips its own gradients)."""

    kind = "plain"

    def counted_pieces(self) -> tuple[list[torch.Tensor], list[int]]:
        pieces, groups = [], []
        for p, g in zip(self.params, self.group_of):
            if p.grad is not None:
                pieces.append(p.grad)
                groups.append(g)
        return pieces, groups
