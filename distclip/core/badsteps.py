"""The errors a bad step stops a run with: ``nonfinite: error``, and a streak of bad steps at its limit.

Raised by the clipper on every rank at the same clip (the decision is taken on the reduced norms),
after the step was attributed (which parameters and ranks hold the NaN / inf) and recorded (the
report, the counters, the sinks), so the last line of a clip log is the step that stopped the run.
Reading the norms for the message is a host read on that one step only.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ..errors import BadStepError, NonFiniteGradientError, SpikeStreakError
from .attribution import Attribution
from .decide import Decision

__all__ = ["stop_error"]


def stop_error(decision: Decision, group_names: Sequence[str], norm_type: float, limits: tuple[int | None, int | None],
               attribution: Attribution | None, step: int) -> BadStepError:
    """The error for a decision whose ``stop`` is set (``error``, ``nonfinite`` or ``spike``)."""
    norms = dict(zip(group_names, decision.group_norms.tolist()))
    found: dict[str, Any] = {}
    if attribution:
        found = dict(nonfinite_params=attribution.params, nonfinite_ranks=attribution.ranks)
    where = f" {attribution.describe()}" if attribution is not None else ""
    bad = {n: v for n, v in norms.items() if not math.isfinite(v)}
    if decision.stop == "error":
        return NonFiniteGradientError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            f"clipped. distclip (clip {step}): non-finite group norm(s) {bad} with nonfinite='error' (the same on "
            f"every rank).{where} To drop such steps use nonfinite='skip' (with max_consecutive: N to stop after N "
            "in a row); to scale the gradients by the non-finite norm anyway, as torch does with "
            "`error_if_nonfinite=False`, use nonfinite='ignore'.",
            streak=decision.streaks[0], **found)
    if decision.stop == "nonfinite":
        streak, limit = decision.streaks[0], limits[0]
        done = "zeroed" if decision.action == "zero" else "skipped"
        return NonFiniteGradientError(
            f"distclip: {streak} non-finite steps in a row (clips {step - streak + 1} to {step}, all {done}), "
            f"nonfinite.max_consecutive = {limit}: the run is not recovering by itself. This step: non-finite group "
            f"norm(s) {bad}.{where} Restart from a checkpoint with a lower learning rate or a look at that data; "
            "raise max_consecutive (or drop it) to keep going.",
            streak=streak, **found)
    streak, limit = decision.streaks[1], limits[1]
    total = float(decision.total_norm)
    return SpikeStreakError(
        f"distclip: {streak} steps in a row skipped as spikes (clips {step - streak + 1} to {step}), "
        f"skip_spikes.max_consecutive = {limit}: the gradient norm has moved to a new level (total norm now "
        f"{total:.6g}; group norms {({n: round(v, 6) for n, v in norms.items()})}) and every step is skipped against "
        "the window of accepted ones. Raise skip_spikes.sigma_factor or max_consecutive, or restart from a "
        "checkpoint.", streak=streak, **found)
