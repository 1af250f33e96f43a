"""What every adapter provides: the pieces this rank counts, the gradients it scales, the reduce group."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..core.groups import GroupTable
from ..core.norms import SlotLayout
from ..core.partition import replica_segments
from ..core.reduce import ProcessGroup


class GradAdapter:
    """A gradient layout (plain, DDP, FSDP, DeepSpeed...) seen through one question per piece:
    does this rank count it, and which of its elements?

    Subclasses set ``kind`` and ``reduce_group`` and override :meth:`counted_pieces` (and, when
    the gradients do not live in ``param.grad``, :meth:`scaled_grads` / :meth:`drop_grads`).
    """

    kind = "abstract"
    reduce_group: ProcessGroup | None = None  # None: rank-local, no collective
    has_names = True  # False when given bare parameters (per-group clipping then impossible)
    foldable = False  # gradients live in param.grad of the very tensors an optimizer steps

    def __init__(self, named_params: Sequence[tuple[str, torch.nn.Parameter]]):
        seen: set[int] = set()
        unique = [(n, p) for n, p in named_params if not (id(p) in seen or seen.add(id(p)))]
        self.names = [n for n, _ in unique]
        self.params = [p for _, p in unique]
        self.group_of: list[int] = []
        self.layout: SlotLayout | None = None

    def bind(self, table: GroupTable, layout: SlotLayout) -> None:
        """Learn each parameter's group and the slot layout; precompute per-layout plans here."""
        self.group_of = [table.index_of[n] for n in self.names]
        self.layout = layout
        self.params_by_group: list[list[torch.nn.Parameter]] = [[] for _ in table.groups]
        for p, g in zip(self.params, self.group_of):
            self.params_by_group[g].append(p)

    def tensor_names(self) -> dict[int, str]:
        """``id(tensor) -> canonical name`` for the parameter tensors a user may pass to pick parameters."""
        return {id(p): n for n, p in zip(self.names, self.params)}

    def counted_pieces(self) -> tuple[list[torch.Tensor], list[int]]:
        """The gradient pieces this rank counts (disjoint across ranks) and their group indices."""
        raise NotImplementedError

    def enable_reduction_hook(self, inner: Any = None, inner_state: Any = None) -> bool:
        """Compute partials inside the gradient reduction from now on, if this layout allows it.

        ``inner``/``inner_state``: a user communication hook to wrap (DDP). Returns whether a hook is active.
        """
        return False

    def reduced_partials(self) -> torch.Tensor | None:
        """Local slot partials already computed inside the gradient reduction, if still valid."""
        return None

    def grad_scale(self) -> float:
        """The factor the counted pieces still carry (an fp16 loss scale not yet divided out); 1.0 if none."""
        return 1.0

    def scaled_grads(self) -> list[list[torch.Tensor]]:
        """Per group, the local gradient tensors to multiply by that group's coefficient."""
        return [[p.grad for p in group if p.grad is not None] for group in self.params_by_group]

    def drop_grads(self) -> None:
        """Discard this step's gradients so the optimizer step leaves parameters and state untouched."""
        for p in self.params:
            p.grad = None

    def device_hint(self) -> torch.device | None:
        return next((p.grad.device for p in self.params if p.grad is not None), None) or (
            self.params[0].device if self.params else None
        )

    def describe(self) -> dict[str, object]:
        """What the set-up consistency check compares across ranks (beyond config and groups)."""
        return {"adapter": self.kind, "num_params": len(self.params)}


class ReplicatedGrads:
    """Mixin for layouts whose gradients are full copies on every rank of ``reduce_group`` (DDP,
    DeepSpeed ZeRO-0): rank r counts slice r of them laid end to end, so each element counts once.

    The adapter sets ``rank`` and ``world`` (its position in ``reduce_group``) before ``bind``.
    """

    rank: int
    world: int

    def bind(self, table: GroupTable, layout: SlotLayout) -> None:
        super().bind(table, layout)
        self._segments = replica_segments([p.numel() for p in self.params], self.rank, self.world)
        self._segment_groups = [self.group_of[i] for i, _, _ in self._segments]

    def counted_pieces(self) -> tuple[list[torch.Tensor], list[int]]:
        pieces, groups = [], []
        for (i, lo, hi), g in zip(self._segments, self._segment_groups):
            grad = self.params[i].grad
            if grad is not None:
                pieces.append(grad.reshape(-1)[lo:hi])
                groups.append(g)
        return pieces, groups
