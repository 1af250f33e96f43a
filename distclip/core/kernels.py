"""Exact local power sums: per tensor, sum |t|^p (max |t| for p = inf) in float64.

torch's CPU norm kernels accumulate in fp32, one running sum per thread (p = 1, fractional p)
or per vector lane (p = 2): on a 50M-element gradient they miss float64 by 16% (p = 1), and
1,200 equal values already miss it by 1e-6. On CPU, :func:`power_sums` keeps every partial
within 1e-6 (relative) of float64 on the same values, at about the cost of torch's fp32 kernel.
No fp32 sum in it runs over more than a few terms:

- fp32 at p = 2: torch's vectorised last-dim kernel on rows of ``ROW`` values (16 lanes of 16
  terms, then 15 additions folding the lanes); the row results are squared (in fp32) and summed
  in float64. Worst case over every input of equal values (all 2^23 mantissas tried): 6.6e-7;
  random rows err by about 1e-7 each and cancel across rows. (The a-priori bound, for rows
  built to round the same way at every step, is about 33 fp32 roundings of 2^-24: 2e-6.)
- p = 1, and p = 2 in bf16/fp16: the terms in float64 (|x| and x^2 are exact there).
- any other p: the terms |x|^p in fp32 (``pow`` within 1 ulp each), summed in float64.

Large tensors are taken in chunks of ``CHUNK`` values held in cache; small tensors (and what
is left after the last row) are packed into one buffer; fp64 tensors use torch's kernels, which
accumulate in float64 (p >= 1; for p < 1 their final root could overflow, so they are packed or
chunked too). The cache-sized scratch buffers (12 MB) are kept per thread between calls.

Over- and underflow: a partial built from fp32 terms is checked, and recomputed with its terms
in float64 if it came out non-finite (a term above fp32's range: |x| > 2^64 at p = 2) or below
2^-99 per element (fp32 subnormal terms would no longer be negligible; all-zero tensors
included). Deciding that reads one flag per call, which on CPU synchronises with nothing.
Every float64 path matches the float64 reference (abs, pow, sum) over the inputs' whole range.

On CUDA the kernels reduce in trees; there torch's foreach norm runs as it always has. The
infinity norm (a max) is exact in any precision: large CPU tensors use ``aminmax``, a
vectorised kernel several times faster than torch's norm.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

from ..compat.pytorch import flatten_dense_tensors, foreach_norm

ACC_DTYPE = torch.float64

ROW = 256  # fp32, p = 2: values per row of the last-dim kernel (16 lanes x 16 terms)
LARGE = 1 << 16  # elements: from here a tensor is reduced on its own, smaller ones are packed
ROWS_ALONE = 1 << 14  # fp32, p = 2: from here the row kernel runs on the tensor itself (no packing copy)
ROWS_FROM = 1 << 12  # fp32, p = 2: below this a tensor is packed whole with the small ones (float64 terms:
# exact, and one C++ flatten for all of them instead of a rows part and a tail per tensor)
CHUNK = 1 << 20  # elements per cache-resident chunk of a large tensor, and per packed batch
_MAX_GROUPS = 16  # packed pieces of at most this many distinct lengths are summed as matrices
_SUBNORMAL_FLOOR = 2.0**-99  # per element: below this mean term, fp32 subnormal terms may matter
_AMINMAX_FROM = 1 << 15  # p = inf on CPU: from this size aminmax, below it torch's foreach norm
_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # others: torch's foreach norm


@torch.no_grad()
def power_sums(tensors: Sequence[torch.Tensor], p: float) -> torch.Tensor:
    """Per tensor: sum |t|^p (max |t| for p = inf), as a float64 1-D tensor on the tensors' device.

    All tensors share one device and one floating dtype; an empty tensor gives 0. Linear cost
    in the number of tensors and of elements; no host synchronisation (on CPU one flag is read,
    see the module docstring: there is no device to wait for).
    """
    if not p > 0:
        raise ValueError(f"power_sums needs p > 0 (or inf), got {p!r}")
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(0, dtype=ACC_DTYPE)
    dtype = tensors[0].dtype
    if any(t.dtype != dtype for t in tensors):
        raise ValueError("power_sums needs tensors of one dtype; group them by dtype first "
                         f"(got {sorted({str(t.dtype) for t in tensors})})")
    if math.isinf(p):
        return _max_abs(tensors)  # exact in any precision
    if tensors[0].device.type != "cpu" or (dtype == torch.float64 and p >= 1) or dtype not in _CPU_DTYPES:
        return _foreach_power_sums(tensors, p)
    tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    return _plan(_method(dtype, p), tuple(t.numel() for t in tensors)).run(tensors, p)


def _method(dtype: torch.dtype, p: float) -> str:
    """How the CPU takes the terms: 'rows' (fp32, p = 2), 'fp64' (exact terms), 'fp32' (pow in fp32)."""
    if dtype == torch.float32 and p == 2:
        return "rows"
    return "fp64" if dtype == torch.float64 or p in (1, 2) else "fp32"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """torch's kernels accumulate bf16/fp16 in fp32 (never in the gradient's own low precision)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _foreach_power_sums(tensors: list[torch.Tensor], p: float) -> torch.Tensor:
    """torch's foreach norm, raised to p in float64: tree reductions on CUDA, float64 ones for fp64."""
    norms = torch.stack(foreach_norm(tensors, p, dtype=_acc_dtype(tensors[0].dtype))).to(ACC_DTYPE)
    return norms if p == 1 else norms.pow(p)


