"""MEASURE: this rank's partial norms, from its adapter, and the ONE collective that makes them global.

The adapter hands over the slot vector of the pieces this rank counts (computed inside the
gradient reduction when a hook is valid, else now); the loss scale the gradients still carry is
divided out; row-wise (``agc``) groups add their rows' sums; one all-reduce over the adapter's
reduce group gives the same float64 vector on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .contract import GradAdapter
from .norms import SlotLayout
from .reduce import reduce_slots
from .rowwise import RowPlan, SlotsWithRows

__all__ = ["Measurement", "SlotPlan", "measure"]


@dataclass(frozen=True)
class SlotPlan:
    """The slot layout a clipper measures into (fixed at set-up)."""

    layout: SlotLayout
    norm_type: float
    excluded: int | None = None  # the hidden group of parameters outside ``params=`` (never in a norm)
    rows: RowPlan | None = None  # row-wise (agc) groups' rows, reduced after the group slots
    with_rows: SlotsWithRows | None = None
    derived: frozenset[int] = frozenset()  # row-wise groups whose slot is the sum of their rows' slots


@dataclass(frozen=True)
class Measurement:
    """The reduced vector: identical on every rank."""

    slots: torch.Tensor  # float64 group slots
    row_slots: torch.Tensor | None  # float64 [gradient sums per row, parameter sums per row]; None without agc
    source: str  # "comm_hook" (measured inside the reduction), "post_backward", or "mixed" (pipeline stages)


def measure(adapter: GradAdapter, plan: SlotPlan, pending_scale: torch.Tensor | None = None) -> Measurement:
    """Local partials, unscaled, then ONE collective (``pending_scale``: a loss scale GradScaler has not
    divided out yet, for fused optimizers)."""
    partials, source = adapter.local_partials(plan.derived)
    if plan.excluded is not None:  # the hidden group is excluded from every norm
        keep = (float(g != plan.excluded) for g, _ in plan.layout.slots)  # read once, when the constant is built
        partials = partials * plan.layout.constant("visible", partials.device, keep, partials.dtype)
    scale = carried_scale(adapter, pending_scale)
    if scale is not None:
        partials = plan.layout.unscale(partials, scale)
    group = adapter.reduce_group
    if plan.rows is None:
        return Measurement(reduce_slots(partials, plan.layout, group), None, source)
    row_sums = adapter.row_partials().to(partials.device)
    if scale is not None:  # the gradient half carries the loss scale, the parameter half none
        row_sums = plan.rows.unscale(row_sums, scale)
    if source == "post_backward" and plan.derived:  # these groups were left out of the partials
        partials = plan.rows.add_group_sums(partials, row_sums, plan.derived, plan.norm_type)
    assert plan.with_rows is not None  # set with plan.rows
    reduced = reduce_slots(torch.cat([partials, row_sums]), plan.with_rows, group)
    slots, row_slots = reduced.split([plan.layout.num_slots, 2 * plan.rows.num_rows])
    return Measurement(slots, row_slots, source)


def carried_scale(adapter: GradAdapter, pending_scale: torch.Tensor | None) -> float | torch.Tensor | None:
    """The factor the counted pieces still carry (an fp16 loss scale not divided out yet); None when it is 1."""
    scale: float | torch.Tensor = adapter.grad_scale()
    if pending_scale is not None:
        scale = pending_scale * scale
    return None if isinstance(scale, float) and scale == 1.0 else scale
