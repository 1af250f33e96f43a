"""The one collective per clip, and the set-up exchange that checks every rank clips the same way.

Both exchange fixed-size tensors only (no pickling, no numpy): per clip the vector of S slots (an
all-reduce of S float64 whatever the world size W; :func:`reduce_slots` says how a layout mixing SUM
and MAX slots stays O(S) too), and at set-up three 60-bit hashes per rank (an all-gather: 24 W bytes
received, checked with tensor ops); details are exchanged (as bytes) only when hashes differ.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.distributed as dist

from ..errors import ConfigMismatchError

if TYPE_CHECKING:
    from .norms import SlotLayout
    from .rowwise import SlotsWithRows

ProcessGroup = Any  # torch.distributed.ProcessGroup; None means "rank-local, no collective"




def group_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def collective_device(group: ProcessGroup | None, hint: torch.device | None) -> torch.device:
    """Where the slot vector lives: a CUDA device when the group speaks NCCL, CPU for gloo.

    Chosen from the backend, not from this rank's gradients, so that a rank holding no
    gradient still joins the same collective on the same kind of device.
    """
    if group is not None:
        backend = str(dist.get_backend(group)).lower()
        if "nccl" in backend:
            if hint is not None and hint.type == "cuda":
                return hint
            return torch.device("cuda", torch.cuda.current_device())
        if "gloo" in backend:
            return torch.device("cpu")
    return hint if hint is not None else torch.device("cpu")


GATHER_LIMIT = 1 << 13  # float64 values a rank may receive in a mixed SUM/MAX clip (64 KiB); beyond: two all-reduces


def reduce_slots(partials: torch.Tensor, layout: "SlotLayout | SlotsWithRows",
                 group: ProcessGroup | None) -> torch.Tensor:
    """Reduce the float64 slot vector across ``group`` in exactly ONE collective (two for a large mixed layout).

    ``layout`` says which slots are maxima (``any_max``, ``all_max``, ``max_mask``): a
    :class:`SlotLayout`, or one followed by row-wise slots (``SlotsWithRows``).

    SUM for p-norm slots, MAX for infinity-norm slots. The result is bitwise identical on every
    rank. Non-finite values always propagate: SUM carries NaN and inf by itself; a MAX all-reduce
    may drop NaN, so infinity-norm slots carry a NaN flag alongside (NaN becomes 0 in the values,
    +inf stays +inf). A layout mixing both kinds all-gathers the vector and folds it locally in rank
    order, while the gathered ``world x slots`` values stay within :data:`GATHER_LIMIT`; beyond it
    (thousands of ranks, or the thousands of row slots of row-wise clipping) it takes a SUM and a MAX
    all-reduce of ``slots`` values each instead, so that no rank receives O(world x slots).
    """
    if group_size(group) == 1:
        return partials
    if not layout.any_max:
        dist.all_reduce(partials, op=dist.ReduceOp.SUM, group=group)
        return partials
    if layout.all_max:
        return _max_all_reduce(partials, group)
    world = dist.get_world_size(group)
    is_max = layout.max_mask(partials.device)
    if world * partials.numel() > GATHER_LIMIT:
        sums = torch.where(is_max, 0.0, partials)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        return torch.where(is_max, _max_all_reduce(torch.where(is_max, partials, 0.0), group), sums)
    gathered = partials.new_empty(world * partials.numel())
    _all_gather_into(gathered, partials, group)
    rows = gathered.view(world, partials.numel())
    return torch.where(is_max, rows.amax(dim=0), rows.sum(dim=0))


def _max_all_reduce(partials: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """MAX over the ranks, NaN kept: NaN travels as a flag beside the values (a MAX all-reduce may drop it)."""
    nan = partials.isnan()
    packed = torch.cat([torch.where(nan, 0.0, partials), nan.to(partials.dtype)])
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    values, any_nan = packed.split(partials.numel())
    return torch.where(any_nan > 0, math.nan, values)


# ---------------------------------------------------------------- set-up exchange
def _all_gather_into(out: torch.Tensor, mine: torch.Tensor, group: ProcessGroup) -> None:
    """All-gather equal-sized tensors into one flat output (``all_gather_single`` where torch has it)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, mine, group=group)


def gather_rows(group: ProcessGroup | None, mine: torch.Tensor) -> torch.Tensor:
    """ONE all-gather of an equal-sized 1-D tensor per rank: a ``(world, n)`` tensor in rank order (``(1, n)``
    without a group)."""
    if group_size(group) == 1:
        return mine.reshape(1, -1)
    out = mine.new_empty(dist.get_world_size(group) * mine.numel())
    _all_gather_into(out, mine.contiguous(), group)
    return out.view(-1, mine.numel())


def hash60(text: str) -> int:
    """A 60-bit integer hash of ``text`` (fits an int64 tensor element)."""
    import hashlib

    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def exchange_ints(group: ProcessGroup, values: Sequence[int]) -> torch.Tensor:
    """All-gather a fixed number of int64 values per rank: a ``(world, len(values))`` tensor, rank order."""
    device = collective_device(group, None)
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    out = mine.new_empty(dist.get_world_size(group) * mine.numel())
    _all_gather_into(out, mine, group)
    return out.view(-1, mine.numel()).cpu()


