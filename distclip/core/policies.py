"""Threshold policies: from the exact, reduced group norms to one threshold per group.

Policies see only reduced values (identical on every rank), so their state stays identical on
every rank with no extra communication. They run on device: no host synchronisation.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .config import FixedPolicySpec, PolicySpec
from .groups import ClipGroup


class ClipPolicy:
    """Base class: ``thresholds`` before clipping, ``update`` after; state in ``state_dict``."""

    def thresholds(self, group_norms: torch.Tensor) -> torch.Tensor:
        """Per-group thresholds (float64, same device as ``group_norms``)."""
        raise NotImplementedError

    def update(self, group_norms: torch.Tensor, finite: torch.Tensor) -> None:
        """Observe this step's reduced norms. Never fed a non-finite norm: callers mask with ``finite``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FixedPolicy(ClipPolicy):
    """Each group's configured ``max_norm``."""

    def __init__(self, groups: Sequence[ClipGroup]):
        self._max_norms = torch.tensor([g.max_norm for g in groups], dtype=torch.float64)

    def thresholds(self, group_norms: torch.Tensor) -> torch.Tensor:
        if self._max_norms.device != group_norms.device:
            self._max_norms = self._max_norms.to(group_norms.device)
        return self._max_norms


def build_policy(spec: PolicySpec, groups: Sequence[ClipGroup]) -> ClipPolicy:
    if isinstance(spec, FixedPolicySpec):
        return FixedPolicy(groups)
    raise TypeError(f"no policy implementation for {spec!r}")
