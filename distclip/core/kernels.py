"""Exact local power sums: per tensor, sum |t|^p (max |t| for p = inf) in float64.

torch's CPU norm kernels accumulate in fp32, one running sum per thread (p = 1, fractional p)
or per vector lane (p = 2): on a 50M-element gradient they miss float64 by 16% (p = 1), and
1,200 equal values already miss it by 1e-6. On CPU, :func:`power_sums` keeps every partial
within 1e-6 (relative) of float64 on the same values (a priori for every p but 2; at p = 2 on every
input tried, worst cases included: see its bound below): faster than torch's fp32 kernels at p = 1 and
inf, 1.2-1.5x its (less exact) p = 2 kernel on fp32 (``python -m distclip.bench --targets``, the
docs' performance page). No fp32 sum in it runs over more than a few terms:

- p = 2, fp32: torch's vectorised last-dim norm kernel on rows of ``ROW`` values (its vector
  lanes, 16 with AVX-512, each add 16 terms, then the lanes are folded one by one); the row
  results are squared and summed in float64. Worst case over every input of equal values (all
  2^23 mantissas tried, 16 lanes): 6.6e-7; random rows err by about 1e-7 each and cancel across
  rows. (The a-priori bound, for rows built to round the same way at every step, is about 32
  fp32 roundings of 2^-24: 1.9e-6.)
- p = 2, bf16/fp16: each chunk of ``BLOCK_CHUNK`` values widened to fp32 (exact) in a
  cache-resident buffer, then the same row kernel: its products x*x are exact there, so only its
  additions round (the same bound).
- p = 1 (any dtype but fp64): each chunk's |x| in fp32 (exact), viewed as 16 rows and summed
  column by column (torch's vectorised outer sum): every column sum adds 16 non-negative terms,
  so in ANY order each term passes at most 15 fp32 roundings: 15 * 2^-24 = 8.9e-7 a priori. The
  column sums are summed in float64.
- any other p: the terms |x|^p in fp32 (``pow`` within 1 ulp each), summed in float64.
- small tensors (and what is left after the last row or column): packed side by side into one
  buffer, their terms taken in float64 (exact for p = 1, 2) and summed there.

Large tensors are taken in chunks of ``CHUNK`` values held in a core's L2 cache; small ones are
packed by ``torch.cat`` of whole tensors grouped by their trailing shape (no view per tensor: a
view costs more than copying a small tensor). fp64 tensors use torch's kernels, which accumulate
in float64 (p >= 1; for p < 1 their final root could overflow, so they are packed or chunked
too). The scratch buffers are kept per thread between calls, and each list of shapes is routed
once (:func:`_plan`, cached).

Over- and underflow: a partial built from fp32 terms or sums is checked, and recomputed with its
terms in float64 if it came out non-finite (a term or sum above fp32's range: |x| > 2^64 at
p = 2) or below 2^-99 per element (fp32 subnormal terms would no longer be negligible; all-zero
tensors included). Deciding that reads one flag per call, which on CPU synchronises with
nothing. Every float64 path matches the float64 reference (abs, pow, sum) over the inputs'
whole range.

On CUDA the kernels reduce in trees; there torch's foreach norm runs as it always has. The
infinity norm (a max) is exact in any precision: large CPU tensors use ``aminmax``, a
vectorised kernel several times faster than torch's norm, and small ones are packed and
reduced per segment like the power sums.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import lru_cache
from itertools import repeat
from operator import attrgetter, is_
from typing import Sequence

import torch

from ..compat.pytorch import foreach_norm

ACC_DTYPE = torch.float64


def _lanes() -> int:
    """fp32 lanes of torch's CPU vector type: 16 with AVX-512, else 8 (AVX2, NEON pairs)."""
    return 16 if "AVX512" in str(torch.backends.cpu.get_cpu_capability()).upper() else 8


