"""Threshold policies: from the exact, reduced group norms to one threshold and coefficient per group.

Policies see only reduced values (identical on every rank), so their state stays identical on
every rank with no extra communication. They run on device: no host synchronisation.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch

from .config import FixedPolicySpec, PolicySpec
from .groups import ClipGroup

EPS = 1e-6  # torch's: coefficient = max_norm / (norm + 1e-6)


def torch_coefficients(thresholds: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """min(1, threshold / (norm + 1e-6)) computed in fp32 exactly as torch's clip_grad_norm_ does, as float64."""
    return torch.clamp(thresholds.float() / (norms.float() + EPS), max=1.0).double()


class ClipPolicy:
    """Base class: ``coefficients`` before clipping, ``update`` after; state in ``state_dict``."""

    kind: ClassVar[str] = "abstract"
    version: ClassVar[int] = 1

    def coefficients(self, group_norms: torch.Tensor, total_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(thresholds, coefficients), float64 per group; coefficient = min(1, threshold / (norm + 1e-6))."""
        raise NotImplementedError

    def update(self, group_norms: torch.Tensor, total_norm: torch.Tensor, coefs: torch.Tensor,
               accepted: torch.Tensor) -> None:
        """Learn from this step. ``accepted`` is False for a non-finite or skipped step: state must not change."""

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": self.version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FixedPolicy(ClipPolicy):
    """Each group's configured ``max_norm``."""

    kind = "fixed"

    def __init__(self, groups: Sequence[ClipGroup]):
        self._max_norms = torch.tensor([g.max_norm for g in groups], dtype=torch.float64)

    def coefficients(self, group_norms: torch.Tensor, total_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._max_norms.device != group_norms.device:
            self._max_norms = self._max_norms.to(group_norms.device)
        return self._max_norms, torch_coefficients(self._max_norms, group_norms)


def build_policy(spec: PolicySpec, groups: Sequence[ClipGroup]) -> ClipPolicy:
    if isinstance(spec, FixedPolicySpec):
        return FixedPolicy(groups)
    raise TypeError(f"no policy implementation for {spec!r}")
