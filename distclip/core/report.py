"""What one clip saw and did: :class:`ClipReport`, and its flat metrics (:meth:`ClipReport.to_metrics`)."""

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
        source: ``comm_hook`` when the norm was computed inside the gradient reduction, else ``post_backward``
            (which path ``comm_hook: auto`` chose, and why: the adapter's ``hook_status``).
        clip_counts: per group (in the order of ``group_norms``), on how many of the clipper's
            ``clip_steps`` clips so far it was clipped (int64, on the device; None outside a clipper).
        clip_steps: the number of clips ``clip_counts`` counts (this one included).
        row_coefs: with row-wise (``agc``) groups, the coefficient of every row (fp32, the
            :class:`~distclip.core.rowwise.RowPlan` order); their groups' ``coefs`` are the smallest of
            their rows' and their ``thresholds`` the ``clip_factor``. None without agc groups.
        nonfinite_streak: non-finite steps in a row that distclip skipped or zeroed, this one included
            (0 after a finite step; a loss-scale overflow neither counts nor ends a streak).
        spike_streak: steps in a row skipped as spikes (``skip_spikes``), this one included.
        nonfinite_params: on a non-finite step, the canonical names of the parameters holding a NaN or inf
            on some rank (model order; empty when every element is finite and the norm overflowed); None
            on a finite step, or where nothing was read (``nonfinite: ignore`` without ``skip_spikes``).
        nonfinite_ranks: the (global) ranks holding them; None as ``nonfinite_params``.
        nonfinite_where: each of ``nonfinite_params`` -> the ranks holding a non-finite value in it.
    """

    total_norm: torch.Tensor
    group_norms: dict[str, torch.Tensor]
    coefs: dict[str, torch.Tensor]
    thresholds: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: bool = False
    finite: torch.Tensor | None = None
    source: str = "post_backward"
    skip_reason: str | None = None
    row_coefs: torch.Tensor | None = None
    clip_counts: torch.Tensor | None = None
    clip_steps: int = 0
    nonfinite_streak: int = 0
    spike_streak: int = 0
    nonfinite_params: tuple[str, ...] | None = None
    nonfinite_ranks: tuple[int, ...] | None = None
    nonfinite_where: dict[str, tuple[int, ...]] | None = None

    @property
    def unit_coefs(self) -> torch.Tensor | None:
        """The earlier name of :attr:`row_coefs` (AGC's units are rows)."""
        return self.row_coefs

    def to_metrics(self) -> dict[str, float]:
        """The clip as flat, plainly named metrics (floats), as sinks and trackers write them.

        Keys: ``grad_norm`` (pre-clip total norm), ``skipped`` (0/1), ``nonfinite_streak`` and
        ``spike_streak`` (bad steps in a row), and per group
        ``grad_norm/<group>`` (pre-clip), ``clip_coef/<group>`` (the coefficient applied),
        ``clip_threshold/<group>``, ``clipped/<group>`` (1 when the threshold scaled the group down
        on an accepted step), ``nonfinite/<group>`` (1 when the group's reduced norm is NaN or inf)
        and ``clip_rate/<group>`` (the fraction of the run's clips so far that clipped the group).

        One host sync: everything is read from the device in one ``.tolist()``. The clipper never
        calls this on its own; its sinks do, on the one rank that writes, when a write is due.
        """
        names = list(self.group_norms)
        norms = torch.stack([self.group_norms[n] for n in names]).float()
        coefs = torch.stack([self.coefs[n] for n in names]).float().to(norms.device)
        families: list[tuple[str, torch.Tensor]] = [("grad_norm", norms), ("clip_coef", coefs)]
        if self.thresholds:
            thresholds = torch.stack([self.thresholds[n] for n in names]).float().to(norms.device)
            families.append(("clip_threshold", thresholds))
        finite = None if self.finite is None else self.finite.to(norms.device)
        families.append(("clipped", clipped_mask(coefs, finite, self.skipped).float()))
        families.append(("nonfinite", (~torch.isfinite(norms)).float()))
        if self.clip_counts is not None:
            families.append(("clip_rate", self.clip_counts.to(norms.device).double() / max(self.clip_steps, 1)))
        values = torch.cat([self.total_norm.reshape(1).double().to(norms.device),
                            *(v.double() for _, v in families)]).tolist()
        out = {"grad_norm": values[0], "skipped": float(self.skipped), "nonfinite_streak": float(self.nonfinite_streak),
               "spike_streak": float(self.spike_streak)}
        g = len(names)
        for i, (family, _) in enumerate(families):
            out.update({f"{family}/{name}": v for name, v in zip(names, values[1 + i * g : 1 + (i + 1) * g])})
        return out

    def details(self) -> dict[str, Any]:
        """What a bad step adds to a log record beyond the numbers: where its non-finite values are
        (``nonfinite_params``, ``nonfinite_ranks``, ``nonfinite_where``); empty on other steps. No device read."""
        if self.nonfinite_params is None:
            return {}
        return {"nonfinite_params": list(self.nonfinite_params), "nonfinite_ranks": list(self.nonfinite_ranks or ()),
                "nonfinite_where": {n: list(r) for n, r in (self.nonfinite_where or {}).items()}}

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


def clipped_mask(coefs: torch.Tensor, finite: torch.Tensor | None, skipped: bool) -> torch.Tensor:
    """Per group: whether its threshold scaled it down (coefficient < 1) on a step that was not skipped
    and had finite norms (a bool tensor, no host sync). A skipped or non-finite step clips no group."""
    mask = coefs < 1.0
    if finite is not None:
        mask = mask & finite
    return mask & False if skipped else mask