ROW = 16 * _lanes()  # p = 2: values per row of the last-dim kernel (every lane adds 16 terms)
COLUMN = 16  # p = 1: terms per column sum (at most 15 roundings each)
BLOCKED_FROM = 1 << 14  # p = 1, 2: from here a tensor goes through the row / column kernels (its tail is packed);
# below, it is packed whole with the small ones (float64 terms: exact, one copy for all of them)
LARGE = 1 << 16  # other p: from here a tensor is reduced on its own in chunks, smaller ones are packed
CHUNK = 1 << 17  # elements per chunk of a large tensor and per packed batch: in a core's L2 cache
BLOCK_CHUNK = 1 << 18  # p = 2, bf16/fp16: elements per fp32 chunk of the row kernel (an op costs microseconds)
_KEEP = 1 << 22  # scratch buffers up to this many elements are kept between calls (larger ones are not)
_MAX_GROUPS = 16  # packed pieces of at most this many distinct lengths are summed as matrices
_SUBNORMAL_FLOOR = 2.0**-99  # per element: below this mean term, fp32 subnormal terms may matter
_AMINMAX_FROM = 1 << 15  # p = inf on CPU: from this size aminmax, below it packed (a max per segment)
_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # others: torch's foreach norm

_DTYPE = attrgetter("dtype")
_SHAPE = attrgetter("shape")


@torch.no_grad()
def power_sums(tensors: Sequence[torch.Tensor], p: float) -> torch.Tensor:
    """Per tensor: sum |t|^p (max |t| for p = inf), as a float64 1-D tensor on the tensors' device.

    All tensors share one device and one floating dtype; an empty tensor gives 0. Linear cost
    in the number of tensors and of elements; no host synchronisation (on CPU one flag is read,
    see the module docstring: there is no device to wait for).
    """
    if not p > 0:
        raise ValueError(f"power_sums needs p > 0 (or inf), got {p!r}")
    if not isinstance(tensors, list):
        tensors = list(tensors)
    if not tensors:
        return torch.zeros(0, dtype=ACC_DTYPE)
    dtype = tensors[0].dtype
    if not all(map(is_, repeat(dtype), map(_DTYPE, tensors))):
        raise ValueError("power_sums needs tensors of one dtype; group them by dtype first "
                         f"(got {sorted({str(t.dtype) for t in tensors})})")
    on_cpu = tensors[0].device.type == "cpu"
    if math.isinf(p):  # exact in any precision
        if not on_cpu or dtype not in _CPU_DTYPES:
            return _max_abs(tensors)
        plan = _plan("max", tuple(map(_SHAPE, tensors)))
        return plan.run_max(plan.contiguous(tensors))
    if not on_cpu or (dtype == torch.float64 and p >= 1) or dtype not in _CPU_DTYPES:
        return _foreach_power_sums(tensors, p)
    plan = _plan(_method(dtype, p), tuple(map(_SHAPE, tensors)), dtype == torch.float32)
    return plan.run(plan.contiguous(tensors), p)


def _method(dtype: torch.dtype, p: float) -> str:
    """How the CPU takes the terms of large tensors: 'rows' (p = 2: the row kernel, on the tensor itself in
    fp32, on fp32 copies of chunks in bf16/fp16), 'columns' (p = 1: column sums of |x| in fp32), 'fp64' (exact
    terms: fp64 tensors), 'fp32' (pow in fp32: any other p)."""
    if dtype != torch.float64 and p == 2:
        return "rows"
    if dtype != torch.float64 and p == 1:
        return "columns"
    return "fp64" if dtype == torch.float64 else "fp32"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """torch's kernels accumulate bf16/fp16 in fp32 (never in the gradient's own low precision)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _foreach_power_sums(tensors: list[torch.Tensor], p: float) -> torch.Tensor:
    """torch's foreach norm, raised to p in float64: tree reductions on CUDA, float64 ones for fp64."""
    norms = torch.stack(foreach_norm(tensors, p, dtype=_acc_dtype(tensors[0].dtype))).to(ACC_DTYPE)
    return norms if p == 1 else norms.pow(p)


