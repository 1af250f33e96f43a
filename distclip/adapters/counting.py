"""Counting each element once: local pieces, who else holds a copy, who counts which element, the reduce group.

A *piece* is a contiguous range of one local gradient tensor that belongs to one parameter. A
piece is either held by this rank alone (a shard), or held identically by ``count`` replicas
(DDP, NO_SHARD, an HSDP replica, a ``Replicate`` mesh dimension, a DTensor on a sub-mesh of a
larger mesh, a parameter FSDP does not manage, a declared replicated plain tensor).
Replicated pieces of one replica set are laid end to end, in the same order on every replica,
and split into disjoint ``1/count`` slices (:func:`replica_segments`): every
element is counted exactly once over the whole job, and the norm work is split across replicas.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate, repeat
from operator import is_not
from typing import Hashable, Iterable, Sequence, cast

import torch
import torch.distributed as dist

from ..errors import UnsupportedLayoutError

Segment = tuple[int, int, int, int]  # (source tensor index, start, end, parameter index)


# ------------------------------------------------------------ splitting replicated elements
def even_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share of ``total`` elements (shares differ by at most one)."""
    return total * rank // world, total * (rank + 1) // world


def segments_in_range(numels: Sequence[int], start: int, end: int) -> list[tuple[int, int, int]]:
    """The pieces of the tensors laid end to end (in order) that fall in ``[start, end)``."""
    offsets = [0, *accumulate(numels)]
    out: list[tuple[int, int, int]] = []
    i = max(0, bisect_right(offsets, start) - 1)
    while i < len(numels) and offsets[i] < end:
        lo, hi = max(start, offsets[i]), min(end, offsets[i + 1])
        if hi > lo:
            out.append((i, lo - offsets[i], hi - offsets[i]))
        i += 1
    return out


def replica_segments(numels: Sequence[int], rank: int, world: int) -> list[tuple[int, int, int]]:
    """This replica's 1/world of the tensors laid end to end: disjoint across ranks, covering all."""
    return segments_in_range(numels, *even_range(sum(numels), rank, world))


@dataclass(frozen=True)
class Replicas:
    """This rank holds copy ``index`` of ``count`` identical copies; ``key`` names the replica set."""

    key: Hashable
    index: int
    count: int


@dataclass(frozen=True)
class LocalPiece:
    """Elements ``[start, start + numel)`` of local tensor ``source`` (flattened) belong to parameter ``param``.

    ``offset``: where the piece's first element sits in the parameter's GLOBAL flat (row-major)
    order, so that row-wise clipping can map each element to its row; None when the piece is not
    one run of that order (a DTensor sharded on a dimension >= 1, a declared shard).
    """

    source: int
    start: int
    numel: int
    param: int
    replicas: Replicas | None = None  # None: this rank is the only holder
    offset: int | None = 0


def counted_segments(pieces: Iterable[LocalPiece]) -> list[Segment]:
    """The element ranges this rank counts: sole-held pieces whole, replicated ones sliced 1/count.

    Deterministic: the same pieces in the same order give the same slices on every replica.
    """
    out: list[Segment] = []
    replicated: dict[Hashable, list[LocalPiece]] = {}
    for piece in pieces:
        if piece.replicas is None or piece.replicas.count == 1:
            if piece.numel > 0:
                out.append((piece.source, piece.start, piece.start + piece.numel, piece.param))
        else:
            replicated.setdefault(piece.replicas.key, []).append(piece)
    for members in replicated.values():
        copy = members[0].replicas
        assert copy is not None  # grouped by their replica set above
        for i, lo, hi in replica_segments([m.numel for m in members], copy.index, copy.count):
            m = members[i]
            out.append((m.source, m.start + lo, m.start + hi, m.param))
    return out


def segment_offsets(segments: Sequence[Segment], pieces: Iterable[LocalPiece]) -> list[int | None]:
    """Where each segment (a range of one of ``pieces``) starts in its parameter's global flat order."""
    by_key: dict[tuple[int, int], list[LocalPiece]] = {}
    for piece in pieces:
        by_key.setdefault((piece.source, piece.param), []).append(piece)
    out: list[int | None] = []
    for source, lo, _, param in segments:
        piece = next(p for p in by_key[(source, param)] if p.start <= lo < p.start + p.numel)
        out.append(None if piece.offset is None else piece.offset + lo - piece.start)
    return out


