"""Plain module or parameters: gradients are rank-local, counted where they are (torch semantics)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from .base import GradAdapter
from .declared import declared_groups


class PlainAdapter(GradAdapter):
    """Every local gradient counts; no collective (each rank clips its own gradients, as torch).

    With :func:`distclip.declare` d parameters (hand-written tensor parallelism), the declared copies
    are counted once and the norm is reduced over the world.
    """

    kind = "plain"
    foldable = True

    def __init__(self, named_params: Sequence[tuple[str, torch.Tensor]]):
        super().__init__(named_params)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if self.whole_params_with_declarations(None, frozenset({rank})):
            self.reduce_group = dist.group.WORLD

    def stage_size(self) -> int:
        """1, times the declared groups (a grid: e.g. tp, or tp x ep)."""
        return math.prod(len(g) for g in declared_groups(self.declarations))
