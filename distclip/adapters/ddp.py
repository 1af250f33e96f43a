"""DDP: replicated gradients, counted in fixed blocks split across the replicas; the norm may run inside the reduction.

What each rank counts does not depend on DDP's buckets (:mod:`distclip.adapters.blocks`): the
parameters are cut once into blocks, and in each block every replica counts a disjoint 1/world
slice. With the hook on, both paths give bitwise the same slot vector:

* **comm hook**: distclip wraps DDP's all-reduce hook. When a bucket's all-reduce completes, the
  future's callback notes where its parameters' reduced values lie; once every parameter of a
  block is reduced, this rank's slice of the block is measured, overlapping the rest of backward.
  ``clip()`` then only sums the per-piece values in parameter order and reduces the small slot vector.
* **post-backward**: the same blocks, measured from ``param.grad`` after backward (where the hook's
  result cannot be used). Without a hook (``comm_hook: false``, or ``auto`` off CUDA) the same
  elements are measured in one call: equal within float64 rounding, cheaper per clip.

``comm_hook: auto`` (the default) takes the hook only where DDP reduces with NCCL on CUDA
(:mod:`distclip.core.hook_choice`). The hook result is used only when provably valid
(:mod:`distclip.adapters.hooks`): every block measured in the last synchronised backward, and the
gradients untouched since (same tensors, same version counters); anything else (a ``no_sync``
micro-step, ``GradScaler.unscale_``, a manual edit) falls back to the post-backward path, whose
result is the same. A resumed run (DDP's initial buckets) and a straight one (rebuilt buckets)
give the same bits.
"""

from __future__ import annotations

import math
import threading
import warnings
from itertools import accumulate
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from ..compat import pytorch as _compat
from ..core.groups import GroupTable
from ..core.hook_choice import ReductionVenue
from ..core.names import named_trainable_parameters
from ..core.norms import SlotLayout
from .base import GradAdapter
from .blocks import FIRST_BLOCK_BYTES, BlockPlan, block_bounds
from .counting import Replicas, Segment, group_ranks
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

    def bind(self, table: GroupTable, layout: SlotLayout) -> None:
        """The blocks (by bytes, as DDP's buckets: ``bucket_cap_mb``), and this rank's counted slice of each."""
        super().bind(table, layout)
        nbytes = [p.numel() * p.element_size() for p in self.params]
        cap = int(getattr(self.ddp, "bucket_bytes_cap", 25 * 1024 * 1024)) or 1
        self.blocks = BlockPlan(self.pieces, block_bounds(nbytes, min(FIRST_BLOCK_BYTES, cap), cap), self.uncounted,
                                self.group_of, layout)
        self._counted = self.blocks.counted  # what the post-backward path, the hook and row sums count

    def local_partials(self, skip_groups: frozenset[int] = frozenset()) -> tuple[torch.Tensor, str]:
        """The blocks' slot vector, from the hook when valid, else measured now from ``param.grad`` block by block:
        the same bits as the hook's. Without a hook there is nothing to agree with bit for bit: every counted
        piece is measured in one call (the same elements; the cheapest per-clip path)."""
        if self.hook is None:
            return super().local_partials(skip_groups)
        hooked = self.reduced_partials()
        if hooked is not None:
            return hooked, "comm_hook"
        grads = self.local_grads()
        device = self.collective_device([g for g in grads if g is not None][:1])
        per_block = [self.blocks.measure(b, [self._piece(grads, s) for s in block.segments], device)
                     if block.segments else None for b, block in enumerate(self.blocks.blocks)]
        partials = self.blocks.combine(per_block, device)
        if skip_groups:  # these groups' slots are filled by the caller (row-wise groups: from their rows' sums)
            keep = self.layout.constant(f"keep-{sorted(skip_groups)}", device,
                                        (g not in skip_groups for g, _ in self.layout.slots), torch.bool)
            partials = torch.where(keep, partials, 0.0)
        return partials, "post_backward"

    def _piece(self, grads: Sequence[torch.Tensor | None], segment: Segment) -> torch.Tensor:
        """A counted range of a gradient, flat in memory order as DDP's bucket holds it (a channels-last gradient
        too); zeros for a parameter without one (its bucket holds zeros)."""
        source, lo, hi, param = segment
        grad = grads[source]
        if grad is None:
            p = self.params[param]
            return torch.zeros(hi - lo, dtype=p.dtype, device=p.device)
        if not grad.is_contiguous():  # DDP lays a dense gradient out in its memory order: read it in that order
            strides = grad.stride()
            grad = grad.permute(sorted(range(grad.dim()), key=lambda d: -strides[d]))
        return grad.reshape(-1)[lo:hi]

    def reduction_venue(self) -> ReductionVenue | None:
        """DDP's process group reduces the gradients, on the parameters' device."""
        return self.venue_of(self.ddp.process_group, self.params[0].device if self.params else None)

    def decline_reduction_hook(self, reason: str, inner: CommHook | None = None, inner_state: Any = None) -> None:
        """Measure after backward; a communication hook passed to distclip is registered as it is.

        DDP checks a hook registered by itself (e.g. it refuses ``bf16_compress_hook`` without NCCL); where it
        refuses the user's hook, distclip's hook wraps it instead (as with ``comm_hook: true``), so that the
        reduction the user asked for still runs."""
        self.hook_status = reason
        if inner is None or _compat.ddp_has_comm_hook(self.ddp):
            return
        try:
            self.ddp.register_comm_hook(self.ddp.process_group if inner_state is None else inner_state, inner)
        except (TypeError, ValueError, RuntimeError) as err:
            if self.enable_reduction_hook(inner, inner_state):
                self.hook_status = (f"{self.hook_status} (DDP refused ddp_comm_hook alone: {err}; "
                                    "distclip's hook wraps it)")
            return
        self.hook_status = f"{reason}; ddp_comm_hook registered as given"

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


