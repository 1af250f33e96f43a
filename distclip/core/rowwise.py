"""Row-wise clipping (AGC, NFNets arXiv 2102.06171): the rows, their partial sums, their coefficients.

A *row* is one dim-0 slice of a parameter with two or more dimensions (an output row of a
Linear, an output filter of a conv), or the whole of a 0-/1-D parameter. For every row ``i`` of a
parameter clipped with ``kind: agc`` (timm's ``adaptive_clip_grad``, in the group's p)::

    max_norm_i = clip_factor * max(||W_i||, eps)
    G_i <- G_i                                          if ||G_i|| < max_norm_i
    G_i <- G_i * max_norm_i / max(||G_i||, 1e-6)        otherwise

**Layout** (:class:`RowPlan`): the rows of every agc parameter, parameters in canonical-name
order, rows in order. It depends only on names and GLOBAL shapes, so it is the same on every
rank. Its part of the slot vector, after the group slots, is ``[sum |g|^p per row, sum |w|^p
per row]`` (``max`` for p = inf): the row norms of gradients and parameters travel in the same
single collective as the group norms.

**Mapping** (:class:`PieceMap`): a rank holds a parameter as *spans*, runs of consecutive
elements in the parameter's global flat (row-major) order: a whole tensor, the rows of an FSDP2
``Shard(0)`` shard, a slice of an FSDP1 flat shard or of a ZeRO partition that splits rows. A span
of a parameter with rows of ``L`` elements covers a *head* (the end of a row it starts inside),
``k`` whole rows (a ``(k, L)`` view) and a *tail* (the start of a row it ends inside). The split
and the row of every value are computed once, at bind (device index tensors cached there).

**Per-step cost**, on top of the group norms: counting reads each counted gradient and parameter
element once more (per span at most one row-norm kernel, plus one foreach norm per dtype for all
heads, tails and one-row tensors, one ``index_add_`` per p); the collective grows by 2 float64
per row; the coefficients are a few elementwise kernels over the U rows; applying multiplies
every local gradient element once (per span one broadcast multiply or at most three, the scalar
ones in one foreach call). Linear in the number of spans and rows; no host synchronisation, no
tensor built from host data after the first step.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence

import torch

from ..compat.pytorch import foreach_mul_
from ..errors import ConfigError
from .config import ClipConfig
from .groups import ClipGroup, GroupTable
from .kernels import power_sums
from .norms import ACC_DTYPE, SlotLayout


def _row_dtype(dtype: torch.dtype) -> torch.dtype:
    """Row norms accumulate bf16/fp16 in fp32 (never in their own low precision), as timm's reference in fp32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32

GRAD_NORM_FLOOR = 1e-6  # timm's grad_norm.clamp(min=1e-6)


@dataclass(frozen=True)
class RowwiseSpec:
    """How one clip group is clipped row-wise: the norm's p, AGC's ``clip_factor`` and ``eps``."""

    p: float
    clip_factor: float
    eps: float


@dataclass(frozen=True)
class RowBlock:
    """The rows of one agc parameter: ``rows`` rows of ``row_size`` elements, numbered from ``first`` on."""

    name: str
    param: int  # the adapter's parameter index
    group: int
    first: int
    rows: int
    row_size: int
    spec: RowwiseSpec


@dataclass(frozen=True)
class Span:
    """Elements ``[offset, offset + numel)`` of parameter ``param``, in its global flat (row-major) order."""

    param: int
    offset: int
    numel: int


Part = tuple[int, int, int, int]  # (start, stop) in the span's flat tensor, whole rows (0: part of one row), first row


def rows_of(shape: Sequence[int]) -> tuple[int, int]:
    """(number of rows, elements per row) of a parameter of this global shape."""
    numel = math.prod(shape)
    if len(shape) <= 1 or shape[0] == 0:
        return 1, numel
    return shape[0], numel // shape[0]


