"""Split replicated gradients into disjoint slices, one per replica, so each element is counted once."""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate
from typing import Sequence

Segment = tuple[int, int, int]  # (tensor index, start, end) in the tensor's flattened elements


def even_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share of ``total`` elements (shares differ by at most one)."""
    return total * rank // world, total * (rank + 1) // world


def segments_in_range(numels: Sequence[int], start: int, end: int) -> list[Segment]:
    """The pieces of the tensors laid end to end (in order) that fall in ``[start, end)``."""
    offsets = [0, *accumulate(numels)]
    out: list[Segment] = []
    i = max(0, bisect_right(offsets, start) - 1)
    while i < len(numels) and offsets[i] < end:
        lo, hi = max(start, offsets[i]), min(end, offsets[i + 1])
        if hi > lo:
            out.append((i, lo - offsets[i], hi - offsets[i]))
        i += 1
    return out


def replica_segments(numels: Sequence[int], rank: int, world: int) -> list[Segment]:
    """This replica's 1/world of the tensors laid end to end: disjoint across ranks, covering all."""
    return segments_in_range(numels, *even_range(sum(numels), rank, world))