class DDPNormHook(ReductionHook["list[torch.Tensor | None]"]):
    """Wraps a DDP comm hook: once every parameter of a block is reduced, measure this rank's slice of the block.

    Buckets and blocks need not line up (DDP rebuilds its buckets after the first iteration): a bucket's
    callback records where its parameters' reduced values lie, and measures the blocks it completes,
    reading their other parameters from the buckets reduced before it in this backward (DDP leaves a
    reduced bucket untouched until backward ends). Callbacks may run on the backend's threads: the
    bookkeeping is under a lock.
    """

    def __init__(self, adapter: DDPAdapter, inner: CommHook, inner_state: Any):
        super().__init__(adapter.layout)
        self.adapter = adapter
        self.plan: BlockPlan = adapter.blocks
        self.inner = inner
        self.inner_state = inner_state
        self._index_of = {id(p): i for i, p in enumerate(adapter.params)}
        self._buckets: dict[int, tuple[tuple[int, ...], list[tuple[int, int]]]] = {}
        self._lock = threading.Lock()
        self._pending_start = [len(block.params) for block in self.plan.blocks]
        self.on_new_backward()

    def on_new_backward(self) -> None:
        self._where: dict[int, tuple[torch.Tensor, int]] = {}  # parameter -> (reduced flat bucket, its offset there)
        self._pending = list(self._pending_start)  # per block: its counted parameters not reduced yet

    # -- called by DDP, on the autograd thread, for each bucket. No annotations: DDP compares
    # them with dist.GradBucket, and this module's postponed annotations are strings.
    def reduce_and_measure(self, _state, bucket):
        self.begin()
        entries = self._entries(bucket.index(), bucket.parameters())
        device = self.adapter.collective_device([bucket.buffer()])

        def measure(fut: torch.futures.Future) -> torch.Tensor:
            value = fut.value()
            reduced = value[0] if isinstance(value, list) else value
            flat = reduced.view(-1)
            ready = []
            with self._lock:
                for param, offset in entries:
                    self._where[param] = (flat, offset)
                    b = self.plan.block_of[param]
                    self._pending[b] -= 1
                    if self._pending[b] == 0:
                        ready.append(b)
            for b in ready:
                self.record(b, self.plan.measure(b, [self._piece(s) for s in self.plan.blocks[b].segments], device))
            return reduced

        return self.inner(self.inner_state, bucket).then(measure)

    def _entries(self, index: int, params: list[torch.Tensor]) -> list[tuple[int, int]]:
        """(parameter, offset in the bucket) of each parameter of the bucket this rank counts part of; cached per
        bucket layout (DDP rebuilds its buckets after the first iteration: keyed by the parameters, not the index)."""
        key = tuple(id(p) for p in params)
        cached = self._buckets.get(index)
        if cached is None or cached[0] != key:
            offsets = list(accumulate((p.numel() for p in params), initial=0))
            indices = [self._index_of[id(p)] for p in params]
            cached = self._buckets[index] = (key, [(i, offsets[k]) for k, i in enumerate(indices)
                                                   if i in self.plan.block_of])
        return cached[1]

    def _piece(self, segment: Segment) -> torch.Tensor:
        _, lo, hi, param = segment
        flat, offset = self._where[param]
        return flat[offset + lo: offset + hi]

    def measured_anything(self) -> bool:
        return True  # complete() is exact: a rank counting nothing has nothing to measure

    def combine(self) -> torch.Tensor:
        self._where = {}  # drop the references to this backward's buckets
        parts = self.measured
        return self.plan.combine([parts.get(b) for b in range(len(self.plan.blocks))],
                                 self.adapter.collective_device())

    def gradients(self) -> list[torch.Tensor | None]:
        return [p.grad for p in self.adapter.params]

    def complete(self) -> bool:
        parts = self.measured
        return all(b in parts for b in self.plan.measured_blocks)
