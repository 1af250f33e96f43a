"""Plain module or parameters: gradients are rank-local, counted where they are (torch semantics)."""

from __future__ import annotations

import torch

from .base import GradAdapter


class PlainAdapter(GradAdapter):
    """Every local gradient counts; no collective (each rank clips its own gradients)."""

    kind = "plain"
    foldable = True

    def counted_pieces(self) -> tuple[list[torch.Tensor], list[int]]:
        grads = [p.grad for p in self.params]
        pieces = [g for g in grads if g is not None]
        if len(pieces) == len(grads):
            return pieces, self.group_of
        return pieces, [g for g, grad in zip(self.group_of, grads) if grad is not None]
