"""``kind: fixed``: each group's configured ``max_norm``, always."""

from __future__ import annotations

from typing import Any

import torch

from .base import EPS, ClipPolicy


class FixedPolicy(ClipPolicy):
    """Each group's ``max_norm`` (``inf``: measured, never clipped). Stateless."""

    kind = "fixed"
    learns = False

    def coefficients(self, group_norms: torch.Tensor, total_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._on(group_norms.device)
        thresholds = self._const["max_norm"]
        cached = getattr(self, "_fp32", None)
        if cached is None or cached[0] is not thresholds:  # the fp32 thresholds, once per device
            cached = self._fp32 = (thresholds, thresholds.float())
        # fp32 arithmetic, exactly torch's clip_grad_norm_ coefficient (widened to float64 exactly)
        return thresholds, torch.clamp(cached[1] / (group_norms.float() + EPS), max=1.0).double()

    def update(self, *_: Any) -> None:
        """Nothing to learn (any call shape, so callers of the older ``update(norms, finite)`` still work)."""
