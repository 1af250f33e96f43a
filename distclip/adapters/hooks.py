"""The one protocol every reduction hook (DDP, FSDP1, FSDP2) follows.

A backend reduces gradients in pieces during backward (DDP buckets, FSDP1 units, FSDP2 parameter
groups). A hook measures each reduced piece's per-group partials as it arrives, so the norm is
computed while backward goes on. The result is handed to the clip only when it is *provably* the
partials of the gradients the optimizer will see:

1. every piece of one backward was measured (a new backward is recognised by autograd's graph
   task id, so the record never mixes two backwards);
2. nothing made a piece's measurement unsafe while it was reduced (e.g. a gradient accumulated
   into an older one, a division after the hook, an inexact dtype cast): :meth:`invalidate`;
3. after that backward, the gradients are the very tensors the backend wrote, with the same
   version counters: any in-place write since (an edit, ``no_sync`` accumulation, GradScaler's
   ``unscale_``, made visible by :func:`~distclip.compat.pytorch.track_amp_unscaling`), an
   in-place collective into one of them (``dist.all_reduce(p.grad)`` of tied weights or copies
   synchronised by hand: c10d bumps no version; seen by
   :func:`~distclip.compat.pytorch.track_collective_writes`) or a replaced gradient
   invalidates it. A snapshot of identities and versions is taken at the end of backward, after
   the backend's own final callback.

Otherwise :meth:`take` returns None and the clip measures the gradients after backward, which is
always exact. Writes through ``tensor.data`` bypass version counters by torch's design, so they
cannot be seen: after such an edit, clip with ``comm_hook: false``. That is the one limit of the
hooks; with ``comm_hook: auto`` (the default) it applies only where a hook is used (NCCL on CUDA,
:mod:`distclip.core.hook_choice`).
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar, cast

import torch

from ..compat import pytorch as _compat
from ..core.norms import SlotLayout, combine_partials

# What a hook records per reduction piece: a slot vector (the default), or what its own combine() reads
PartsT = TypeVar("PartsT")


class ReductionHook(Generic[PartsT]):
    """Partials measured inside one backward's gradient reduction, handed out once if still valid.

    Subclasses call :meth:`begin` at each reduction, then :meth:`record` (or :meth:`invalidate`),
    and define :meth:`gradients` (every gradient tensor the backend writes) and :meth:`complete`
    (every piece holding a gradient was measured). ``PartsT``: what :meth:`record` keeps per piece (keyed by
    the piece's index); a slot vector unless the subclass overrides :meth:`combine` (DDP's per-block sums).
    """

    def __init__(self, layout: SlotLayout):
        self.layout = layout
        self._backward = -1  # id of the backward whose reductions are being measured
        self._parts: dict[int, PartsT] = {}
        self._valid = True
        self._snapshot: list[Any] | None = None
        self._writes: _compat.WriteWatch | None = None  # in-place collectives into the snapshot's gradients

    # -- during backward
    def begin(self) -> bool:
        """Call at each reduction; starts a new record at the first reduction of a new backward.

        Returns whether a new backward started.
        """
        current = _compat.backward_id()
        if current == self._backward:
            return False
        self._backward = current
        self._parts.clear()
        self._snapshot = None
        self._valid = _compat.queue_after_backward(self._queue_snapshot)
        self.on_new_backward()
        return True

    def record(self, key: int, partials: PartsT) -> None:
        self._parts[key] = partials

    def invalidate(self) -> None:
        self._valid = False

    def _queue_snapshot(self) -> None:
        # Queued at the first reduction, this runs after the callbacks the backend queued before
        # it (e.g. FSDP's root final callback); queue once more so the snapshot follows anything
        # the backend queued meanwhile (DDP queues its finalisation from its last bucket).
        if not _compat.queue_after_backward(self._take_snapshot):
            self._take_snapshot()

    def _take_snapshot(self) -> None:
        self._snapshot = grad_versions(self.gradients())
        self._writes = _compat.watch_collective_writes((entry[0] for entry in self._snapshot if entry is not None),
                                                       self.gradients)

    # -- at clip time
    def take(self) -> torch.Tensor | None:
        """The combined partials of the last backward, once, if provably still valid (else None)."""
        snapshot, self._snapshot = self._snapshot, None
        writes, self._writes = self._writes, None
        if (snapshot is None or not self._valid or not self.measured_anything()
                or (writes is not None and writes.written)):
            return None
        if snapshot != grad_versions(self.gradients()) or not self.complete():
            return None
        return self.combine()

    def measured_anything(self) -> bool:
        """Whether the last backward measured something (a subclass whose :meth:`complete` is exact may say True)."""
        return bool(self._parts)

    def combine(self) -> torch.Tensor:
        """This backward's slot vector from the recorded partials (default: their slot vectors, in key order)."""
        # slot vectors: a hook that records anything else overrides this method
        parts = cast("list[torch.Tensor]", [self._parts[key] for key in sorted(self._parts)])
        return combine_partials(parts, self.layout, parts[0].device)

    # -- subclass contract
    def on_new_backward(self) -> None:
        """Reset per-backward state of the subclass."""

    def gradients(self) -> list[torch.Tensor | None]:
        """Every gradient tensor the backend writes (None where absent); their identities and version
        counters must be unchanged at clip time."""
        raise NotImplementedError

    def complete(self) -> bool:
        """Every reduction piece that holds a gradient was measured in the last backward."""
        raise NotImplementedError

    @property
    def measured(self) -> dict[int, PartsT]:
        return self._parts


def grad_versions(tensors: list[torch.Tensor | None]) -> list[Any]:
    """``(id, version)`` of each gradient (None where absent): equal iff untouched since."""
    return [None if t is None else (id(t), _compat.version(t)) for t in tensors]
