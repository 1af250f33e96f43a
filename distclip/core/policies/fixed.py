"""``kind: fixed``: each group's configured ``max_norm``, always."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..groups import ClipGroup
from .base import EPS, ClipPolicy


class FixedPolicy(ClipPolicy):
    """Each group's ``max_norm`` (``inf``: measured, never clipped). Stateless."""

    kind = "fixed"
    learns = False

    def __init__(self, spec: Any, groups: Sequence[ClipGroup]):
        super().__init__(spec, groups)
        self._const["max_norm_fp32"] = self._const["max_norm"].float()  # moves with the other constants

    def coefficients(self, group_norms: torch.Tensor, total_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._on(group_norms.device)
        # fp32 arithmetic, exactly torch's clip_grad_norm_ coefficient (widened to float64 exactly)
        coefs = torch.clamp(self._const["max_norm_fp32"] / (group_norms.float() + EPS), max=1.0).double()
        return self._const["max_norm"], coefs

    def update(self, *_: Any) -> None:
        """Nothing to learn (any call shape, so callers of the older ``update(norms, finite)`` still work)."""