def _max_abs(tensors: list[torch.Tensor]) -> torch.Tensor:
    """max |t| per tensor, 0 for an empty one (foreach raises on those: max has no identity).

    On CPU torch's infinity-norm kernel is an unvectorised reduction several times slower than
    ``aminmax``, so large tensors use max|t| = max(max t, -min t) (NaN propagates).
    """
    dtype = _acc_dtype(tensors[0].dtype)
    on_cpu = tensors[0].device.type == "cpu"
    values = [tensors[0].new_zeros((), dtype=dtype)] * len(tensors)
    small = []
    for i, t in enumerate(tensors):
        n = t.numel()
        if on_cpu and n >= _AMINMAX_FROM:
            low, high = torch.aminmax(t)
            values[i] = torch.maximum(high, -low).to(dtype)
        elif n:
            small.append(i)
    if small:
        for i, v in zip(small, foreach_norm([tensors[i] for i in small], math.inf, dtype=dtype)):
            values[i] = v
    return torch.stack(values).to(ACC_DTYPE)


# ------------------------------------------------------------------ CPU plan
Piece = tuple[int, int, int]  # a tensor, its first element taken, and how many


@dataclass(frozen=True)
class _Segments:
    """Consecutive segments of a flat buffer, sorted by length: (count, length) groups if few."""

    groups: tuple[tuple[int, int], ...] | None  # None: too many distinct lengths, see ``lengths``
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

    def sums(self, values: torch.Tensor) -> torch.Tensor:
        """float64 sum of each segment: a matrix row sum per group (vectorised), else segment_reduce."""
        if self.groups is None:
            return torch.segment_reduce(values, "sum", lengths=self.lengths)
        parts, at = [], 0
        for count, n in self.groups:
            parts.append(values[at : at + count * n].view(count, n).sum(1))
            at += count * n
        return torch.cat(parts) if len(parts) > 1 else parts[0]


@dataclass(frozen=True)
class _Batch:
    """Pieces of tensors packed side by side (at most CHUNK elements in all)."""

    pieces: tuple[Piece, ...]
    segments: _Segments
    size: int

    def gather(self, tensors: list[torch.Tensor], into: torch.Tensor | None = None) -> torch.Tensor:
        """The pieces in order, in ``into`` (a buffer of their dtype) or in a fresh flat tensor."""
        if into is None:  # flatten_dense_tensors flattens whole tensors in C++: cheaper for many small ones
            return flatten_dense_tensors([tensors[i] if not start and n == tensors[i].numel()
                                           else _flat(tensors[i], start, n) for i, start, n in self.pieces])
        return torch.cat([_flat(tensors[i], start, n) for i, start, n in self.pieces], out=into)


