"""``skip_spikes``: skip a step whose total norm is a spike against the recent accepted steps.

As OLMo-core's skip-step optimizer: the step is skipped when
``total_norm - mean > sigma_factor * std`` over the last ``window`` ACCEPTED total norms (``std``
with Bessel's correction, as ``torch.std_mean``), once ``min_observations`` of them exist.
Skipped and non-finite steps never enter the window, so one spike cannot widen the band for
the next. A non-finite norm is not a "spike" here: it is the clipper's ``nonfinite`` setting.
Composable with any policy; the decision is a 0-dim bool tensor (no host sync).
"""

from __future__ import annotations

import torch

from ..config import SkipSpikesSpec
from .base import Stateful

F64 = torch.float64


class SpikeDetector(Stateful):
    """``skip(group_norms, total_norm)`` before the step, ``update(...)`` after (the policy contract)."""

    kind = "skip_spikes"

    def __init__(self, spec: SkipSpikesSpec):
        self.spec = spec
        state = {
            "window": torch.zeros(spec.window, dtype=F64),  # ring buffer of accepted total norms
            "count": torch.zeros((), dtype=torch.int64),  # accepted norms so far (all time)
        }
        super().__init__(None, state, const={"slots": torch.arange(spec.window)})

    def skip(self, group_norms: torch.Tensor, total_norm: torch.Tensor) -> torch.Tensor:
        """0-dim bool on ``total_norm``'s device: True when this step's total norm is a spike."""
        st = self._on(total_norm.device)
        x = total_norm.to(F64)
        n = st["count"].clamp(max=self.spec.window)
        filled = self._const["slots"] < n
        mean = torch.where(filled, st["window"], 0.0).sum() / n.clamp(min=1)
        var = torch.where(filled, (st["window"] - mean) ** 2, 0.0).sum() / (n - 1).clamp(min=1)
        exceeds = (x - mean) > self.spec.sigma_factor * var.sqrt()
        return exceeds & (n >= self.spec.min_observations) & torch.isfinite(x)

    def update(
        self, group_norms: torch.Tensor, total_norm: torch.Tensor, coefs: torch.Tensor, accepted: torch.Tensor
    ) -> None:
        """Record the total norm of an accepted, finite step; anything else leaves the state bitwise unchanged."""
        st = self._on(total_norm.device)
        x = total_norm.to(F64).reshape(1)
        ok = accepted.to(x.device) & torch.isfinite(x).all()
        slot = (st["count"] % self.spec.window).reshape(1)
        st["window"].index_copy_(0, slot, torch.where(ok, x, st["window"].index_select(0, slot)))
        st["count"] = st["count"] + ok.long()
