"""The one collective per clip, and the set-up check that every rank clips the same way."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .config import ConfigError

ProcessGroup = Any  # torch.distributed.ProcessGroup; None means "rank-local, no collective"


class ConfigMismatchError(ConfigError):
    """Ranks disagree on the clip configuration or group layout (raised on every rank)."""


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
            return hint if hint is not None and hint.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
        if "gloo" in backend:
            return torch.device("cpu")
    return hint if hint is not None else torch.device("cpu")


def reduce_slots(partials: torch.Tensor, uses_max: Sequence[bool], group: ProcessGroup | None) -> torch.Tensor:
    """Reduce the float64 slot vector across ``group`` in exactly ONE collective.

    SUM for p-norm slots, MAX for infinity-norm slots. The result is bitwise identical on every
    rank. NaN always propagates: a MAX all-reduce may drop NaN, so infinity-norm slots carry a
    NaN flag alongside; a layout mixing both kinds all-gathers the vector and folds it locally
    in rank order instead.
    """
    is_max = torch.tensor(list(uses_max), dtype=torch.bool, device=partials.device)
    if group_size(group) == 1:
        return partials
    if not any(uses_max):
        dist.all_reduce(partials, op=dist.ReduceOp.SUM, group=group)
        return partials
    if all(uses_max):
        nan = partials.isnan()
        packed = torch.cat([partials.nan_to_num(nan=math.inf), nan.to(partials.dtype)])
        dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
        values, any_nan = packed.split(partials.numel())
        return torch.where(any_nan > 0, torch.full_like(values, math.nan), values)
    world = dist.get_world_size(group)
    gathered = partials.new_empty(world * partials.numel())
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, partials, group=group)
    rows = gathered.view(world, partials.numel())
    return torch.where(is_max, rows.amax(dim=0), rows.sum(dim=0))


def check_consistency(group: ProcessGroup | None, fingerprint: str, summary: dict[str, Any]) -> None:
    """All-gather each rank's fingerprint once at set-up; raise the same clear error on every rank if any differ.

    Without this, ranks that disagree on the config or the group layout either hang in the next
    collective (different vector lengths) or silently clip differently.
    """
    if group_size(group) == 1:
        return
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (fingerprint, summary), group=group)
    reference_fp, reference = gathered[0]
    bad = [r for r, (fp, _) in enumerate(gathered) if fp != reference_fp]
    if not bad:
        return
    lines = []
    for r in bad[:4]:
        other = gathered[r][1]
        diffs = [f"{k}: rank 0 has {reference.get(k)!r}, rank {r} has {other.get(k)!r}"
                 for k in sorted(set(reference) | set(other)) if reference.get(k) != other.get(k)]
        lines += diffs or [f"rank {r}: fingerprint {gathered[r][0]} differs from rank 0's {reference_fp}"]
    raise ConfigMismatchError(
        f"distclip: ranks {bad} clip differently from rank 0 (this would hang or clip inconsistently):\n  "
        + "\n  ".join(lines)
        + "\nGive every rank the same distclip config (e.g. through DISTCLIP_CONFIG) and the same model."
    )
