"""ATTRIBUTE (bad steps only): which parameters, on which ranks, hold the NaN or inf of a non-finite step.

A non-finite reduced norm says THAT some element is NaN or inf, not where. On such a step, and only
there (the decision has already read the non-finite flag on the host, the same on every rank, so
every rank takes part), each rank looks through every gradient piece it holds (its shards and its
copies of replicated ranges: the adapter's ``held_pieces``, padding excluded) and sets one bit per
parameter of the whole model; ONE all-gather of those bits (``ceil(P / 8)`` bytes per rank) gives
every rank the same parameter x rank table. Good steps issue nothing and read nothing.

A replicated gradient (DDP, a ``Replicate`` dimension) is held by every replica: a NaN the
reduction spread is found on all of them; a value found on one rank only is in that rank's copy
or shard. A norm that overflowed (every element finite, the p-th power sum too large for float64)
gives an empty attribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist

from ..compat import pytorch as _compat
from .contract import GradAdapter
from .reduce import gather_rows

__all__ = ["Attribution", "Attributor"]

_BITS = 8
_BATCH = 1 << 24  # elements per foreach batch of the non-finite search (its scratch: 64 MB in fp32)


@dataclass(frozen=True)
class Attribution:
    """Where a non-finite step's NaN / inf values are (the same on every rank)."""

    params: tuple[str, ...]  # canonical names, in model order
    ranks: tuple[int, ...]  # global ranks, ascending
    where: dict[str, tuple[int, ...]] = field(default_factory=dict)  # name -> the ranks holding one in it

    def describe(self, limit: int = 8) -> str:
        """One line for error messages, e.g. ``blocks.1.attn.weight (ranks [1]), head.bias (ranks [0, 1])``."""
        if not self.params:
            return ("No parameter holds a NaN or inf on any rank: the norm itself overflowed (every element is "
                    "finite; the sum of |g|^p is too large for float64)")
        shown = ", ".join(f"{n} (ranks {list(self.where[n])})" for n in self.params[:limit])
        more = f" and {len(self.params) - limit} more" if len(self.params) > limit else ""
        return f"Non-finite values in {shown}{more}; ranks holding them: {list(self.ranks)}."


class Attributor:
    """The attribution of one clipper: the bit layout (every parameter of the job, the same on every rank).

    Args:
        adapter: the gradient layout (its ``held_pieces`` and ``reduce_group``).
        names: every parameter name of the job in model order (under pipeline parallelism, every stage's):
            the same set on every rank. Bits follow their sorted order, so that equal sets give equal layouts.
    """

    def __init__(self, adapter: GradAdapter, names: Sequence[str]):
        self.adapter = adapter
        self.names = list(dict.fromkeys(names))
        ordered = sorted(self.names)
        bit_of = {n: b for b, n in enumerate(ordered)}
        self._ordered = ordered
        self._position = {n: i for i, n in enumerate(self.names)}
        self._local_bits = [bit_of[n] for n in adapter.names]  # bit of each of this rank's parameters
        group = adapter.reduce_group
        if group is None:
            self._ranks = [dist.get_rank() if dist.is_available() and dist.is_initialized() else 0]
        else:
            self._ranks = list(dist.get_process_group_ranks(group))

    @torch.no_grad()
    def __call__(self) -> Attribution:
        """Find the non-finite values (every rank of the reduce group must call this at the same clip)."""
        pieces, params = self.adapter.held_pieces()
        device = self.adapter.collective_device(pieces)
        count = len(self._ordered)
        hits = torch.zeros(count, dtype=torch.long, device=device)
        if pieces:
            index = torch.tensor([self._local_bits[j] for j in params], dtype=torch.long, device=device)
            hits.index_add_(0, index, nonfinite_flags(pieces, device).long())
        table = _unpack(gather_rows(self.adapter.reduce_group, _pack(hits > 0)).cpu(), count)  # the one read
        where: dict[str, list[int]] = {}
        for r, b in table.nonzero().tolist():
            where.setdefault(self._ordered[b], []).append(self._ranks[r])
        params_found = tuple(sorted(where, key=self._position.__getitem__))
        ranks = tuple(sorted({r for rs in where.values() for r in rs}))
        return Attribution(params_found, ranks, {n: tuple(where[n]) for n in params_found})


def nonfinite_flags(pieces: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Per piece, whether it holds a NaN or an inf (bool, on ``device``); exact for any values.

    ``x * 0`` is 0 for every finite ``x`` and NaN for NaN and inf, so the 1-norm of ``piece * 0`` is NaN
    exactly when the piece holds a non-finite value (a sum of zeros cannot overflow, as a sum of the
    values could). Computed with foreach kernels per device and dtype, in batches of at most ``_BATCH``
    elements (the products are scratch memory: bounded, whatever the model's size).
    """
    parts: list[torch.Tensor] = []
    owners: list[int] = []
    for _, (same_kind, indices) in _compat.group_by_device_and_dtype(list(pieces)).items():
        for t, i in zip(same_kind, indices):
            if t.numel() <= _BATCH:
                parts.append(t)
                owners.append(i)
                continue
            flat = t.reshape(-1)
            for lo in range(0, flat.numel(), _BATCH):
                parts.append(flat[lo : lo + _BATCH])
                owners.append(i)
    found = []
    start = 0
    while start < len(parts):  # consecutive parts share a device and a dtype within each group
        end, size = start, 0
        while end < len(parts) and (end == start or (size + parts[end].numel() <= _BATCH
                                                    and parts[end].device == parts[start].device
                                                    and parts[end].dtype == parts[start].dtype)):
            size += parts[end].numel()
            end += 1
        sums = _compat.foreach_norm(_compat.foreach_mul(parts[start:end], 0.0), 1)
        found.append(torch.stack(sums).isnan().to(device))
        start = end
    counts = torch.zeros(len(pieces), dtype=torch.long, device=device)
    if found:  # a piece taken in several parts is non-finite if any part is
        counts.index_add_(0, torch.tensor(owners, dtype=torch.long, device=device), torch.cat(found).long())
    return counts > 0


def _pack(bits: torch.Tensor) -> torch.Tensor:
    """A bool vector as bytes, 8 flags each (little-endian bit order), at least one byte."""
    pad = (-bits.numel()) % _BITS or (_BITS if bits.numel() == 0 else 0)
    padded = torch.cat([bits, bits.new_zeros(pad)]).view(-1, _BITS).to(torch.uint8)
    weights = torch.tensor([1 << k for k in range(_BITS)], dtype=torch.uint8, device=bits.device)
    return (padded * weights).sum(dim=1).to(torch.uint8)


def _unpack(rows: torch.Tensor, count: int) -> torch.Tensor:
    """``(world, bytes)`` uint8 -> ``(world, count)`` bool (the inverse of :func:`_pack`, per row)."""
    shifts = torch.arange(_BITS, dtype=torch.uint8)
    return ((rows.unsqueeze(-1) >> shifts) & 1).reshape(rows.shape[0], -1)[:, :count].bool()
