"""DECIDE: from the reduced norms, the config and the policy state to what the clip does.

Everything here is a function of the reduced vector (identical on every rank), so every rank
takes the same decision without another collective: norms, thresholds and coefficients (policy),
whether the step is skipped (non-finite norm, spike) or left to a loss scaler (overflow), which
groups are multiplied at all, and then the policies learn from the step (their state is device
tensors, advanced with ``torch.where`` only where the step counts).

The one host read per clip happens here (the non-finite and spike flags with the coefficients,
one ``.tolist()``), except with ``nonfinite: ignore`` and no spike skipping, where nothing is read:
every coefficient multiplies, as in torch. The bad-step streaks (:class:`BadStepStreaks`) advance
from those flags, and a decision says when a streak has reached its limit (``stop``): the clipper
then raises on every rank at the same clip, after recording it.

Measured-only groups (``max_norm: null``) keep the coefficient 1 whatever their norm (a
non-finite one included) and are never multiplied.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from .counters import BadStepStreaks
from .measure import Measurement, SlotPlan
from .policies import PolicySet, SpikeDetector

__all__ = ["Decision", "Rules", "decide"]


@dataclass(frozen=True)
class Rules:
    """What a decision depends on besides the norms (fixed at set-up)."""

    nonfinite: str  # skip | error | zero | ignore
    norm_type: float
    group_names: tuple[str, ...]  # the visible groups, in slot order
    group_scaled: tuple[int, ...]  # visible groups multiplied by a group coefficient (not row-wise, not measured only)
    can_fold: bool = False  # a fused optimizer can take the coefficient (uniform clipping, attach)
    measured_only: tuple[bool, ...] = ()  # per group (hidden one included): never clipped (empty: none is)


@dataclass(frozen=True)
class Decision:
    """One clip's decision. ``action``: ``none`` (nothing to do, or measure only), ``scale``, ``fold`` (into
    a fused optimizer's ``grad_scale``), ``zero``, ``drop`` (skip: the gradients are dropped) or ``leave``
    (a loss-scale overflow the loss scaler skips by itself)."""

    group_norms: torch.Tensor  # float64 [G]
    total_norm: torch.Tensor  # float64, 0-dim
    thresholds: torch.Tensor  # float64 [G]
    coefs: torch.Tensor  # fp32 [G]: applied (zeros when the step is skipped or zeroed)
    row_coefs: torch.Tensor | None  # fp32 [U] for row-wise groups
    finite: torch.Tensor  # bool, 0-dim
    action: str = "none"
    groups: tuple[int, ...] = ()  # the groups the action touches
    host_coefs: list[float] | None = None  # the coefficients, read on the host (one foreach call for all groups)
    scale_rows: bool = False  # the row-wise coefficients multiply their rows
    skipped: bool = False
    skip_reason: str | None = None  # nonfinite | overflow | spike
    nonfinite_seen: bool = False  # the host has read that a norm is non-finite (what attribution runs on)
    # raise on every rank after recording: error (nonfinite: error), nonfinite or spike (streak)
    stop: str | None = None
    streaks: tuple[int, int] = (0, 0)  # non-finite steps, spike skips in a row (this clip included)


def decide(measured: Measurement, plan: SlotPlan, rules: Rules, policy: PolicySet, spikes: SpikeDetector | None,
           apply: bool, scaler_overflow: Callable[[], bool], streaks: BadStepStreaks | None = None) -> Decision:
    """The decision for ``measured`` (see the module docstring); with ``apply``, the policies learn from it
    and ``streaks`` advance.

    ``scaler_overflow()``: whether a non-finite norm is a loss-scale overflow that GradScaler or DeepSpeed
    skips by itself (asked only on a non-finite step). A non-finite norm under ``nonfinite: error``, or a
    streak at its limit, sets ``stop``: the caller raises on every rank (this function raises nothing, so
    that the step can be attributed and recorded first).
    """
    reduced = measured.slots
    group_norms = plan.layout.group_norms(reduced)
    total_norm = plan.layout.total_norm(reduced)
    thresholds, coefs = policy.coefficients(group_norms, total_norm)
    if rules.measured_only:  # never clipped: exactly 1, also when the norm is inf or NaN (inf / inf)
        coefs = torch.where(plan.layout.constant("measured_only", coefs.device, rules.measured_only, torch.bool),
                            1.0, coefs)
    # every slot finite (the row gradient sums hold the same elements as the group slots): x * 0 is 0 exactly
    # for finite x, NaN for inf and NaN (torch.isfinite costs four kernels: eq, abs, ne, and)
    finite = reduced.mul(0).eq_(0).all()
    row_coefs = None
    if plan.rows is not None:  # row-wise groups report their smallest row coefficient
        assert measured.row_slots is not None  # measured with the row plan: its row sums are there
        row_coefs = plan.rows.coefficients(measured.row_slots)
        coefs = torch.where(plan.rows.group_mask(coefs.device), plan.rows.group_minima(row_coefs), coefs)
        row_coefs = row_coefs.float()
    coefs = coefs.float()  # fp32 values (exact): what multiplies the gradients, as in torch
    spike = spikes.skip(group_norms, total_norm) if spikes is not None else None
    base: dict[str, Any] = dict(group_norms=group_norms, total_norm=total_norm, thresholds=thresholds, coefs=coefs,
                                row_coefs=row_coefs, finite=finite)
    if not apply:
        return Decision(**base)
    decision = _action(base, rules, plan, finite, spike, coefs, scaler_overflow)
    accepted = finite if spike is None else finite & ~spike  # what the policies may learn from
    policy.update(group_norms, total_norm, decision.coefs, accepted)
    if spikes is not None:
        spikes.update(group_norms, total_norm, decision.coefs, accepted)
    if streaks is None:
        return decision
    reached = streaks.advance(_streak_kind(decision))
    counts = (streaks.nonfinite, streaks.spike)
    if not reached and counts == decision.streaks:  # the usual step (no streak): no copy (replace costs ~9 us)
        return decision
    return replace(decision, stop=decision.stop or reached, streaks=counts)


def _streak_kind(decision: Decision) -> str | None:
    """What a clip counts as for the streaks: a non-finite step distclip skipped, zeroed or raised on, a spike
    skip, a loss-scale overflow (left to the scaler), or None (accepted)."""
    if decision.skip_reason == "overflow":
        return "overflow"
    if decision.skip_reason == "nonfinite" or decision.action == "zero":
        return "nonfinite"
    return "spike" if decision.skip_reason == "spike" else None


def _action(base: dict[str, Any], rules: Rules, plan: SlotPlan, finite: torch.Tensor, spike: torch.Tensor | None,
            coefs: torch.Tensor, scaler_overflow: Callable[[], bool]) -> Decision:
    visible = tuple(range(len(rules.group_names)))
    with_rows = plan.rows is not None
    if rules.nonfinite == "ignore" and spike is None:  # no host sync at all: always multiply, as torch
        if rules.can_fold:
            return Decision(**base, action="fold", groups=visible)
        return Decision(**base, action="scale", groups=rules.group_scaled, scale_rows=with_rows)
    # The one host sync: the non-finite and spike decisions, and which groups are clipped at all
    # (multiplying by exactly 1.0 changes nothing, so unclipped groups are not touched).
    flags = [finite.float().reshape(1), (spike if spike is not None else ~finite).float().reshape(1)]
    finite_flag, spike_flag, *host_coefs = torch.cat([*flags, coefs]).tolist()
    if finite_flag and spike_flag:  # a spike: skip the step, like a non-finite one
        return _skipped(base, "drop", "spike")
    if finite_flag:
        clipped = tuple(g for g in rules.group_scaled if host_coefs[g] < 1.0)
        rows_clipped = plan.rows is not None and any(host_coefs[g] < 1.0 for g in plan.rows.groups)
        if clipped and rules.can_fold:
            return Decision(**base, action="fold", groups=visible)
        if clipped or rows_clipped:
            return Decision(**base, action="scale", groups=clipped, host_coefs=host_coefs, scale_rows=rows_clipped)
        return Decision(**base)
    seen: dict[str, Any] = {"nonfinite_seen": True}
    if rules.nonfinite == "ignore":  # torch semantics, also with skip_spikes on
        return Decision(**base, action="scale", groups=rules.group_scaled, scale_rows=with_rows, **seen)
    if scaler_overflow():
        return _skipped(base, "leave", "overflow", **seen)
    if rules.nonfinite == "error":  # the gradients are left as they are; the caller raises
        return _skipped(base, "none", "nonfinite", stop="error", **seen)
    if rules.nonfinite == "zero":
        return Decision(**_zeroed(base), action="zero", groups=visible, **seen)
    return _skipped(base, "drop", "nonfinite", **seen)


def _zeroed(base: dict[str, Any]) -> dict[str, Any]:
    row_coefs = base["row_coefs"]
    return {**base, "coefs": torch.zeros_like(base["coefs"]),
            "row_coefs": None if row_coefs is None else torch.zeros_like(row_coefs)}


def _skipped(base: dict[str, Any], action: str, reason: str, **extra: Any) -> Decision:
    return Decision(**_zeroed(base), action=action, skipped=True, skip_reason=reason, **extra)
