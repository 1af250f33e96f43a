"""DDP: replicated gradients, each rank counts a disjoint 1/world slice; the norm runs inside the reduction.

Two paths give the same norm:

* **comm hook** (default): distclip wraps DDP's all-reduce hook. As each bucket's all-reduce
  completes, the future's callback computes this rank's slice of per-group partial norms on the
  reduced (averaged) bucket, overlapping the rest of backward. ``clip()`` then only reduces the
  small slot vector and scales.
* **post-backward**: the same slices, read from ``param.grad`` after backward.

The hook result is used only if the gradients are exactly what DDP wrote at the end of the last
synchronised backward (same tensors, same version counters); anything else (a ``no_sync``
micro-step, ``GradScaler.unscale_``, a manual edit) falls back to the post-backward path.
"""

from __future__ import annotations

import warnings
from itertools import accumulate
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from ..core.names import named_trainable_parameters
from ..core.norms import combine_partials, local_partials
from ..core.partition import replica_segments
from ..core.reduce import collective_device
from .base import GradAdapter, ReplicatedGrads

CommHook = Callable[[Any, dist.GradBucket], torch.futures.Future]


class DDPAdapter(ReplicatedGrads, GradAdapter):
    """Gradients replicated over DDP's process group; rank r counts slice r of them laid end to end."""

    kind = "ddp"
    foldable = True

    def __init__(self, ddp: DistributedDataParallel):
        super().__init__(list(named_trainable_parameters(ddp.module)))
        self.ddp = ddp
        self.reduce_group = ddp.process_group
        self.rank = dist.get_rank(self.reduce_group)
        self.world = dist.get_world_size(self.reduce_group)
        self.hook: DDPNormHook | None = None

    def reduced_partials(self) -> torch.Tensor | None:
        return self.hook.take() if self.hook is not None else None

    def enable_reduction_hook(self, inner: CommHook | None = None, inner_state: Any = None) -> bool:
        """Register distclip's norm hook around ``inner`` (DDP's all-reduce by default).

        Returns False (and warns) when DDP already has a comm hook: DDP allows only one, so pass
        yours as ``inner`` instead, e.g. ``default_hooks.fp16_compress_hook``.
        """
        if getattr(self.ddp, "_comm_hooks", None):
            warnings.warn(
                "distclip: this DDP model already has a comm hook, and DDP allows only one; distclip "
                "computes the norm after backward instead. To get both, register no hook yourself and "
                "pass it to GradClipper(..., ddp_comm_hook=your_hook).",
                stacklevel=3,
            )
            return False
        if inner is None:
            inner, inner_state = default_hooks.allreduce_hook, self.reduce_group
        self.hook = DDPNormHook(self, inner, inner_state)
        self.ddp.register_comm_hook(state=None, hook=self.hook.reduce_and_measure)
        return True


class DDPNormHook:
    """Wraps a DDP comm hook: once a bucket is reduced, accumulate this rank's slice of its partial norms."""

    def __init__(self, adapter: DDPAdapter, inner: CommHook, inner_state: Any):
        self.adapter = adapter
        self.inner = inner
        self.inner_state = inner_state
        self._group_of_param = {id(p): g for p, g in zip(adapter.params, adapter.group_of)}
        self._plans: dict[int, tuple[tuple[int, ...], list[tuple[int, int]], list[int]]] = {}
        self._partials: dict[int, torch.Tensor] = {}
        self._num_buckets: int | None = None
        self._snapshot: list[Any] | None = None

    # -- called by DDP, on the autograd thread, for each bucket in index order. No annotations:
    # DDP compares them with dist.GradBucket, and this module's postponed annotations are strings.
    def reduce_and_measure(self, _state, bucket):
        index = bucket.index()
        if index == 0:  # buckets launch in index order: bucket 0 starts a new backward
            self._partials.clear()
            self._num_buckets = None
            self._snapshot = None
        slices, groups = self._plan(index, bucket.parameters())
        if bucket.is_last():
            self._num_buckets = index + 1
            self._after_backward(self._queue_snapshot)
        layout = self.adapter.layout
        device = collective_device(self.adapter.reduce_group, bucket.buffer().device)

        def measure(fut: torch.futures.Future) -> torch.Tensor:
            value = fut.value()
            reduced = value[0] if isinstance(value, list) else value
            flat = reduced.view(-1)
            self._partials[index] = local_partials([flat[a:b] for a, b in slices], groups, layout, device)
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
            numels = [p.numel() for p in params]
            offsets = [0, *accumulate(numels)]
            segments = replica_segments(numels, self.adapter.rank, self.adapter.world)
            slices = [(offsets[i] + lo, offsets[i] + hi) for i, lo, hi in segments]
            groups = [self._group_of_param[id(params[i])] for i, _, _ in segments]
            cached = self._plans[index] = (key, slices, groups)
        return cached[1], cached[2]

    # -- end of backward: remember exactly which gradients DDP wrote
    @staticmethod
    def _after_backward(callback: Callable[[], None]) -> None:
        try:
            torch.autograd.Variable._execution_engine.queue_callback(callback)
        except RuntimeError:  # not inside backward: the hook result is simply never used
            pass

    def _queue_snapshot(self) -> None:
        # Queued from inside the last bucket's hook, this runs before DDP's own finalize (queued
        # later); queue once more so the snapshot is taken after DDP has written the gradients.
        self._after_backward(self._take_snapshot)

    def _take_snapshot(self) -> None:
        self._snapshot = self._grad_versions()

    def _grad_versions(self) -> list[Any]:
        return [None if p.grad is None else (id(p.grad), p.grad._version) for p in self.adapter.params]

    def take(self) -> torch.Tensor | None:
        """The combined partials of the last synchronised backward, once, if the gradients are untouched."""
        snapshot, self._snapshot = self._snapshot, None
        n = self._num_buckets
        if snapshot is None or n is None or len(self._partials) != n or snapshot != self._grad_versions():
            return None
        device = self._partials[0].device
        return combine_partials([self._partials[i] for i in range(n)], self.adapter.layout, device)