def _max_abs(tensors: list[torch.Tensor]) -> torch.Tensor:
    """max |t| per tensor off the CPU (and for dtypes the CPU plan does not take), 0 for an empty one
    (foreach raises on those: max has no identity)."""
    dtype = _acc_dtype(tensors[0].dtype)
    values = [tensors[0].new_zeros((), dtype=dtype)] * len(tensors)
    small = [i for i, t in enumerate(tensors) if t.numel()]
    if small:
        for i, v in zip(small, foreach_norm([tensors[i] for i in small], math.inf, dtype=dtype)):
            values[i] = v
    return torch.stack(values).to(ACC_DTYPE)


# ------------------------------------------------------------------ CPU plan
Piece = tuple[int, int, int]  # a tensor, its first element taken, and how many


@dataclass(frozen=True)
class _Segments:
    """Consecutive segments of a flat buffer: (count, length) groups if few distinct runs."""

    groups: tuple[tuple[int, int], ...] | None  # None: too many distinct runs, see ``lengths``
    lengths: torch.Tensor

    @classmethod
    def of(cls, lengths: list[int]) -> "_Segments":
        groups: list[list[int]] = []
        for n in lengths:
            if groups and groups[-1][1] == n:
                groups[-1][0] += 1
            else:
                groups.append([1, n])
        kept = tuple((c, n) for c, n in groups) if len(groups) <= _MAX_GROUPS else None
        return cls(kept, torch.tensor(lengths, dtype=torch.long))

    def sums(self, values: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """Each segment's sum (``reduce='sum'``) or max (``'max'``): a matrix reduction per group (vectorised),
        else segment_reduce."""
        if self.groups is None:
            return torch.segment_reduce(values, reduce, lengths=self.lengths)
        parts, at = [], 0
        for count, n in self.groups:
            block = values[at : at + count * n].view(count, n)
            parts.append(block.sum(1) if reduce == "sum" else block.amax(1))
            at += count * n
        return torch.cat(parts) if len(parts) > 1 else parts[0]


@dataclass(frozen=True)
class _Part:
    """Pieces copied by one call into ``[start, end)`` of a packed buffer.

    ``kind``: 'cat' (whole tensors sharing ``shape[1:]``, concatenated along their first dimension: no
    view per tensor), 'stack' (whole 0-dim tensors), 'flat' (ranges of tensors, through flat views).
    """

    kind: str
    trailing: tuple[int, ...]
    pieces: tuple[Piece, ...]  # for 'flat': ranges of contiguous tensors, or whole 1-D tensors (any strides)
    start: int
    end: int

    def copy(self, tensors: list[torch.Tensor], into: torch.Tensor) -> None:
        out = into[self.start : self.end]
        if self.kind == "cat":
            torch.cat([tensors[i] for i, _, _ in self.pieces], out=out.view(-1, *self.trailing))
        elif self.kind == "stack":
            torch.stack([tensors[i] for i, _, _ in self.pieces], out=out)
        else:  # ranges through flat views; whole 1-D tensors as they are
            torch.cat([_flat(tensors[i], start, n) if start or n != tensors[i].numel() else tensors[i]
                       for i, start, n in self.pieces], out=out)


@dataclass(frozen=True)
class _Batch:
    """Pieces of tensors packed side by side (at most CHUNK elements in all)."""

    pieces: tuple[Piece, ...]  # in buffer order
    parts: tuple[_Part, ...]
    segments: _Segments
    size: int

    def gather(self, tensors: list[torch.Tensor], into: torch.Tensor) -> torch.Tensor:
        """The pieces in order, in ``into`` (a buffer of their dtype, of at least ``size`` elements)."""
        if into.numel() != self.size:
            into = into[: self.size]
        for part in self.parts:
            part.copy(tensors, into)
        return into


@dataclass(frozen=True)
class _Blocked:
    """A large tensor through the row (p = 2) or column (p = 1) kernel: ``chunks`` of (first element, length)
    (whole rows or columns), whose fp32 results go to ``[at, at + outputs)`` of the block buffer."""

    tensor: int
    chunks: tuple[tuple[int, int], ...]
    at: int
    outputs: int


@dataclass(frozen=True)
class _Plan:
    """How one list of tensor shapes is reduced on CPU.

    Partials come out in this order: one per blocked tensor (row or column kernel), chunks of
    large tensors, packed small pieces (in each batch's buffer order).
    """

    method: str
    num_tensors: int
    blocked: tuple[_Blocked, ...]  # 'rows' and 'columns': the large tensors
    block_outputs: int  # fp32 results of the row / column kernel in all
    block_segments: _Segments  # the results of each blocked tensor
    chunked: tuple[int, ...]  # 'fp32' / 'fp64' large tensors, one partial per chunk (for 'max': one aminmax each)
    small_batches: tuple[_Batch, ...]  # small tensors and the tails of blocked ones
    viewed: tuple[int, ...]  # the tensors read through flat views (blocked, chunked): must be contiguous
    partial_of: torch.Tensor  # the tensor of each partial
    one_partial_each: bool  # partial_of is 0, 1, 2, ...: the partials are the result
    position: torch.Tensor | None  # when each tensor has exactly one partial: where it is (a permutation)
    sources: tuple[Piece, ...]  # the values of each partial
    bounds: tuple[torch.Tensor, torch.Tensor] | None  # per partial of fp32 terms or sums (the first ones), the
    # range it is trusted in: from the least sum at which fp32 subnormal terms are negligible to float64's max;
    # None when no partial has fp32 terms

    def contiguous(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors, those read through flat views made contiguous (the packed ones are copied by ``cat``,
        which reads any strides)."""
        if all(tensors[i].is_contiguous() for i in self.viewed):
            return tensors
        out = list(tensors)
        for i in self.viewed:
            out[i] = out[i].contiguous()
        return out

    def run(self, tensors: list[torch.Tensor], p: float) -> torch.Tensor:
        parts = []
        if self.blocked:
            parts.append(self._blocked_sums(tensors))
        in_fp32 = self.method == "fp32"
        for i in self.chunked:
            parts.append(torch.stack([_terms(c, p, in_fp32).sum() for c in tensors[i].view(-1).split(CHUNK)]))
        for batch in self.small_batches:
            parts.append(batch.segments.sums(_packed_terms(batch, tensors, p, in_fp32)))
        if not parts:
            return torch.zeros(self.num_tensors, dtype=ACC_DTYPE)
        partials = torch.cat(parts) if len(parts) > 1 else parts[0]
        if self.bounds is not None:  # the partials of fp32 terms or sums come first
            floor = self.bounds[0]
            self._recheck(partials if floor.numel() == partials.numel() else partials[: floor.numel()], tensors, p)
        return self._per_tensor(partials)

    def run_max(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """p = inf: max |t| per tensor (exact: float64 holds every value), 0 for an empty one."""
        acc = _acc_dtype(tensors[0].dtype)
        parts = []
        for i in self.chunked:  # max|t| = max(max t, -min t); NaN propagates
            low, high = torch.aminmax(tensors[i])
            parts.append(torch.maximum(high, -low).to(acc).reshape(1))
        for batch in self.small_batches:  # |x| and the max are exact in the tensors' own dtype
            packed = batch.gather(tensors, _buffer(tensors[0].dtype, batch.size)).abs_()
            parts.append(batch.segments.sums(packed, "max").to(acc))
        if not parts:
            return torch.zeros(self.num_tensors, dtype=ACC_DTYPE)
        return self._per_tensor((torch.cat(parts) if len(parts) > 1 else parts[0]).to(ACC_DTYPE))

    def _per_tensor(self, partials: torch.Tensor) -> torch.Tensor:
        """Each tensor's result from the partials in plan order: they are the results, reordered, or summed per
        tensor (a tensor with none, an empty one, gives 0; for the max plan every other tensor has exactly one,
        and 0 + x is x)."""
        if self.one_partial_each:
            return partials
        if self.position is not None:
            return partials.index_select(0, self.position)
        return torch.zeros(self.num_tensors, dtype=ACC_DTYPE).index_add_(0, self.partial_of, partials)

    def _blocked_sums(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Per blocked tensor, the float64 sum of its rows' squared fp32 norms (p = 2) or of its fp32 column
        sums of |x| (p = 1)."""
        results = _buffer(torch.float32, self.block_outputs, "blocks")
        rows = self.method == "rows"
        for block in self.blocked:
            t = tensors[block.tensor]
            out = results[block.at : block.at + block.outputs]
            if rows and t.dtype == torch.float32:  # the kernel on the tensor itself: one view, no copy
                torch.linalg.vector_norm(_rows(t, block.outputs), 2, dim=1, out=out)
                continue
            flat, at = t.view(-1), 0
            for start, n in block.chunks:  # a cache-resident fp32 copy of each chunk (|x| for p = 1)
                chunk = flat[start : start + n]
                if rows:
                    wide = _buffer(torch.float32, n, "chunk").copy_(chunk)
                    torch.linalg.vector_norm(wide.view(-1, ROW), 2, dim=1, out=out[at : at + n // ROW])
                    at += n // ROW
                else:
                    wide = torch.abs(chunk, out=_buffer(torch.float32, n)) if t.dtype == torch.float32 \
                        else _buffer(torch.float32, n).copy_(chunk).abs_()
                    torch.sum(wide.view(COLUMN, -1), 0, out=out[at : at + n // COLUMN])
                    at += n // COLUMN
        results = _buffer(ACC_DTYPE, self.block_outputs, "blocks").copy_(results)
        if rows:  # the row norms squared in float64 (exact)
            results.square_()
        return self.block_segments.sums(results)

    def _recheck(self, partials: torch.Tensor, tensors: list[torch.Tensor], p: float) -> None:
        """Recompute with float64 terms the partials of fp32 terms that overflowed or may have underflowed.

        A partial is fine within [floor, float64 max]; the others (a NaN too) are recomputed. (Partials of
        float64 terms are not checked: recomputed, a non-finite one would come out the same.)
        """
        assert self.bounds is not None  # called only for a plan with partials of fp32 terms
        floor, ceiling = self.bounds
        ok = partials.clamp(floor, ceiling) == partials
        if not ok.all():  # rare; on CPU, reading the flag synchronises with nothing
            for k in ok.logical_not_().nonzero().flatten().tolist():
                i, start, n = self.sources[k]  # a packed tensor may be strided: reshape copies it then
                values = _flat(tensors[i], start, n) if i in self.viewed else tensors[i].reshape(-1)[start : start + n]
                partials[k] = sum(_terms(c, p, in_fp32=False).sum() for c in values.split(CHUNK))


def _rows(t: torch.Tensor, m: int) -> torch.Tensor:
    """The first m * ROW values of a contiguous tensor as an (m, ROW) matrix (one view, no copy)."""
    return t.as_strided((m, ROW), (ROW, 1))


def _flat(t: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Values [start, start + n) of a contiguous tensor, flat (one view, no copy)."""
    return t.as_strided((n,), (1,), t.storage_offset() + start)


def _batches(pieces: list[tuple[Piece, tuple[int, ...] | None]]) -> list[_Batch]:
    """(piece, shape of a whole tensor or None for a range) in batches of at most CHUNK elements.

    In a batch the pieces are ordered by how they are copied (whole tensors by trailing shape, then
    ranges) and by length within that, so that equal lengths sit side by side (summed as a matrix).
    """
    def order(entry: tuple[Piece, tuple[int, ...] | None]) -> tuple:
        (_, _, n), shape = entry
        if shape is None or len(shape) == 1:  # ranges and 1-D tensors: one flat cat
            return (2, (), n)
        return (0, tuple(shape[1:]), n) if len(shape) else (1, (), n)

    groups: list[list[tuple[Piece, tuple[int, ...] | None]]] = []
    total = 0
    for entry in sorted(pieces, key=order):
        n = entry[0][2]
        if not groups or total + n > CHUNK:
            groups.append([])
            total = 0
        groups[-1].append(entry)
        total += n
    out = []
    for group in groups:
        parts: list[_Part] = []
        at = 0
        for piece, shape in group:
            kind, trailing = (("flat", ()) if shape is None or len(shape) == 1 else
                              ("cat", tuple(shape[1:])) if len(shape) else ("stack", ()))
            n = piece[2]
            if parts and parts[-1].kind == kind and parts[-1].trailing == trailing:
                last = parts[-1]
                parts[-1] = _Part(kind, trailing, last.pieces + (piece,), last.start, at + n)
            else:
                parts.append(_Part(kind, trailing, (piece,), at, at + n))
            at += n
        ordered = tuple(piece for piece, _ in group)
        out.append(_Batch(ordered, tuple(parts), _Segments.of([n for _, _, n in ordered]), at))
    return out


def _blocks(method: str, i: int, n: int, dtype_is_fp32: bool, at: int) -> _Blocked:
    """Tensor ``i`` of ``n`` elements through the row / column kernel: its whole rows (columns), in chunks."""
    unit = ROW if method == "rows" else COLUMN
    covered = n // unit * unit
    if method == "rows" and dtype_is_fp32:  # the kernel reads the tensor itself
        return _Blocked(i, ((0, covered),), at, covered // ROW)
    step = (BLOCK_CHUNK if method == "rows" else CHUNK) // unit * unit
    chunks = tuple((j, min(step, covered - j)) for j in range(0, covered, step))  # whole rows / columns each
    return _Blocked(i, chunks, at, covered // unit)


@lru_cache(maxsize=1024)  # one plan per list of shapes (and dtype): per bucket for the comm hooks
def _plan(method: str, shapes: tuple[torch.Size, ...], fp32: bool = True) -> _Plan:
    """Route every tensor, once per list of shapes (cached: the per-step path builds no tensors)."""
    numels = [math.prod(s) for s in shapes]
    blocked: list[_Blocked] = []
    chunked: list[int] = []
    small: list[tuple[tuple[int, int, int], tuple[int, ...] | None]] = []
    at = 0
    for i, (n, shape) in enumerate(zip(numels, shapes)):
        if method in ("rows", "columns") and n >= BLOCKED_FROM:
            block = _blocks(method, i, n, fp32, at)
            blocked.append(block)
            at += block.outputs
            covered = sum(k for _, k in block.chunks)
            if n > covered:
                small.append(((i, covered, n - covered), None))
        elif method not in ("rows", "columns") and n >= (_AMINMAX_FROM if method == "max" else LARGE):
            chunked.append(i)
        elif n:
            small.append(((i, 0, n), tuple(shape)))
    small_batches = _batches(small)
    sources: list[Piece] = [(b.tensor, 0, sum(k for _, k in b.chunks)) for b in blocked]
    checked = [True] * len(sources)  # blocked partials come from fp32 squares or sums
    for i in chunked:
        step = numels[i] if method == "max" else CHUNK
        sources += [(i, j, min(step, numels[i] - j)) for j in range(0, numels[i], step)]
    sources += [piece for b in small_batches for piece in b.pieces]
    checked += [method == "fp32"] * (len(sources) - len(checked))  # a prefix: blocked first, or all
    floor = [n * _SUBNORMAL_FLOOR for (_, _, n), fp32_terms in zip(sources, checked) if fp32_terms]
    partial_of = [i for i, _, _ in sources]
    return _Plan(
        method, len(numels), tuple(blocked), at, _Segments.of([b.outputs for b in blocked]), tuple(chunked),
        tuple(small_batches), tuple(dict.fromkeys([b.tensor for b in blocked] + chunked)),
        torch.tensor(partial_of, dtype=torch.long), partial_of == list(range(len(numels))), _position(partial_of),
        tuple(sources),
        _bounds(floor) if any(checked) and method != "max" else None,
    )


def _position(partial_of: list[int]) -> torch.Tensor | None:
    """Where each tensor's partial is, when every tensor has exactly one (else None)."""
    if sorted(partial_of) != list(range(len(partial_of))):
        return None
    position = [0] * len(partial_of)
    for k, i in enumerate(partial_of):
        position[i] = k
    return torch.tensor(position, dtype=torch.long)


def _bounds(floor: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    low = torch.tensor(floor, dtype=ACC_DTYPE)
    return low, torch.full_like(low, torch.finfo(ACC_DTYPE).max)


# ---------------------------------------------------------------- CPU kernels
_scratch = threading.local()  # per thread: scratch buffers reused by every call


def _buffer(dtype: torch.dtype, n: int, use: str = "terms") -> torch.Tensor:
    """n elements of this thread's scratch buffer of ``dtype`` for ``use`` ('terms': chunks and packed pieces,
    CHUNK elements; 'chunk': the row kernel's fp32 chunks, BLOCK_CHUNK; 'blocks': the row / column kernel's
    results, kept up to _KEEP elements). Grown as needed; a fresh tensor above those sizes."""
    if n > max(CHUNK, BLOCK_CHUNK if use == "chunk" else _KEEP if use == "blocks" else 0):
        return torch.empty(n, dtype=dtype)
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (dtype, use)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < n:
        buffer = buffers[key] = torch.empty(max(n, CHUNK if use == "terms" else n), dtype=dtype)
    return buffer[:n]


def _terms(values: torch.Tensor, p: float, in_fp32: bool) -> torch.Tensor:
    """|values|^p in float64 (in scratch; ``values``: flat, at most CHUNK elements, left unchanged).

    ``in_fp32``: the power is taken in fp32 (vectorised ``pow``, within 1 ulp), else in float64.
    """
    wide = _buffer(ACC_DTYPE, values.numel())
    if in_fp32:
        narrow = _buffer(torch.float32, values.numel())
        if values.dtype == torch.float32:
            torch.abs(values, out=narrow)
        else:
            narrow.copy_(values).abs_()
        return torch.pow(narrow, p, out=wide)  # computed in fp32, written as float64: one pass
    wide.copy_(values)
    return _exact_terms(wide, p)


def _packed_terms(batch: _Batch, tensors: list[torch.Tensor], p: float, in_fp32: bool) -> torch.Tensor:
    """|piece|^p in float64 for every piece of ``batch``, side by side (in scratch): :func:`_terms` on the
    packed pieces."""
    dtype = tensors[0].dtype
    raw = batch.gather(tensors, _buffer(dtype, batch.size))  # packed in the tensors' dtype (a cast in cat is slow)
    wide = _buffer(ACC_DTYPE, batch.size)
    if in_fp32:
        narrow = raw if dtype == torch.float32 else _buffer(torch.float32, batch.size).copy_(raw)
        return torch.pow(narrow.abs_(), p, out=wide)
    return _exact_terms(wide if dtype == ACC_DTYPE else wide.copy_(raw), p)


def _exact_terms(wide: torch.Tensor, p: float) -> torch.Tensor:
    """|wide|^p in place (float64)."""
    if p == 2:
        return wide.square_()
    wide.abs_()
    return wide if p == 1 else wide.pow_(p)
