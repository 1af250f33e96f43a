"""Plain module or parameters: gradients are rank-local, counted where they are (torch semantics)."""

from __future__ import annotations

from typing import Sequence

import torch

from .base import GradAdapter
from .counting import LocalPiece


class PlainAdapter(GradAdapter):
    """Every local gradient counts; no collective (each rank clips its own gradients)."""

    kind = "plain"
    foldable = True

    def __init__(self, named_params: Sequence[tuple[str, torch.nn.Parameter]]):
        super().__init__(named_params)
        self.pieces = [LocalPiece(i, 0, p.numel(), i) for i, p in enumerate(self.params)]