class RowPlan:
    """Every agc parameter's rows in one global order, and their coefficients from the reduced sums."""

    def __init__(self, blocks: Sequence[RowBlock], groups: Sequence[int], num_groups: int):
        self.blocks = tuple(blocks)
        self.groups = sorted(groups)  # the groups clipped row-wise (with or without parameters)
        self.num_groups = num_groups
        self.by_param: dict[int, RowBlock] = {b.param: b for b in self.blocks}
        self.num_rows = sum(b.rows for b in self.blocks)
        self.uses_max = tuple(math.isinf(b.spec.p) for b in self.blocks)  # per block: its row sums are maxima
        self._per_block: dict[str, tuple[tuple[float | int, ...], torch.dtype]] = {
            "p": (tuple(b.spec.p for b in self.blocks), ACC_DTYPE),
            "eps": (tuple(b.spec.eps for b in self.blocks), ACC_DTYPE),
            "clip_factor": (tuple(b.spec.clip_factor for b in self.blocks), ACC_DTYPE),
            "group": (tuple(b.group for b in self.blocks), torch.long),
            "uses_max": (self.uses_max, torch.bool),
        }
        self._constants: dict[Hashable, torch.Tensor] = {}

    @classmethod
    def build(cls, names: Sequence[str], shapes: Sequence[Sequence[int]], group_of: Sequence[int],
              specs: Mapping[int, RowwiseSpec], num_groups: int) -> "RowPlan":
        """The plan of the parameters whose group is in ``specs`` (``names``, global ``shapes``: per parameter)."""
        blocks, first = [], 0
        for i in sorted((i for i, g in enumerate(group_of) if g in specs), key=lambda i: names[i]):
            rows, row_size = rows_of(shapes[i])
            blocks.append(RowBlock(names[i], i, group_of[i], first, rows, row_size, specs[group_of[i]]))
            first += rows
        return cls(blocks, list(specs), num_groups)

    def fingerprint(self) -> str:
        """Equal on two ranks iff their row layouts are (names, shapes, groups and settings in order)."""
        text = repr([(b.name, b.group, b.rows, b.row_size, b.spec) for b in self.blocks])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def piece_map(self, spans: Sequence[Span]) -> "PieceMap":
        return PieceMap(self, spans)

    # ------------------------------------------------------------ per row, on device
    def _constant(self, name: str, device: torch.device) -> torch.Tensor:
        """A per-row device constant (``p``, ``eps``, ``clip_factor``, ``group``, ``uses_max``) from its value
        per block, built once per device."""
        key = (name, device)
        cached = self._constants.get(key)
        if cached is None:
            values, dtype = self._per_block[name]
            counts = torch.tensor([b.rows for b in self.blocks], dtype=torch.long)
            cached = torch.repeat_interleave(torch.tensor(values, dtype=dtype), counts).to(device)
            self._constants[key] = cached
        return cached

    def p(self, device: torch.device) -> torch.Tensor:
        return self._constant("p", device)

    def max_mask(self, device: torch.device) -> torch.Tensor:
        """Per slot of the row part ``[grads (U), params (U)]``: reduced with MAX."""
        key = ("max_mask", device)
        if key not in self._constants:
            one = self._constant("uses_max", device)
            self._constants[key] = torch.cat([one, one])
        return self._constants[key]

    def unscale(self, row_partials: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
        """Row partials whose gradient half still carries a factor ``scale`` (a loss scale), divided out.

        ``sum |s g|^p = s^p sum |g|^p``; ``max |s g| = s max |g|``; the parameter half carries none.
        """
        s = scale.to(row_partials.device, ACC_DTYPE) if isinstance(scale, torch.Tensor) else scale
        p = self.p(row_partials.device)
        grads, params = row_partials.split(self.num_rows)
        return torch.cat([grads / torch.where(torch.isinf(p), s, torch.pow(s, p)), params])

    def coefficients(self, reduced_units: torch.Tensor) -> torch.Tensor:
        """Each row's coefficient (float64, identical on every rank) from the reduced ``[grads, params]`` sums.

        timm's rule: ``max_norm = clip_factor * max(||W_i||, eps)``; 1 where ``||G_i|| < max_norm``,
        else ``max_norm / max(||G_i||, 1e-6)``. NaN propagates (a NaN norm never compares smaller).
        """
        device = reduced_units.device
        p = self.p(device)
        sums_g, sums_w = reduced_units.split(self.num_rows)
        grad_norm = torch.where(torch.isinf(p), sums_g, sums_g.pow(1.0 / p))
        param_norm = torch.where(torch.isinf(p), sums_w, sums_w.pow(1.0 / p))
        eps, factor = self._constant("eps", device), self._constant("clip_factor", device)
        max_norm = torch.maximum(param_norm, eps) * factor
        clipped = max_norm / grad_norm.clamp(min=GRAD_NORM_FLOOR)
        return torch.where(grad_norm < max_norm, torch.ones_like(clipped), clipped)

    def add_group_sums(self, slots: torch.Tensor, row_partials: torch.Tensor, groups: frozenset[int],
                       p: float) -> torch.Tensor:
        """``slots`` with slot ``g`` of each of ``groups`` (whose norm is in ``p``, the config's p: slot g) given
        the sum (max for p = inf) of its rows' gradient sums: the same elements, so these group norms need no
        pass over the gradients of their own."""
        device = slots.device
        key = ("derived", groups, device)
        if key not in self._constants:
            row_groups = [(b.first + r, b.group) for b in self.blocks if b.group in groups for r in range(b.rows)]
            self._constants[key] = torch.tensor(row_groups, dtype=torch.long, device=device).reshape(-1, 2)
        pairs = self._constants[key]
        values = row_partials.index_select(0, pairs[:, 0])  # the gradient half comes first
        if math.isinf(p):
            return slots.scatter_reduce(0, pairs[:, 1], values, reduce="amax")
        return slots.index_add(0, pairs[:, 1], values)

    def group_minima(self, row_coefs: torch.Tensor) -> torch.Tensor:
        """Per group, the smallest coefficient of its rows (1 for a group without rows), float64 [G]."""
        device = row_coefs.device
        index = self._constant("group", device)
        out = torch.ones(self.num_groups, dtype=row_coefs.dtype, device=device)
        return out.scatter_reduce_(0, index, row_coefs, reduce="amin", include_self=True)

    def group_mask(self, device: torch.device) -> torch.Tensor:
        """Per group: clipped row-wise."""
        key = ("group_mask", device)
        if key not in self._constants:
            mask = torch.zeros(self.num_groups, dtype=torch.bool)
            mask[self.groups] = True
            self._constants[key] = mask.to(device)
        return self._constants[key]


class SlotsWithRows:
    """The group slots followed by a plan's row slots: which of them reduce with MAX (for ``reduce_slots``)."""

    def __init__(self, layout: SlotLayout, plan: RowPlan):
        self.layout = layout
        self.plan = plan
        row_max = plan.uses_max if plan.num_rows else ()
        self.any_max = layout.any_max or any(row_max)
        self.all_max = layout.all_max and all(row_max)
        self._mask: dict[torch.device, torch.Tensor] = {}

    def max_mask(self, device: torch.device) -> torch.Tensor:
        if device not in self._mask:
            self._mask[device] = torch.cat([self.layout.max_mask(device), self.plan.max_mask(device)])
        return self._mask[device]


Member = tuple[int, int, int, int, int]  # (span, start, stop, whole rows (0: part of one row), first row)
_SMALL = 1 << 15  # elements: blocks of whole rows below this are copied side by side for one row-norm kernel


@dataclass(frozen=True)
class _RowBatch:
    """Parts whose norms one kernel computes: ``rows`` (a block of whole rows, alone), ``stacked`` (small
    blocks with the same row length, dtype and device, copied side by side), ``scalars`` (one norm each:
    heads, tails, single rows, whole one-row tensors, by one foreach call)."""

    kind: str
    members: tuple[Member, ...]
    row: int = 0
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class _CountPlan:
    batches: tuple[_RowBatch, ...]
    index: torch.Tensor  # the row of every value the batches give, in order


@dataclass(frozen=True)
class _ScaleGroup:
    """Parts multiplied by one foreach call, all on one device: ``rows`` whole rows each (coefficients
    shaped ``(rows, 1, ...)`` for ``ndim``-D targets), or one coefficient each (``rows`` 0).

    Grouped by the number of rows so that the coefficients are an ``unbind`` of one gathered tensor
    (``split`` into unequal sizes costs about ten times more per view)."""

    device: torch.device
    ndim: int
    rows: int
    members: tuple[tuple[int, int, int, int, bool], ...]  # (span, start, stop, rows, the whole tensor)
    index: torch.Tensor  # the row of every coefficient, in order


class PieceMap:
    """A fixed list of spans mapped onto the rows once: what each span's elements add to, what multiplies them.

    Built at bind from the spans' global positions; per step it takes the spans' tensors (in the
    same order, each holding exactly its span's elements; ``None``: absent this step). How the
    parts are batched into kernels is planned on the first step and cached (keyed by which spans
    are present and their dtypes, devices and shapes).
    """

    def __init__(self, plan: RowPlan, spans: Sequence[Span]):
        self.plan = plan
        self.spans = tuple(spans)
        self.parts: list[tuple[Part, ...]] = []
        self.p_of: list[float] = []
        for span in self.spans:
            block = plan.by_param[span.param]
            self.parts.append(_split(span, block))
            self.p_of.append(block.spec.p)
        self.passes = {p: [s for s, q in enumerate(self.p_of) if q == p] for p in dict.fromkeys(self.p_of)}
        self._count_plans: dict[Hashable, _CountPlan] = {}
        self._scale_plans: dict[Hashable, tuple[_ScaleGroup, ...]] = {}

    # ------------------------------------------------------------------ counting
    def sums(self, tensors: Sequence[torch.Tensor | None], device: torch.device) -> torch.Tensor:
        """Per row, ``sum |x|^p`` (``max |x|`` for p = inf) of these spans' elements: float64 [U] on ``device``."""
        out = torch.zeros(self.plan.num_rows, dtype=ACC_DTYPE, device=device)
        for p, members in self.passes.items():
            present = tuple((s, t.dtype, t.device) for s in members
                            if (t := tensors[s]) is not None and self.parts[s])
            if not present:
                continue
            key = (p, device, present)
            plan = self._count_plans.get(key)
            if plan is None:
                plan = self._count_plans[key] = self._count_plan(present, device)
            values = self._norms(plan, tensors, p, device)
            if math.isinf(p):
                out.scatter_reduce_(0, plan.index, values, reduce="amax")
            else:
                out.index_add_(0, plan.index, values if p == 1 else values.pow(p))
        return out

    def _count_plan(self, present: tuple[tuple[int, torch.dtype, torch.device], ...],
                    device: torch.device) -> _CountPlan:
        if len(self._count_plans) > 64:  # bounded: the present spans change rarely
            self._count_plans.clear()
        alone: list[Member] = []
        stacked: dict[tuple[int, torch.dtype, torch.device], list[Member]] = {}
        scalars: dict[tuple[torch.dtype, torch.device], list[Member]] = {}
        for s, dtype, dev in present:
            for start, stop, rows, first_row in self.parts[s]:
                member = (s, start, stop, rows, first_row)
                if not rows:
                    scalars.setdefault((dtype, dev), []).append(member)
                elif stop - start >= _SMALL:
                    alone.append(member)
                else:
                    stacked.setdefault(((stop - start) // rows, dtype, dev), []).append(member)
        batches = [_RowBatch("rows", tuple(alone))] if alone else []
        batches += [_RowBatch("stacked", tuple(m), row, dtype) for (row, dtype, _), m in stacked.items()]
        batches += [_RowBatch("scalars", tuple(m), 0, dtype) for (dtype, _), m in scalars.items()]
        row_index = [u + r for b in batches for *_, rows, u in b.members for r in range(max(rows, 1))]
        return _CountPlan(tuple(batches), torch.tensor(row_index, dtype=torch.long, device=device))

    @staticmethod
    def _norms(plan: _CountPlan, tensors: Sequence[torch.Tensor | None], p: float,
               device: torch.device) -> torch.Tensor:
        """The norm of every part, in the plan's order (float64 on ``device``)."""
        chunks: list[torch.Tensor] = []
        for batch in plan.batches:
            if batch.kind == "rows":
                for s, start, stop, rows, _ in batch.members:
                    block = _held(tensors, s).reshape(-1)[start:stop].view(rows, -1)
                    chunks.append(torch.linalg.vector_norm(block, p, dim=1, dtype=_row_dtype(block.dtype)))
            elif batch.kind == "stacked":
                block = torch.cat([_held(tensors, s).reshape(-1)[start:stop] for s, start, stop, _, _ in batch.members])
                chunks.append(torch.linalg.vector_norm(block.view(-1, batch.row), p, dim=1,
                                                       dtype=_row_dtype(block.dtype)))  # = batch.dtype
            else:  # whole small parameters: distclip's exact partial sums, then the root
                parts = [_held(tensors, s).reshape(-1)[start:stop] for s, start, stop, _, _ in batch.members]
                sums = power_sums(parts, p)
                chunks.append(sums if math.isinf(p) else sums.pow(1.0 / p))
        if len(chunks) > 1:
            return torch.cat([c.to(device, ACC_DTYPE) for c in chunks])
        return chunks[0].to(device, ACC_DTYPE)

    # ------------------------------------------------------------------ applying
    def scale_(self, tensors: Sequence[torch.Tensor | None], coefs: torch.Tensor) -> None:
        """Multiply each span's elements by their row's coefficient, in place: one foreach call per device and
        kind of part.

        A whole local tensor of whole rows (DDP, FSDP2 ``Shard(0)``) is multiplied by a per-row
        coefficient broadcast over its other dimensions (any strides); a flat piece (an FSDP1
        flat shard, a ZeRO partition) by its head, rows (a ``(k, L)`` view) and tail.
        """
        present = tuple((s, t.device, tuple(t.shape)) for s in range(len(tensors))
                        if (t := tensors[s]) is not None and self.parts[s])
        if not present:
            return
        groups = self._scale_plans.get(present)
        if groups is None:
            groups = self._scale_plans[present] = self._scale_plan(present)
        on_device: dict[torch.device, torch.Tensor] = {}
        flats: dict[int, torch.Tensor] = {}
        for group in groups:
            c = on_device.get(group.device)
            if c is None:
                c = on_device[group.device] = coefs.to(group.device)
            picked = c.index_select(0, group.index)
            if group.rows:  # (members, rows, 1, ...): built by unsqueeze, which unbind splits fast (a view with
                picked = picked.view(len(group.members), group.rows)  # trailing size-1 dims given at once is 5x slower)
                for _ in range(group.ndim - 1):
                    picked = picked.unsqueeze(-1)
            factors = list(picked.unbind(0))
            targets = []
            for s, start, stop, rows, whole in group.members:
                if whole:
                    targets.append(_held(tensors, s))
                    continue
                if s not in flats:
                    flats[s] = _flat_view(_held(tensors, s))
                piece = flats[s][start:stop]
                targets.append(piece.view(rows, -1) if rows else piece)
            foreach_mul_(targets, factors)

    def _scale_plan(self, present: tuple[tuple[int, torch.device, tuple[int, ...]], ...]) -> tuple[_ScaleGroup, ...]:
        if len(self._scale_plans) > 64:
            self._scale_plans.clear()
        members: dict[tuple[torch.device, int, int], list[tuple[int, int, int, int, bool]]] = {}
        row_index: dict[tuple[torch.device, int, int], list[int]] = {}
        for s, device, shape in present:
            numel = math.prod(shape)
            for start, stop, rows, first_row in self.parts[s]:
                whole = start == 0 and stop == numel
                if rows and whole and len(shape) >= 2 and shape[0] == rows:
                    key, part = (device, len(shape), rows), (s, start, stop, rows, True)  # broadcast along dim 0
                elif rows:
                    key, part = (device, 2, rows), (s, start, stop, rows, False)  # a (rows, L) view of the flat piece
                else:
                    key, part = (device, 0, 0), (s, start, stop, 0, whole)  # one coefficient
                members.setdefault(key, []).append(part)
                row_index.setdefault(key, []).extend(range(first_row, first_row + max(rows, 1)))
        return tuple(_ScaleGroup(device, ndim, rows, tuple(m),
                                 torch.tensor(row_index[key], dtype=torch.long, device=device))
                     for key, m in members.items() for device, ndim, rows in [key])


def _split(span: Span, block: RowBlock) -> tuple[Part, ...]:
    """A span's head / whole rows / tail, as (start, stop, rows, first row) in the span's own flat order.

    One whole row is a "part of one row" (rows = 0): its norm joins the batched foreach norm.
    """
    if span.numel <= 0:
        return ()
    end = span.offset + span.numel
    if span.offset < 0 or end > block.rows * block.row_size:
        raise ConfigError(
            f"distclip agc: a local piece of {block.name!r} claims elements [{span.offset}, {end}) of a parameter "
            f"of {block.rows * block.row_size} elements; the layout's metadata does not match the parameter's shape"
        )
    row = block.row_size
    parts: list[Part] = []
    position = span.offset
    first_full = -(-position // row) * row  # the first row boundary at or after the span's start
    if first_full > position:  # head: the rest of the row the span starts inside
        stop = min(first_full, end)
        parts.append((0, stop - span.offset, 0, block.first + position // row))
        position = stop
    rows = (end - position) // row
    if rows:
        start = position - span.offset
        parts.append((start, start + rows * row, rows if rows > 1 else 0, block.first + position // row))
        position += rows * row
    if position < end:  # tail: the start of the row the span ends inside
        parts.append((position - span.offset, span.numel, 0, block.first + position // row))
    return tuple(parts)


def _held(tensors: Sequence[torch.Tensor | None], s: int) -> torch.Tensor:
    """Span ``s``'s tensor, which a plan lists only when it is present (not None)."""
    t = tensors[s]
    assert t is not None
    return t


def _flat_view(tensor: torch.Tensor) -> torch.Tensor:
    try:
        return tensor.view(-1)
    except RuntimeError as err:
        raise RuntimeError(
            f"distclip agc: a gradient piece of shape {tuple(tensor.shape)} and strides {tensor.stride()} is not "
            "one contiguous run of elements, so its rows cannot be scaled in place; this layout is not supported"
        ) from err


def rowwise_specs(config: ClipConfig, groups: Sequence[ClipGroup]) -> dict[int, RowwiseSpec]:
    """The groups of a config clipped row-wise (``policy: {kind: agc}``), each with its spec."""
    from .policies import policy_scope  # policies import nothing from here; kept lazy all the same

    out = {}
    for g, group in enumerate(groups):
        _, spec = policy_scope(config, group)
        if spec.kind == "agc":
            out[g] = RowwiseSpec(group.norm_type, spec.clip_factor, spec.eps)
    return out


def bind_rows(config: ClipConfig, table: GroupTable, layout: SlotLayout, adapter: Any
              ) -> tuple[RowPlan | None, SlotsWithRows | None, frozenset[int]]:
    """Set-up of row-wise clipping for a clipper: (the row plan, the slots with the rows after the groups, the
    row-wise groups whose slot is the sum of their rows' gradient sums); (None, None, {}) without agc groups.

    The adapter maps its pieces onto the rows here (``adapter.bind_rows``, once): the layout side of
    row-wise clipping is in each adapter's ROWS methods (:mod:`distclip.adapters.base`, and the FSDP1,
    DTensor and ZeRO adapters for their own layouts).
    """
    specs = rowwise_specs(config, table.groups)
    if not specs:
        return None, None, frozenset()
    if adapter.pipeline_group is not None:
        raise ConfigError(
            "distclip: policy kind 'agc' (row-wise clipping) is not supported with pipeline parallelism yet; "
            "use another policy for the pipelined model")
    plan = RowPlan.build(adapter.names, adapter.global_shapes(), adapter.group_of, specs, len(table.groups))
    adapter.bind_rows(plan)
    # A row-wise group whose p is the config's has one slot, the sum of its rows' gradient sums.
    derived = frozenset(g for g in specs if table.groups[g].norm_type == config.norm_type)
    return plan, SlotsWithRows(layout, plan), derived
