"""``kind: agc``: adaptive gradient clipping (Brock et al. 2021, NFNets, arXiv 2102.06171), row-wise.

AGC has no group threshold: each row of each parameter is clipped against that
parameter's own row norm, by :mod:`distclip.core.rowwise`. This policy only answers the group
contract: its groups' thresholds are ``clip_factor`` (what is reported) and their group
coefficients 1 (the groups are never scaled as a whole); the clipper reports as each group's
coefficient the smallest coefficient of its rows. Stateless.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..config import AGCPolicySpec
from ..groups import ClipGroup
from .base import ClipPolicy


class AGCPolicy(ClipPolicy):
    kind = "agc"
    rowwise = True  # the clipper clips these groups row-wise, never by a group coefficient
    learns = False

    def __init__(self, spec: AGCPolicySpec, groups: Sequence[ClipGroup]):
        super().__init__(spec, groups, const={"clip_factor": torch.full((len(groups),), spec.clip_factor,
                                                                         dtype=torch.float64)})

    def coefficients(self, group_norms: torch.Tensor, total_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._on(group_norms.device)
        thresholds = self._const["clip_factor"]
        return thresholds, torch.ones_like(thresholds)

    def update(self, *_: Any) -> None:
        """Nothing to learn."""
