"""``kind: zclip``: ZClip (Kumar et al. 2025, arXiv 2504.02507), per group.

Same trajectory as the ``zclip`` package's ``ZClip.step`` on the same norms:

- warm-up: the first ``warmup_steps`` accepted norms are recorded and clipped at ``max_norm``
  only; after the last of them, mean = their mean and var = their population variance;
- then ``z = (g - mean) / (std + eps)``; a spike is ``z > z_thresh`` (``zscore`` mode) or
  ``g > mean + z_thresh * std`` (``percentile`` mode). The spike's clip value is
  ``(mean + z_thresh * std / (z / z_thresh)) * clip_factor`` (``adaptive_scaling``), ``mean``
  (``mean``) or ``mean + z_thresh * std`` (``percentile``); no spike: no adaptive threshold;
- the threshold is that clip value capped at the group's ``max_norm`` (``inf``: no cap);
- the EMA is fed the clip value on a spike (before the cap), else the norm:
  ``mean <- a mean + (1-a) x``, ``var <- a var + (1-a) (x - mean_new)^2``; with
  ``skip_update_on_spike`` a spike leaves the EMA alone.

Differences from the package: only accepted, finite steps count (warm-up included), where the
package would record a NaN norm; and a norm just below its cap (within 1e-6) gets torch's
coefficient ``cap / (norm + 1e-6)`` where the package leaves it at 1. When no spike is found
the reported threshold is the cap (``inf`` without one), not the norm itself.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..config import ZClipPolicySpec
from ..groups import ClipGroup
from .base import ClipPolicy, clip_coefficients

F64 = torch.float64


class ZClipPolicy(ClipPolicy):
    kind = "zclip"

    def __init__(self, spec: ZClipPolicySpec, groups: Sequence[ClipGroup]):
        G, W = len(groups), spec.warmup_steps
        state = {
            "warmup": torch.zeros(G, W, dtype=F64),  # the warm-up norms (fixed size: warmup_steps)
            "count": torch.zeros((), dtype=torch.int64),  # warm-up norms recorded so far (stops at W)
            "mean": torch.zeros(G, dtype=F64),
            "var": torch.zeros(G, dtype=F64),
        }
        super().__init__(spec, groups, state)

    def _spikes(self, norms: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group: whether this norm is a spike, and the clip value if it is (the package's ``clip_val``)."""
        s = self.spec
        std = var.sqrt()
        if s.mode == "percentile":
            clip_val = mean + s.z_thresh * std
            return norms > clip_val, clip_val
        z = (norms - mean) / (std + s.eps)
        if s.clip_option == "mean":
            return z > s.z_thresh, mean
        eta = z / s.z_thresh  # the larger the outlier, the lower the threshold
        return z > s.z_thresh, (mean + (s.z_thresh * std) / eta) * s.clip_factor

    def coefficients(self, group_norms: torch.Tensor, total_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        st = self._on(group_norms.device)
        norms = group_norms.to(F64)
        cap = self._const["max_norm"]
        spike, clip_val = self._spikes(norms, st["mean"], st["var"])
        adaptive = torch.minimum(torch.where(spike, clip_val, math.inf), cap)
        thresholds = torch.where(st["count"] >= self.spec.warmup_steps, adaptive, cap)
        return thresholds, clip_coefficients(thresholds, norms)

    def update(
        self, group_norms: torch.Tensor, total_norm: torch.Tensor, coefs: torch.Tensor, accepted: torch.Tensor
    ) -> None:
        st = self._on(group_norms.device)
        norms = group_norms.to(F64)
        W, alpha = self.spec.warmup_steps, self.spec.alpha
        ok = self._usable(norms, accepted)
        count = st["count"]
        warming = count < W

        # Warm-up: record the norm in column ``count``; the last one initialises mean and var.
        record = ok & warming
        column = count.clamp(max=W - 1).reshape(1)
        kept = st["warmup"].index_select(1, column).squeeze(1)
        warmup = st["warmup"].index_copy(1, column, torch.where(record, norms, kept).unsqueeze(1))
        first_mean = warmup.mean(dim=1)
        first_var = (warmup - first_mean.unsqueeze(1)).pow(2).mean(dim=1)
        starts = record & (count == W - 1)

        # After warm-up: EMA of the clipped value.
        mean, var = st["mean"], st["var"]
        spike, clip_val = self._spikes(norms, mean, var)
        x = torch.where(spike, clip_val, norms)
        new_mean = alpha * mean + (1 - alpha) * x
        new_var = alpha * var + (1 - alpha) * (x - new_mean) ** 2
        learns = ok & ~warming
        if self.spec.skip_update_on_spike:
            learns = learns & ~spike

        self._commit(record, warmup=warmup, count=count + 1)
        self._commit(starts, mean=first_mean, var=first_var)
        self._commit(learns, mean=new_mean, var=new_var)