def exchange_int_rows(group: ProcessGroup, values: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather any number of int64 values per rank (two fixed-size collectives): a ``(world, width)`` CPU
    tensor of the rows, zero-padded, and each rank's number of values (a ``(world,)`` tensor), rank order."""
    sizes = exchange_ints(group, [len(values)])[:, 0]
    width = max(int(sizes.max()), 1)
    mine = torch.zeros(width, dtype=torch.int64)
    mine[: len(values)] = torch.tensor(list(values), dtype=torch.int64)
    mine = mine.to(collective_device(group, None))
    out = mine.new_empty(len(sizes) * width)
    _all_gather_into(out, mine, group)
    return out.view(len(sizes), width).cpu(), sizes


def exchange_bytes(group: ProcessGroup, payload: bytes) -> list[bytes]:
    """All-gather a byte string of any length per rank (two fixed-size collectives, no pickling)."""
    device = collective_device(group, None)
    sizes = exchange_ints(group, [len(payload)])[:, 0].tolist()
    width = max(sizes) or 1
    buffer = torch.zeros(width, dtype=torch.uint8)
    if payload:
        buffer[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    buffer = buffer.to(device)
    out = buffer.new_empty(len(sizes) * width)
    _all_gather_into(out, buffer, group)
    rows = out.view(len(sizes), width).cpu()
    return [bytes(rows[r, :n].tolist()) for r, n in enumerate(sizes)]


def check_consistency(group: ProcessGroup | None, fingerprint: str, summary: dict[str, Any],
                      stage_key: int = 0, stage_fingerprint: str = "") -> None:
    """Compare each rank's fingerprint once at set-up; raise the same clear error on every rank if any differ.

    Without this, ranks that disagree on the config or the group layout either hang in the next
    collective (different vector lengths) or silently clip differently. ``fingerprint`` must be
    equal on every rank; ``stage_fingerprint`` among the ranks with the same ``stage_key`` (the
    replicas of one pipeline stage). One all-gather of three int64 per rank; the summaries travel
    only when a fingerprint differs.
    """
    if group_size(group) == 1:
        return
    table = exchange_ints(group, [hash60(fingerprint), stage_key, hash60(stage_fingerprint)])
    # tensor ops, not W Python rows: O(W) int64, whatever the world size
    _, stage_of, counts = torch.unique(table[:, 1], return_inverse=True, return_counts=True)
    first = torch.full((len(counts),), len(table), dtype=torch.int64).scatter_reduce_(
        0, stage_of, torch.arange(len(table)), reduce="amin")  # the first rank of each stage key
    differ = (table[:, 0] != table[0, 0]) | (table[:, 2] != table[first[stage_of], 2])
    bad = differ.nonzero().flatten().tolist()
    if not bad:
        return
    first_of_stage = {int(table[r, 1]): int(first[stage_of[r]]) for r in bad}
    host_table = table.tolist()
    texts = exchange_bytes(group, json.dumps(summary, sort_keys=True, default=str).encode())
    summaries = [json.loads(t) for t in texts]
    failed = {r: s[SETUP_ERROR] for r, s in enumerate(summaries) if SETUP_ERROR in s}
    if failed:
        raise ConfigMismatchError(
            f"distclip: ranks {sorted(failed)} could not set up their GradClipper, so no rank can clip "
            "consistently:\n  " + "\n  ".join(f"rank {r}: {text}" for r, text in failed.items())
            + "\nFix that rank's config (the same on every rank, e.g. through DISTCLIP_CONFIG) or model."
        )
    lines = []
    for r in bad[:4]:
        base = 0 if host_table[r][0] != host_table[0][0] else first_of_stage[host_table[r][1]]
        reference, other = summaries[base], summaries[r]
        diffs = [f"{k}: rank {base} has {reference.get(k)!r}, rank {r} has {other.get(k)!r}"
                 for k in sorted(set(reference) | set(other)) if reference.get(k) != other.get(k)]
        lines += diffs or [f"rank {r}: fingerprint differs from rank {base}'s"]
    raise ConfigMismatchError(
        f"distclip: ranks {bad} clip differently from rank 0 (this would hang or clip inconsistently):\n  "
        + "\n  ".join(lines)
        + "\nGive every rank the same distclip config (e.g. through DISTCLIP_CONFIG) and the same model."
    )


SETUP_ERROR = "setup_error"  # summary key of a rank whose clipper could not be set up


def share_setup_failure(group: ProcessGroup | None, err: BaseException) -> None:
    """Join the set-up exchange with this rank's failure instead of its fingerprint.

    The other ranks then raise :class:`ConfigMismatchError` naming this rank and its error, instead
    of waiting in the exchange until the process group times out; this rank raises its own error
    (the caller re-raises it). Ranks that all fail alike just raise their own errors.
    """
    text = f"{type(err).__name__}: {err}"
    try:
        check_consistency(group, f"{SETUP_ERROR}: {text}", {SETUP_ERROR: text})
    except ConfigMismatchError:
        pass  # raised on the ranks that did set up; here the original error is the better message
