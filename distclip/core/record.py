"""RECORD: what one clip saw and did, kept and shown: the report, the running counters, the sinks, the audit.

Nothing here reads the device on its own: counters stay on the device, a sink reads it only when
a write is due (on the one rank that writes), the audit only on the clips it is due.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..compat.pytorch import version
from .attribution import Attribution
from .audit import Applied, ClipAudit
from .contract import GradAdapter
from .counters import ClipCounters
from .decide import Decision
from .measure import Measurement
from .norms import SlotLayout, local_partials
from .report import ClipReport, clipped_mask
from .rowwise import RowPlan
from .sinks import MetricsLog

__all__ = ["Recorder"]


class Recorder:
    """The report, counters, sinks and audit of one clipper."""

    def __init__(self, adapter: GradAdapter, layout: SlotLayout, group_names: Sequence[str], rows: RowPlan | None,
                 counters: ClipCounters, log: MetricsLog, audit: ClipAudit | None):
        self.adapter = adapter
        self.layout = layout
        self.group_names = list(group_names)
        self.rows = rows
        self.counters = counters
        self.log = log
        self.audit = audit
        self._last_thresholds: tuple[torch.Tensor, int, dict[str, torch.Tensor]] | None = None

    def audit_before(self, step: int) -> tuple[ClipAudit | None, torch.Tensor | None]:
        """The audit when it is due at clip ``step``, and (when it measures) the partials before APPLY."""
        audit = self.audit if self.audit is not None and self.audit.due(step) else None
        before = self._applied_partials() if audit is not None and audit.measurable else None
        return audit, before

    def report(self, measured: Measurement, decision: Decision, applied: Applied | None,
               attribution: Attribution | None = None) -> ClipReport:
        """The report of this clip (``applied`` None: measured only); an applied clip is counted (on the device).
        ``attribution``: where a non-finite step's NaN / inf values are (None: not looked for)."""
        names = self.group_names
        report = ClipReport(
            total_norm=decision.total_norm.float(),
            group_norms=dict(zip(names, decision.group_norms.float())),
            coefs=dict(zip(names, decision.coefs)),
            thresholds=self._thresholds(decision.thresholds),
            skipped=decision.skipped,
            finite=decision.finite,
            source=measured.source,
            skip_reason=decision.skip_reason,
            row_coefs=decision.row_coefs,
            nonfinite_streak=decision.streaks[0],
            spike_streak=decision.streaks[1],
        )
        if attribution is not None:
            report.nonfinite_params, report.nonfinite_ranks = attribution.params, attribution.ranks
            report.nonfinite_where = dict(attribution.where)
        coefs = decision.coefs
        if applied is not None:  # running counts on the device: no host sync
            visible = coefs if coefs.shape[0] == len(names) else coefs[: len(names)]
            self.counters.update(clipped_mask(visible, decision.finite, decision.skipped))
        report.clip_counts, report.clip_steps = self.counters.current(coefs.device), self.counters.steps
        return report

    def _thresholds(self, thresholds: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per group, its threshold (fp32); converted once while the policy hands over the same, unchanged tensor
        (fixed thresholds), again after any in-place write to it (its version counter moves)."""
        cached = self._last_thresholds
        if cached is None or cached[0] is not thresholds or cached[1] != version(thresholds):
            cached = self._last_thresholds = (thresholds, version(thresholds),
                                              dict(zip(self.group_names, thresholds.float())))
        return dict(cached[2])

    def publish(self, report: ClipReport, decision: Decision, applied: Applied, step: int,
                audit: ClipAudit | None = None, before: torch.Tensor | None = None) -> None:
        """An applied clip to the sinks due at ``step``, and to the audit when it is due."""
        self.log.observe(report, step)  # reads the device only when a sink is due, on the rank that writes
        if audit is None:
            return
        visible = len(self.group_names)
        after = self._applied_partials() if audit.measures(applied) else None
        audited = decision.coefs[:visible]
        if self.rows is not None:  # row-wise groups: no single factor to measure (their rows agree by construction)
            audited = torch.where(self.rows.group_mask(audited.device)[:visible], math.nan, audited)
        audit.check(step, applied, audited, decision.thresholds[:visible], before if after is not None else None,
                    after, self.counters.streaks)

    def _applied_partials(self) -> torch.Tensor:
        """For the audit: this rank's slot partials over EVERY local gradient piece APPLY scales (replicas too,
        not only the counted ones), before or after APPLY. Only their ratio is used: no unscaling needed."""
        per_group = self.adapter.scaled_grads()
        tensors = [t for g in per_group for t in g]
        groups = [i for i, g in enumerate(per_group) for _ in g]
        return local_partials(tensors, groups, self.layout, self.adapter.collective_device(tensors))
