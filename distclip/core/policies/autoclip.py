"""``kind: autoclip``: AutoClip (Seetharaman et al. 2020, arXiv 2007.14469), as the ``autoclip`` package.

Per group: the threshold is the ``quantile`` of the last ``history_length`` pre-clip norms,
taken BEFORE this step's norm joins them (so the first step is not clipped), with linear
interpolation as ``torch.quantile``; then capped at the group's ``max_norm`` (``inf``: no cap,
as the package). The paper instead appends first and uses the 10th percentile.

On one group this is ``QuantileClip(global_threshold=True)``; on ``per_parameter`` groups it is
the package's default per-parameter mode. History is a ring buffer of ``history_length``
float64 norms per group (``8 * history_length`` bytes each).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..config import AutoClipPolicySpec
from ..groups import ClipGroup
from .base import ClipPolicy, clip_coefficients

F64 = torch.float64


class AutoClipPolicy(ClipPolicy):
    kind = "autoclip"

    def __init__(self, spec: AutoClipPolicySpec, groups: Sequence[ClipGroup]):
        L = spec.history_length
        state = {
            "history": torch.zeros(len(groups), L, dtype=F64),  # ring buffer, slot = step % L
            "count": torch.zeros((), dtype=torch.int64),  # norms recorded so far (all time)
        }
        super().__init__(spec, groups, state, const={"slots": torch.arange(L)})

    def _quantiles(self, st: dict[str, torch.Tensor]) -> torch.Tensor:
        """``torch.quantile(history, q)`` per group over the filled part of the ring; inf when empty."""
        L, q = self.spec.history_length, self.spec.quantile
        filled = st["count"].clamp(max=L)
        ordered = torch.where(self._const["slots"] < filled, st["history"], math.inf).sort(dim=1).values
        rank = q * (filled - 1).to(F64)  # as torch.quantile: q * (n - 1), lerp between its neighbours
        below = rank.floor().clamp(min=0).long().reshape(1)
        above = rank.ceil().clamp(min=0).long().reshape(1)
        low = ordered.index_select(1, below).squeeze(1)
        high = ordered.index_select(1, above).squeeze(1)
        value = torch.lerp(low, high, rank - below.to(F64))
        return torch.where(filled > 0, value, math.inf)

    def coefficients(self, group_norms: torch.Tensor, total_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        st = self._on(group_norms.device)
        norms = group_norms.to(F64)
        thresholds = torch.minimum(self._quantiles(st), self._const["max_norm"])
        return thresholds, clip_coefficients(thresholds, norms)

    def update(
        self, group_norms: torch.Tensor, total_norm: torch.Tensor, coefs: torch.Tensor, accepted: torch.Tensor
    ) -> None:
        st = self._on(group_norms.device)
        norms = group_norms.to(F64)
        ok = self._usable(norms, accepted)
        slot = (st["count"] % self.spec.history_length).reshape(1)
        kept = st["history"].index_select(1, slot).squeeze(1)
        # In place, O(G): the slot gets the norm, or its own old value back when the step does not count.
        st["history"].index_copy_(1, slot, torch.where(ok, norms, kept).unsqueeze(1))
        st["count"] = st["count"] + ok.long()
