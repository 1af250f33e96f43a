"""Fixed measurement blocks: partial norms of replicated whole-parameter gradients that do not depend on DDP's buckets.

DDP reduces gradients in buckets and rebuilds them after the first iteration (in the order the
gradients became ready), so a resumed run's first backward runs on the initial buckets where the
straight run's runs on the rebuilt ones. Partials measured per bucket (each replica a slice of
each bucket, summed bucket by bucket) then differed in the last bit between the two runs.

Here the parameters are cut once, at set-up, into *blocks* of consecutive parameters (by bytes,
from the last parameter backwards, like DDP's initial buckets: :func:`block_bounds`), a function
of the parameter list alone. In each block the replicas split the block's elements laid end to
end into disjoint ``1/count`` slices (every element counted once, the work spread over the
replicas in every block). With the hook on, both paths measure a block with one kernel call over
the same list of pieces: inside the reduction once every parameter of the block is reduced,
whatever buckets held them; after backward (when the hook's result cannot be used) from
``param.grad``. The pieces' sums then enter the slots one after another in parameter order
(:class:`~distclip.core.norms.OrderedSlotSums`). So the slot vector is bitwise the same whatever
DDP's buckets, and on either path.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from typing import Sequence

import torch

from ..core.norms import ACC_DTYPE, OrderedSlotSums, SlotLayout, piece_sums
from .counting import LocalPiece, Replicas, Segment, counted_segments

FIRST_BLOCK_BYTES = 1 << 20  # the last parameters' block: as DDP's first bucket (1 MiB by default)


def block_bounds(nbytes: Sequence[int], first: int, cap: int) -> list[tuple[int, int]]:
    """Runs ``[lo, hi)`` of consecutive parameters, in parameter order, cut from the last parameter backwards:
    a run closes once it holds ``first`` bytes (the first run cut), then ``cap`` bytes (DDP's bucket rule)."""
    bounds: list[tuple[int, int]] = []
    hi, size, limit = len(nbytes), 0, first
    for i in range(len(nbytes) - 1, -1, -1):
        size += nbytes[i]
        if size >= limit:
            bounds.append((i, hi))
            hi, size, limit = i, 0, cap
    if hi > 0:
        bounds.append((0, hi))
    return bounds[::-1]


@dataclass(frozen=True)
class Block:
    """This rank's counted segments of one block, in parameter order, and which enter each p-pass."""

    segments: tuple[Segment, ...]
    params: frozenset[int]  # the parameters this rank counts part of (the block is measurable once they are reduced)
    members: tuple[tuple[int, ...], ...]  # per pass of the slot layout: indices into ``segments``


class BlockPlan:
    """The blocks of one layout and how their per-piece sums become the slot vector (see the module docstring).

    Args:
        pieces: one whole-parameter piece per parameter (``piece.param`` indexes ``group_of``).
        bounds: the blocks as runs of parameter indices (:func:`block_bounds`).
        uncounted: parameters another rank or stage counts.
        group_of, layout: each parameter's clip group, and the slot layout.
    """

    def __init__(self, pieces: Sequence[LocalPiece], bounds: Sequence[tuple[int, int]], uncounted: set[int],
                 group_of: Sequence[int], layout: SlotLayout):
        self.layout = layout
        self.blocks: list[Block] = []
        self.block_of: dict[int, int] = {}  # parameter -> its block, for the parameters this rank counts
        slot_ids: list[list[int]] = [[] for _ in layout.passes]
        starts = [lo for lo, _ in bounds]
        by_block: list[list[LocalPiece]] = [[] for _ in bounds]  # one pass over the pieces: linear set-up
        for piece in pieces:
            b = bisect_right(starts, piece.param) - 1
            if piece.param not in uncounted and b >= 0 and piece.param < bounds[b][1]:
                by_block[b].append(_in_block(piece, b))
        for b, own in enumerate(by_block):
            segments = tuple(sorted(counted_segments(own), key=lambda s: (s[3], s[1])))
            members = []
            for k, (_, slot_of_group) in enumerate(layout.passes):
                chosen = tuple(j for j, s in enumerate(segments) if slot_of_group[group_of[s[3]]] >= 0)
                slot_ids[k] += [slot_of_group[group_of[segments[j][3]]] for j in chosen]
                members.append(chosen)
            block = Block(segments, frozenset(s[3] for s in segments), tuple(members))
            self.block_of.update((param, b) for param in block.params)
            self.blocks.append(block)
        self.counted: list[Segment] = [s for block in self.blocks for s in block.segments]
        self.measured_blocks = [b for b, block in enumerate(self.blocks) if block.segments]
        self._sums = [OrderedSlotSums(ids, layout) for ids in slot_ids]  # per pass

    def measure(self, b: int, tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
        """Block ``b``'s per-piece sums for each p-pass (None where no piece enters it), from its pieces' values
        ``tensors`` (flat, in the order of its segments)."""
        out: list[torch.Tensor | None] = []
        for (p, _), members in zip(self.layout.passes, self.blocks[b].members):
            if not members:
                out.append(None)
                continue
            chosen = tensors if len(members) == len(tensors) else [tensors[j] for j in members]
            out.append(piece_sums(chosen, p, self.layout, device))
        return out

    def combine(self, per_block: Sequence[list[torch.Tensor | None] | None], device: torch.device) -> torch.Tensor:
        """The slot vector from every block's :meth:`measure` (None for a block with no piece here), in block order."""
        out = torch.zeros(self.layout.num_slots, dtype=ACC_DTYPE, device=device)
        for k, (p, _) in enumerate(self.layout.passes):
            parts = [part for values in per_block if values is not None and (part := values[k]) is not None]
            if not parts:
                continue
            values = parts[0] if len(parts) == 1 else torch.cat(parts)
            contrib = self._sums[k](values, math.isinf(p))
            out = torch.maximum(out, contrib) if math.isinf(p) else out + contrib
        return out


def _in_block(piece: LocalPiece, block: int) -> LocalPiece:
    """The piece with its replica set narrowed to one block: the replicas split each block on its own."""
    if piece.replicas is None:
        return piece
    r = piece.replicas
    return LocalPiece(piece.source, piece.start, piece.numel, piece.param,
                      Replicas(("block", block, r.key), r.index, r.count), piece.offset)
