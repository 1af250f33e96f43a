"""What one clip saw and did: :class:`ClipReport`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ClipReport:
    """What one clip saw and did. Tensors are fp32, identical on every rank, never DTensors.

    Attributes:
        total_norm: pre-clip global norm over every group, in the config's ``norm_type``.
        group_norms: pre-clip norm of each group, in the group's own ``norm_type``.
        coefs: coefficient applied to each group's gradients (0 when the step was skipped or zeroed).
        thresholds: the threshold each group was clipped to.
        skipped: the optimizer step was dropped (``skip_reason`` says why).
        skip_reason: None, ``nonfinite`` (``nonfinite: skip``), ``overflow`` (a loss-scale overflow
            that GradScaler / DeepSpeed skip themselves) or ``spike`` (``skip_spikes``).
        finite: whether every norm was finite (a bool tensor: reading it syncs with the device).
        source: ``comm_hook`` when the norm was computed inside the gradient reduction, else ``post_backward``.
        unit_coefs: with unit-wise (``agc``) groups, the coefficient of every unit (fp32, the
            :class:`~distclip.core.unitwise.UnitPlan` order); their groups' ``coefs`` are the smallest of
            their units' and their ``thresholds`` the ``clip_factor``. None without agc groups.
    """

    total_norm: torch.Tensor
    group_norms: dict[str, torch.Tensor]
    coefs: dict[str, torch.Tensor]
    thresholds: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: bool = False
    finite: torch.Tensor | None = None
    source: str = "post_backward"
    skip_reason: str | None = None
    unit_coefs: torch.Tensor | None = None

    def to_floats(self) -> dict[str, Any]:
        """Plain Python numbers for logging (one host sync)."""
        names = list(self.group_norms)
        values = torch.stack([self.total_norm.float().reshape(()), *(self.group_norms[n] for n in names),
                              *(self.coefs[n] for n in names)]).tolist()
        g = len(names)
        return {
            "total_norm": values[0],
            "group_norms": dict(zip(names, values[1 : 1 + g])),
            "coefs": dict(zip(names, values[1 + g :])),
            "skipped": self.skipped,
        }

    def __str__(self) -> str:
        f = self.to_floats()
        groups = " ".join(f"{k}={v:.4g}(x{f['coefs'][k]:.3g})" for k, v in f["group_norms"].items())
        return f"norm={f['total_norm']:.6g} {groups}" + (f" SKIPPED ({self.skip_reason})" if self.skipped else "")
