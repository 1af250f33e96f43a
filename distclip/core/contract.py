"""The adapter contract: what the core asks of a gradient layout (plain, DDP, FSDP, DTensor, ZeRO, pipeline).

The core owns this Protocol; :mod:`distclip.adapters` implements it, one class per layout, and the
public :class:`~distclip.GradClipper` picks the adapter for what the user passed. The core never
imports an adapter: it talks to whichever one it is given through these members only.

* **COUNT**: ``local_partials`` (this rank's slot vector over the pieces it counts: disjoint
  across the job, so ONE collective over ``reduce_group`` yields every element once), ``grad_scale``.
* **HOOK**: ``reduction_venue`` (where the gradients are reduced: what ``comm_hook: auto`` decides
  from, :mod:`distclip.core.hook_choice`), ``enable_reduction_hook`` (the same partials computed
  inside the backend's gradient reduction, when it allows it and only when provably valid),
  ``decline_reduction_hook`` (the post-backward path was chosen: record why).
* **ATTRIBUTE** (bad steps only): ``held_pieces`` (every local gradient piece this rank holds, with its
  parameter), whose non-finite values the core looks for after a non-finite norm.
* **APPLY**: ``scale``, ``zero``, ``drop_grads`` (multiply each group by its coefficient, zero it,
  or drop the gradients so the optimizer step leaves parameters and state untouched).
* **ROWS** (row-wise clipping, ``kind: agc``): ``global_shapes``, ``bind_rows``,
  ``row_partials``, ``scale_rows`` (where each counted piece sits among its parameter's rows).
* **PIPELINE**: ``pipeline_group`` is None except for a pipeline stage adapter, which also answers
  ``copies``, ``names_by_stage``, ``stage_key`` and ``describe_stage``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Sequence

import torch

if TYPE_CHECKING:
    from .groups import GroupTable
    from .hook_choice import ReductionVenue
    from .norms import SlotLayout
    from .rowwise import RowPlan

__all__ = ["GradAdapter"]


class GradAdapter(Protocol):
    """One gradient layout behind one contract (see the module docstring)."""

    kind: str
    names: list[str]  # canonical parameter names, in the adapter's order
    params: list[torch.Tensor]  # parameters (or bare tensors a user passed), in the adapter's order
    group_of: list[int]  # clip group of each parameter (after bind)
    reduce_group: Any  # ProcessGroup the one collective runs over; None: rank-local
    pipeline_group: Any  # the pipeline ProcessGroup for a stage adapter, else None
    has_names: bool  # False when given bare parameters (per-group clipping then impossible)
    foldable: bool  # gradients live in param.grad of the very tensors an optimizer steps
    applies_in_place: bool  # APPLY changes the counted gradients at once (the audit measures it)
    hook_status: str
    setup_problems: tuple[str, ...]  # raised on every rank after the set-up exchange

    # ---------------------------------------------------------------- set-up
    def bind(self, table: "GroupTable", layout: "SlotLayout") -> None: ...
    def verify_layout(self) -> None: ...
    def tensor_names(self) -> dict[int, str]: ...
    def describe(self) -> dict[str, object]: ...
    def reduction_venue(self) -> "ReductionVenue | None": ...
    def enable_reduction_hook(self, inner: Any = None, inner_state: Any = None) -> bool: ...
    def decline_reduction_hook(self, reason: str, inner: Any = None, inner_state: Any = None) -> None: ...

    # ------------------------------------------------------------ pipeline
    def copies(self) -> dict[str, str]: ...
    def names_by_stage(self) -> list[tuple[int, list[str]]]: ...
    def stage_key(self) -> int: ...
    def describe_stage(self) -> dict[str, object]: ...

    # --------------------------------------------------------------- COUNT
    def local_partials(self, skip_groups: frozenset[int] = frozenset()) -> tuple[torch.Tensor, str]: ...
    def local_grads(self) -> list[torch.Tensor | None]: ...
    def scaled_grads(self) -> list[list[torch.Tensor]]: ...
    def collective_device(self, pieces: Sequence[torch.Tensor] = ()) -> torch.device: ...
    def grad_scale(self) -> float: ...
    def loss_scaled(self) -> bool: ...

    # ----------------------------------------------------------- ATTRIBUTE
    def held_pieces(self) -> tuple[list[torch.Tensor], list[int]]: ...

    # --------------------------------------------------------------- APPLY
    def scale(self, coefs: torch.Tensor, groups: Sequence[int], host_coefs: Sequence[float] | None = None) -> None: ...
    def zero(self, groups: Sequence[int]) -> None: ...
    def drop_grads(self) -> None: ...

    # ---------------------------------------------------------------- ROWS
    def global_shapes(self) -> list[tuple[int, ...]]: ...
    def bind_rows(self, plan: "RowPlan") -> None: ...
    def row_partials(self) -> torch.Tensor: ...
    def scale_rows(self, coefs: torch.Tensor) -> None: ...
