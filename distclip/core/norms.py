"""Local partial norms: per clip group, sum |g|^p (or max |g| for p = inf) over this rank's pieces.

The partials go into a fixed-length float64 vector of *slots* that one collective reduces.
A slot is (group, p): each group has a slot in its own p, and, when that differs from the
config's p, a second slot in the config's p so that the total norm is exact too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from itertools import repeat
from operator import attrgetter, is_
from typing import Hashable, Iterable, Sequence

import torch

from ..compat.pytorch import group_tensors_by_device_and_dtype
from .groups import ClipGroup
from .kernels import power_sums

ACC_DTYPE = torch.float64  # dtype of the slot vector and of the cross-rank reduction


@dataclass(frozen=True)
class SlotLayout:
    """Which (group, p) partials are computed, in which fixed order, and how each is reduced."""

    group_norm_types: tuple[float, ...]
    total_norm_type: float
    slots: tuple[tuple[int, float], ...]  # (group index, p)
    in_total: tuple[bool, ...] = ()  # per group: whether it enters the total norm (empty: all do)
    _constants: dict[Hashable, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, groups: Sequence[ClipGroup], total_norm_type: float) -> "SlotLayout":
        slots = [(g, total_norm_type) for g in range(len(groups))]
        slots += [(g, grp.norm_type) for g, grp in enumerate(groups) if grp.norm_type != total_norm_type]
        in_total = tuple(grp.in_total for grp in groups)
        return cls(tuple(g.norm_type for g in groups), total_norm_type, tuple(slots), () if all(in_total) else in_total)

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    @property
    def num_groups(self) -> int:
        return len(self.group_norm_types)

    @cached_property
    def uses_max(self) -> tuple[bool, ...]:
        """Per slot: reduced with MAX (p = inf) rather than SUM."""
        return tuple(math.isinf(p) for _, p in self.slots)

    @cached_property
    def any_max(self) -> bool:
        return any(self.uses_max)

    @cached_property
    def all_max(self) -> bool:
        return all(self.uses_max)

    @cached_property
    def passes(self) -> list[tuple[float, list[int]]]:
        """For each distinct p: the slot of every group in that p (-1 where the group has none)."""
        out = []
        for p in dict.fromkeys(p for _, p in self.slots):
            slot_of_group = [-1] * self.num_groups
            for s, (g, q) in enumerate(self.slots):
                if q == p:
                    slot_of_group[g] = s
            out.append((p, slot_of_group))
        return out

    def constant(self, name: str, device: torch.device, values: Iterable[float | int | bool],
                 dtype: torch.dtype) -> torch.Tensor:
        """A device constant of this layout, built once per device (never on the per-step path: ``values`` may be
        a generator, read only then)."""
        key = (name, device)
        cached = self._constants.get(key)
        if cached is None:
            cached = self._constants[key] = torch.tensor(list(values), dtype=dtype, device=device)
        return cached

    def slot_index(self, ids: Sequence[int], device: torch.device) -> torch.Tensor:
        """The slot of each of a list of pieces as a device index, cached by the list (a plan's pieces repeat
        every step)."""
        key = ("index", device, tuple(ids))
        cached = self._constants.get(key)
        if cached is None:
            if len(self._constants) > 256:  # bounded: plans change rarely; drop stale ones
                self._constants.clear()
            cached = self._constants[key] = torch.tensor(key[2], dtype=torch.long, device=device)
        return cached

    @cached_property
    def group_slots(self) -> tuple[int, ...]:
        """The slot of each group in its own p."""
        position = {slot: s for s, slot in enumerate(self.slots)}
        return tuple(position[(g, p)] for g, p in enumerate(self.group_norm_types))

    def group_norms(self, reduced: torch.Tensor) -> torch.Tensor:
        """Per-group norms (float64) from the reduced slot vector, each in its group's p."""
        p = self.constant("group_p", reduced.device, self.group_norm_types, ACC_DTYPE)
        if self.group_slots == tuple(range(self.num_groups)):  # every group in the config's p: the first slots
            values = reduced if reduced.numel() == self.num_groups else reduced[: self.num_groups]
        else:
            values = reduced.index_select(0, self.constant("group_slots", reduced.device, self.group_slots, torch.long))
        if not any(math.isinf(q) for q in self.group_norm_types):  # _root without the inf branch: the same values
            inverse = self._constants.get(("group_inverse_p", reduced.device))
            if inverse is None:
                inverse = self._constants[("group_inverse_p", reduced.device)] = 1.0 / p
            return values.pow(inverse)
        return _root(values, p)

    def unscale(self, partials: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
        """Partials of gradients that still carry a factor ``scale`` (e.g. an fp16 loss scale), divided out.

        A p-slot holds sum |s g|^p = s^p sum |g|^p, an infinity slot max |s g| = s max |g|. Exact
        in float64 when ``scale`` is a power of two (dynamic loss scales are). No host sync.
        """
        s = scale.to(partials.device, ACC_DTYPE) if isinstance(scale, torch.Tensor) else scale
        p = self.constant("slot_p", partials.device, (q for _, q in self.slots), ACC_DTYPE)
        return partials / torch.where(torch.isinf(p), s, torch.pow(s, p))

    def max_mask(self, device: torch.device) -> torch.Tensor:
        """Per slot, whether it is reduced with MAX (a device constant)."""
        return self.constant("uses_max", device, self.uses_max, torch.bool)

    def total_norm(self, reduced: torch.Tensor) -> torch.Tensor:
        """The global norm (float64) in the config's p over every group in the total (``in_total``): a group
        left out adds nothing to it (a mask, not an index: the same ops, no sync)."""
        values = reduced if reduced.numel() == self.num_groups else reduced[: self.num_groups]
        if self.in_total:
            values = torch.where(self.constant("in_total", values.device, self.in_total, torch.bool), values, 0.0)
        p = self.total_norm_type
        if math.isinf(p):
            return values.max() if values.numel() else values.new_zeros(())
        return values.sum().pow(1.0 / p)


def _root(values: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """values^(1/p) for finite p; values as they are for p = inf."""
    return torch.where(torch.isinf(p), values, values.pow(1.0 / p))


def local_partials(
    tensors: Sequence[torch.Tensor],
    group_ids: Sequence[int],
    layout: SlotLayout,
    device: torch.device,
) -> torch.Tensor:
    """The slot vector of this rank's pieces: sum |t|^p per slot (max |t| for p = inf).

    One ``power_sums`` per (p, device, dtype) and one scatter into the slots: linear in the number
    of tensors, independent of the number of groups, no host synchronisation. Empty tensors
    contribute nothing.
    """
    if not tensors:
        return torch.zeros(layout.num_slots, dtype=ACC_DTYPE, device=device)
    out = None  # the first contribution is the vector itself (0 + x is x: nothing to add)
    for pass_index, (p, slot_of_group) in enumerate(layout.passes):
        if pass_index == 0:  # the config's p: slot g is group g, for every group
            chosen, slot_ids = tensors, group_ids
        else:  # a p that only some groups use
            picked = [(t, slot_of_group[g]) for t, g in zip(tensors, group_ids) if slot_of_group[g] >= 0]
            chosen, slot_ids = [t for t, _ in picked], [s for _, s in picked]
        if not chosen:
            continue
        for same_kind, ids in _by_device_and_dtype(chosen, slot_ids):
            values = power_sums(same_kind, p)  # float64: sum |t|^p, or max |t| for p = inf
            index = layout.slot_index(ids, values.device)
            contrib = torch.zeros(layout.num_slots, dtype=ACC_DTYPE, device=values.device)
            if math.isinf(p):
                contrib.scatter_reduce_(0, index, values, reduce="amax")
                if out is None:
                    out = torch.zeros(layout.num_slots, dtype=ACC_DTYPE, device=device)
                out = torch.maximum(out, contrib.to(device))
            else:
                contrib.index_add_(0, index, values)
                contrib = contrib.to(device)
                out = contrib if out is None else out + contrib
    return out if out is not None else torch.zeros(layout.num_slots, dtype=ACC_DTYPE, device=device)


def _by_device_and_dtype(tensors: Sequence[torch.Tensor],
                         ids: Sequence[int]) -> list[tuple[list[torch.Tensor], Sequence[int]]]:
    """The tensors of each (device, dtype) with their slot ids: one kind (the usual case) is checked in C-level
    passes, several are grouped by torch's helper."""
    first = tensors[0]
    if all(map(_IS_CPU, tensors)) and all(map(is_, repeat(first.dtype), map(_DTYPE, tensors))):
        return [(tensors if isinstance(tensors, list) else list(tensors), ids)]
    grouped = group_tensors_by_device_and_dtype([list(tensors)], with_indices=True)
    if len(grouped) == 1:
        return [(same_kind, ids) for [same_kind], _ in grouped.values()]
    return [(same_kind, [ids[i] for i in indices]) for [same_kind], indices in grouped.values()]


_IS_CPU = attrgetter("is_cpu")
_DTYPE = attrgetter("dtype")


def piece_sums(tensors: Sequence[torch.Tensor], p: float, layout: SlotLayout, device: torch.device) -> torch.Tensor:
    """Per tensor, sum |t|^p (max |t| for p = inf): float64 ``[len(tensors)]`` on ``device``, in the order given.

    A function of the list alone (its sizes, dtypes and values): the same list gives the same bits,
    whichever other tensors were measured before or after it (what :class:`OrderedSlotSums` builds on).
    """
    if not tensors:
        return torch.zeros(0, dtype=ACC_DTYPE, device=device)
    grouped = group_tensors_by_device_and_dtype([list(tensors)], with_indices=True)
    if len(grouped) == 1:
        (([same_kind], _),) = grouped.values()
        return power_sums(same_kind, p).to(device)
    out = torch.empty(len(tensors), dtype=ACC_DTYPE, device=device)
    for [same_kind], indices in grouped.values():  # mixed dtypes: each kind's sums back in the list's order
        out.index_copy_(0, layout.slot_index(indices, device), power_sums(same_kind, p).to(device))
    return out


class OrderedSlotSums:
    """Per-piece values -> a slot vector, piece ``k`` into slot ``slot_ids[k]``: a function of the values and their
    order alone, on every device (what makes partials independent of how the pieces were measured, in batches).

    On CPU each slot's pieces are added one after another, in order (``index_add_`` is a serial loop). Elsewhere
    (no serial kernel without atomics) the values are gathered into a fixed ``[slots, most pieces of a slot]``
    matrix, padded with zeros, and summed along its rows: a reduction of a fixed shape, deterministic, no atomics,
    no host sync; ``index_put_(accumulate=True)`` (sorted, no atomics) where that matrix would be much larger than
    the values. A max (p = inf) does not depend on order. The device index tensors are built once per device.
    """

    def __init__(self, slot_ids: Sequence[int], layout: SlotLayout, serial_on_cpu: bool = True):
        self.slot_ids = list(slot_ids)
        self.layout = layout
        self.serial_on_cpu = serial_on_cpu  # False: the other devices' way on CPU too (to test it without a GPU)
        self._plans: dict[torch.device, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]] = {}

    def __call__(self, values: torch.Tensor, use_max: bool) -> torch.Tensor:
        index, padded = self._plan(values.device)
        out = torch.zeros(self.layout.num_slots, dtype=ACC_DTYPE, device=values.device)
        if use_max:
            return out.scatter_reduce_(0, index, values, reduce="amax")
        if values.device.type == "cpu" and self.serial_on_cpu:
            return out.index_add_(0, index, values)
        if padded is None:
            return out.index_put_((index,), values, accumulate=True)
        gather, slots = padded
        rows = torch.cat([values, values.new_zeros(1)]).index_select(0, gather).view(slots.numel(), -1)
        return out.index_copy_(0, slots, rows.sum(1))

    def _plan(self, device: torch.device) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        if device not in self._plans:
            index = torch.tensor(self.slot_ids, dtype=torch.long, device=device)
            padded = None
            if device.type != "cpu" or not self.serial_on_cpu:
                members: dict[int, list[int]] = {}
                for k, slot in enumerate(self.slot_ids):
                    members.setdefault(slot, []).append(k)
                width = max((len(m) for m in members.values()), default=0)
                if len(members) * width <= 4 * len(self.slot_ids) + 1024:  # else index_put_: no huge padding
                    pad = len(self.slot_ids)  # the index of the zero appended to the values
                    gather = [k for m in members.values() for k in m + [pad] * (width - len(m))]
                    padded = (torch.tensor(gather, dtype=torch.long, device=device),
                              torch.tensor(list(members), dtype=torch.long, device=device))
            self._plans[device] = (index, padded)
        return self._plans[device]


def combine_partials(partials: Sequence[torch.Tensor], layout: SlotLayout, device: torch.device) -> torch.Tensor:
    """Combine slot vectors of disjoint piece sets (e.g. DDP buckets), in the order given."""
    out = torch.zeros(layout.num_slots, dtype=ACC_DTYPE, device=device)
    is_max = layout.max_mask(device)
    for vec in partials:
        out = torch.where(is_max, torch.maximum(out, vec), out + vec)
    return out