def flat_range(tensor: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor | None:
    """Elements ``[lo, hi)`` of ``tensor`` flattened: the tensor itself when that is all of it (its shape kept),
    else a view of a contiguous tensor (a copy of a non-contiguous one: fine for reading)."""
    if tensor is None or (lo == 0 and hi == tensor.numel()):
        return tensor
    return tensor.reshape(-1)[lo:hi]


def slice_segments(
    tensors: Sequence[torch.Tensor | None], segments: Sequence[Segment], group_of: Sequence[int]
) -> tuple[list[torch.Tensor], list[int]]:
    """The flattened ranges of ``tensors`` named by ``segments`` (missing tensors skipped) and their groups."""
    pieces: list[torch.Tensor] = []
    groups: list[int] = []
    for source, lo, hi, param in segments:
        tensor = tensors[source]
        if tensor is None:
            continue
        if lo == 0 and hi == tensor.numel():
            pieces.append(tensor)  # whole tensor: no view needed (norms ignore shape)
        else:
            pieces.append(tensor.reshape(-1)[lo:hi])
        groups.append(group_of[param])
    return pieces, groups


class Slicing:
    """Segments of the local tensors and their groups, prepared once (at bind) for the per-step path.

    :meth:`take` gives what :func:`slice_segments` gives. When the tensors' sizes are known at bind
    (``numels``: each source's element count), the segments are laid out as runs: consecutive
    sources taken whole (a list slice, no Python step per tensor) and ranges (one view each, e.g.
    the ends of a DDP rank's share). A call checks the sizes in one C-level pass and that no tensor
    is missing; otherwise (or without ``numels``) each segment is looked at in turn.
    """

    def __init__(self, segments: Sequence[Segment], group_of: Sequence[int], numels: Sequence[int] | None = None):
        self.segments = list(segments)
        self.group_of = group_of
        self.groups = [group_of[param] for *_, param in segments]
        self.numels = list(numels) if numels is not None else None
        self.runs: list[tuple[int, int, int]] = []  # (source, lo, hi): a range; (first, last + 1, -1): whole sources
        if self.numels is not None:
            for source, lo, hi, _ in self.segments:
                if lo == 0 and hi == self.numels[source]:
                    last = self.runs[-1] if self.runs else None
                    if last is not None and last[2] == -1 and last[1] == source:
                        self.runs[-1] = (last[0], source + 1, -1)
                    else:
                        self.runs.append((source, source + 1, -1))
                else:
                    self.runs.append((source, lo, hi))

    def take(self, tensors: Sequence[torch.Tensor | None]) -> tuple[list[torch.Tensor], list[int]]:
        """The flattened ranges named by the segments (missing tensors skipped) and their groups."""
        present = cast("Sequence[torch.Tensor]", tensors)  # what they are once the test below finds no None
        if self.numels is not None and all(map(is_not, tensors, repeat(None))) \
                and list(map(torch.Tensor.numel, present)) == self.numels:
            if len(self.runs) == 1 and self.runs[0] == (0, len(present), -1):  # every tensor whole, in order
                return list(present), list(self.groups)
            pieces: list[torch.Tensor] = []
            for a, b, c in self.runs:
                if c == -1:
                    pieces += present[a:b]
                else:
                    pieces.append(present[a].reshape(-1)[b:c])
            return pieces, list(self.groups)
        return slice_segments(tensors, self.segments, self.group_of)  # sizes unknown or changed, or a tensor missing


def group_ranks(group: dist.ProcessGroup) -> frozenset[int]:
    """The global ranks of a process group."""
    return frozenset(dist.get_process_group_ranks(group))


def covering_group(rank_sets: Iterable[tuple[frozenset[int], dist.ProcessGroup | None]],
                   what: str) -> dist.ProcessGroup:
    """The group to reduce over: one that spans every rank holding a counted element.

    ``rank_sets`` pairs each set of ranks that holds (part of) the gradients with its group when
    one exists. Every element is counted once globally, so reducing over any group that spans all
    of them is exact: the world when they span it, else an existing group with exactly those ranks.
    Derived from the layout's own metadata, never passed in by the user.
    """
    pairs = list(rank_sets)
    world = frozenset(range(dist.get_world_size()))
    ranks = frozenset().union(*(r for r, _ in pairs)) if pairs else world
    if ranks == world:
        world_group = dist.group.WORLD
        assert world_group is not None  # set once the default group is initialised (get_world_size above needs it)
        return world_group
    for candidate_ranks, group in pairs:
        if group is not None and candidate_ranks == ranks:
            return group
    raise UnsupportedLayoutError(
        f"distclip: the {what} gradients live on ranks {sorted(ranks)}, a subset of the world "
        f"({len(world)} ranks) that no single process group of the model spans, so there is no "
        "group to reduce the norm over. Shard every part of the model over the same ranks (or over the whole world)."
    )


_FLOAT_BITS = {torch.float16: (5, 10), torch.bfloat16: (8, 7), torch.float32: (8, 23), torch.float64: (11, 52)}


def cast_is_exact(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether every ``src`` value is represented exactly in ``dst`` (so a norm of either is the same)."""
    if src == dst:
        return True
    a, b = _FLOAT_BITS.get(src), _FLOAT_BITS.get(dst)
    return a is not None and b is not None and a[0] <= b[0] and a[1] <= b[1]