@dataclass(frozen=True)
class _Plan:
    """How one list of tensor sizes is reduced on CPU.

    Partials come out in this order: row kernel on whole tensors, row kernel on packed medium
    tensors (one partial per piece), chunks of large tensors, packed small pieces.
    """

    method: str
    num_tensors: int
    direct: tuple[tuple[int, int], ...]  # 'rows': (tensor, rows), the kernel on the tensor itself
    direct_segments: _Segments  # rows of each of those
    row_batches: tuple[_Batch, ...]  # 'rows': the row-aligned parts of medium tensors; segments in rows
    chunked: tuple[int, ...]  # large tensors, one partial per chunk
    small_batches: tuple[_Batch, ...]  # small tensors and row tails
    partial_of: torch.Tensor  # the tensor of each partial
    one_partial_each: bool  # partial_of is 0, 1, 2, ...: the partials are the result
    sources: tuple[Piece, ...]  # the values of each partial
    bounds: tuple[torch.Tensor, torch.Tensor] | None  # per partial, the range it is trusted in: from the
    # least sum at which fp32 subnormal terms are negligible (0 for float64 terms) to float64's max;
    # None when no partial has fp32 terms

    def run(self, tensors: list[torch.Tensor], p: float) -> torch.Tensor:
        parts = []
        if self.direct:
            parts.append(self._direct_row_sums(tensors))
        for batch in self.row_batches:
            packed = batch.gather(tensors, into=_buffer(torch.float32, batch.size)).view(-1, ROW)
            parts.append(batch.segments.sums(torch.linalg.vector_norm(packed, 2, dim=1).to(ACC_DTYPE).square_()))
        in_fp32 = self.method == "fp32"
        for i in self.chunked:
            parts.append(torch.stack([_terms(c, p, in_fp32).sum() for c in tensors[i].view(-1).split(CHUNK)]))
        for batch in self.small_batches:
            parts.append(batch.segments.sums(_terms(batch.gather(tensors), p, in_fp32)))
        if not parts:
            return torch.zeros(self.num_tensors, dtype=ACC_DTYPE)
        partials = torch.cat(parts) if len(parts) > 1 else parts[0]
        if self.bounds is not None:
            self._recheck(partials, tensors, p)
        if self.one_partial_each:
            return partials
        return torch.zeros(self.num_tensors, dtype=ACC_DTYPE).index_add_(0, self.partial_of, partials)

    def _direct_row_sums(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """fp32, p = 2: per tensor, the float64 sum of its rows' squared fp32 norms."""
        rows = [m for _, m in self.direct]
        norms = _buffer(torch.float32, sum(rows))
        for (i, m), out in zip(self.direct, norms.split(rows)):
            torch.linalg.vector_norm(_rows(tensors[i], m), 2, dim=1, out=out)
        squares = torch.pow(norms, 2, out=_buffer(ACC_DTYPE, norms.numel()))  # squared in fp32 (+2^-24), one pass
        return self.direct_segments.sums(squares)

    def _recheck(self, partials: torch.Tensor, tensors: list[torch.Tensor], p: float) -> None:
        """Recompute with float64 terms the partials of fp32 terms that overflowed or may have underflowed.

        A partial is fine within [floor, float64 max]; the others (a NaN too) are recomputed. Partials
        with float64 terms have floor 0: they are recomputed (to the same value) only when non-finite.
        """
        floor, ceiling = self.bounds
        ok = partials.clamp(floor, ceiling) == partials
        if not ok.all():  # rare; on CPU, reading the flag synchronises with nothing
            for k in ok.logical_not_().nonzero().flatten().tolist():
                i, start, n = self.sources[k]
                partials[k] = sum(_terms(c, p, in_fp32=False).sum() for c in _flat(tensors[i], start, n).split(CHUNK))


def _rows(t: torch.Tensor, m: int) -> torch.Tensor:
    """The first m * ROW values of a contiguous tensor as an (m, ROW) matrix (one view, no copy)."""
    return t.as_strided((m, ROW), (ROW, 1))


def _flat(t: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Values [start, start + n) of a contiguous tensor, flat (one view, no copy)."""
    return t.as_strided((n,), (1,), t.storage_offset() + start)


def _batches(pieces: list[tuple[Piece, int]], segment_unit: int = 1) -> list[_Batch]:
    """(piece, elements) sorted by size (equal sizes side by side), in batches of at most CHUNK elements."""
    groups: list[list[tuple[Piece, int]]] = []
    total = 0
    for piece, n in sorted(pieces, key=lambda q: q[1]):
        if not groups or total + n > CHUNK:
            groups.append([])
            total = 0
        groups[-1].append((piece, n))
        total += n
    return [_Batch(tuple(q for q, _ in g), _Segments.of([n // segment_unit for _, n in g]), sum(n for _, n in g))
            for g in groups]


@lru_cache(maxsize=1024)  # one plan per list of sizes: per bucket for the comm hooks
def _plan(method: str, numels: tuple[int, ...]) -> _Plan:
    """Route every tensor, once per list of sizes (cached: the per-step path builds no tensors)."""
    direct, medium, chunked, small = [], [], [], []
    for i, n in enumerate(numels):
        m = n // ROW if method == "rows" and n >= ROWS_FROM else 0
        if m:
            if n >= ROWS_ALONE:
                direct.append((i, m))
            else:
                medium.append(((i, 0, m * ROW), m * ROW))
            if n % ROW:
                small.append(((i, m * ROW, n % ROW), n % ROW))
        elif n >= LARGE:
            chunked.append(i)
        elif n:
            small.append(((i, 0, n), n))
    row_batches, small_batches = _batches(medium, ROW), _batches(small)
    sources: list[Piece] = [(i, 0, m * ROW) for i, m in direct]
    sources += [piece for b in row_batches for piece in b.pieces]
    checked = [True] * len(sources)  # row partials come from fp32 squares
    for i in chunked:
        sources += [(i, j, min(CHUNK, numels[i] - j)) for j in range(0, numels[i], CHUNK)]
    sources += [piece for b in small_batches for piece in b.pieces]
    checked += [method == "fp32"] * (len(sources) - len(checked))
    floor = [n * _SUBNORMAL_FLOOR if fp32 else 0.0 for (_, _, n), fp32 in zip(sources, checked)]
    partial_of = [i for i, _, _ in sources]
    return _Plan(
        method, len(numels), tuple(direct), _Segments.of([m for _, m in direct]), tuple(row_batches),
        tuple(chunked), tuple(small_batches), torch.tensor(partial_of, dtype=torch.long),
        partial_of == list(range(len(numels))), tuple(sources), _bounds(floor) if any(checked) else None,
    )


def _bounds(floor: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    low = torch.tensor(floor, dtype=ACC_DTYPE)
    return low, torch.full_like(low, torch.finfo(ACC_DTYPE).max)


# ---------------------------------------------------------------- CPU kernels
_scratch = threading.local()  # per thread: cache-sized buffers reused by every call


def _buffer(dtype: torch.dtype, n: int) -> torch.Tensor:
    """n elements of this thread's scratch buffer of ``dtype`` (a fresh tensor above CHUNK)."""
    if n > CHUNK:
        return torch.empty(n, dtype=dtype)
    buffers = _scratch.__dict__.setdefault("buffers", {})
    if dtype not in buffers:
        buffers[dtype] = torch.empty(CHUNK, dtype=dtype)
    return buffers[dtype][:n]


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
    if p == 2:
        return wide.square_()
    wide.abs_()
    return wide if p == 1 else wide.pow_(p)
