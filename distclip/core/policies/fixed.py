"""``kind: fixed``: each group's configured ``max_norm``, always."""

from __future__ import annotations

from typing import Any

import torch

from .base import ClipPolicy, clip_coefficients


class FixedPolicy(ClipPolicy):
    """Each group's ``max_norm`` (``inf``: measured, never clipped). Stateless."""

    kind = "fixed"

    def coefficients(self, group_norms: torch.Tensor, total_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._on(group_norms.device)
        thresholds = self._const["max_norm"]
        return thresholds, clip_coefficients(thresholds, group_norms.to(torch.float64))

    def update(self, *_: Any) -> None:
        """Nothing to learn (any call shape, so callers of the older ``update(norms, finite)`` still work)."""
