"""DDP: replicated gradients, each rank counts a disjoint 1/world slice; the norm runs inside the reduction.

Two paths give the same norm:

* **comm hook** (default): distclip wraps DDP's all-reduce hook. As each bucket's all-reduce
  completes, the future's callback computes this rank's slice of per-group partial norms on the
  reduced (averaged) bucket, overlapping the rest of backward. ``clip()`` then only reduces the
  small slot vector and scales.
* **post-backward**: the same kind of slices, read from ``param.grad`` after backward.

The hook result is used only when provably valid (:mod:`distclip.adapters.hooks`): every bucket
of the last synchronised backward measured, and the gradients untouched since (same tensors, same
version counters); anything else (a ``no_sync`` micro-step, ``GradScaler.unscale_``, a manual
edit) falls back to the post-backward path.
"""

from __future__ import annotations

import math
import warnings
from itertools import accumulate
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from ..core.names import named_trainable_parameters
from ..core.norms import local_partials
from ..compat import pytorch as _compat
from .base import GradAdapter
from .counting import LocalPiece, Replicas, counted_segments, group_ranks
from .declared import declared_groups
from .hooks import ReductionHook

CommHook = Callable[[Any, dist.GradBucket], torch.futures.Future]


class DDPAdapter(GradAdapter):
    """Gradients replicated over DDP's process group; rank r counts slice r of them laid end to end."""

    kind = "ddp"
    foldable = True

    def __init__(self, ddp: DistributedDataParallel):
        super().__init__(list(named_trainable_parameters(ddp.module)))
        self.ddp = ddp
        self.reduce_group = ddp.process_group
        ranks = group_ranks(self.reduce_group)
        self.replicas = Replicas(("ddp", ranks), dist.get_rank(self.reduce_group), len(ranks))
        self._dp_ranks = ranks
        if self.whole_params_with_declarations(self.replicas, ranks):  # hand-written TP/EP beside DDP
            self.reduce_group = dist.group.WORLD

    def stage_size(self) -> int:
        """DDP's ranks times the declared groups beyond them (a grid: e.g. dp x tp)."""
        extra = [g for g in declared_groups(self.declarations) if not g <= self._dp_ranks]
        return len(self._dp_ranks) * math.prod(len(g) for g in extra)

    def enable_reduction_hook(self, inner: CommHook | None = None, inner_state: Any = None) -> bool:
        """Register distclip's norm hook around ``inner`` (DDP's all-reduce by default).

        Returns False (and warns) when DDP already has a comm hook: DDP allows only one, so pass
        yours as ``inner`` instead, e.g. ``default_hooks.fp16_compress_hook``.
        """
        if _compat.ddp_has_comm_hook(self.ddp):
            warnings.warn(
                "distclip: this DDP model already has a comm hook, and DDP allows only one; distclip "
                "computes the norm after backward instead. To get both, register no hook yourself and "
                "pass it to GradClipper(..., ddp_comm_hook=your_hook).",
                stacklevel=3,
            )
            self.hook_status = "existing comm hook"
            return False
        # DDP's own group reduces the gradients: the clip may reduce its slots over more ranks (the
        # world, with declared tensor-parallel parameters), the gradients never
        if inner is None:
            inner, inner_state = default_hooks.allreduce_hook, self.ddp.process_group
        elif inner_state is None:
            inner_state = self.ddp.process_group
        _compat.track_amp_unscaling()
        self.hook = DDPNormHook(self, inner, inner_state)
        self.ddp.register_comm_hook(state=None, hook=self.hook.reduce_and_measure)
        self.hook_status = "comm_hook"
        return True


class DDPNormHook(ReductionHook):
    """Wraps a DDP comm hook: once a bucket is reduced, record this rank's slice of its partial norms."""

    def __init__(self, adapter: DDPAdapter, inner: CommHook, inner_state: Any):
        super().__init__(adapter.layout)
        self.adapter = adapter
        self.inner = inner
        self.inner_state = inner_state
        self._index_of = {id(p): i for i, p in enumerate(adapter.params)}
        self._plans: dict[int, tuple[tuple[int, ...], list[tuple[int, int]], list[int]]] = {}
        self._num_buckets: int | None = None

    def on_new_backward(self) -> None:
        self._num_buckets = None

    # -- called by DDP, on the autograd thread, for each bucket. No annotations: DDP compares
    # them with dist.GradBucket, and this module's postponed annotations are strings.
    def reduce_and_measure(self, _state, bucket):
        self.begin()
        index = bucket.index()
        slices, groups = self._plan(index, bucket.parameters())
        if bucket.is_last():
            self._num_buckets = index + 1
        layout = self.adapter.layout
        device = self.adapter.collective_device([bucket.buffer()])

        def measure(fut: torch.futures.Future) -> torch.Tensor:
            value = fut.value()
            reduced = value[0] if isinstance(value, list) else value
            flat = reduced.view(-1)
            self.record(index, local_partials([flat[a:b] for a, b in slices], groups, layout, device))
            return reduced

        return self.inner(self.inner_state, bucket).then(measure)

    def _plan(self, index: int, params: list[torch.Tensor]) -> tuple[list[tuple[int, int]], list[int]]:
        """This rank's slice of the bucket as (start, end) ranges and their groups; cached per layout.

        DDP rebuilds its buckets after the first iteration, so plans are keyed by the bucket's
        parameters, never by its index alone.
        """
        key = tuple(id(p) for p in params)
        cached = self._plans.get(index)
        if cached is None or cached[0] != key:
            offsets = [0, *accumulate(p.numel() for p in params)]
            indices = [self._index_of[id(p)] for p in params]
            pieces = [LocalPiece(0, offsets[k], p.numel(), i, self.adapter.pieces[i].replicas)
                      for k, (p, i) in enumerate(zip(params, indices)) if i not in self.adapter.uncounted]
            segments = counted_segments(pieces)
            cached = self._plans[index] = (key, [(lo, hi) for _, lo, hi, _ in segments],
                                           [self.adapter.group_of[i] for *_, i in segments])
        return cached[1], cached[2]

    def gradients(self) -> list[torch.Tensor | None]:
        return [p.grad for p in self.adapter.params]

    def complete(self) -> bool:
        n = self._num_buckets
        return n is not None and len(self.measured) == n
