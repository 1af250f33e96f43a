"""torchft's ``DistributedDataParallel``: gradients averaged by torchft's Manager, counted where they are.

torchft's DDP (a subclass of torch's) wraps a dummy one-rank process group and averages each
bucket through its ``Manager`` over the replica groups of the current quorum, in its own comm hook.
When backward returns, every replica group that took part in the step (and a healing one, which
contributed zeros) holds the same averaged gradients, bit for bit. Their exact norm is therefore the
norm of this rank's gradients, with **no collective**: a collective over the fault-tolerant
dimension would have to follow every membership change, and it would add nothing exact.

What distclip does NOT do here:

* install its DDP comm hook: DDP takes one, and torchft's is the one that averages; the norm is
  measured after backward instead (one local pass, no communication);
* reduce over the ranks inside a replica group: torchft's DDP does not synchronise them (each
  group rank is averaged with the same group rank of the other replica groups), so each rank's
  gradients are its own model's.

torchft's ``PureDistributedDataParallel`` is refused (see :mod:`distclip.compat.torchft`).
"""

from __future__ import annotations

from typing import Any

from torch.nn.parallel import DistributedDataParallel

from ..core.names import named_trainable_parameters
from .plain import PlainAdapter


class TorchFTDDPAdapter(PlainAdapter):
    """torchft's DDP: this rank's gradients are the (already averaged) ones every participating replica holds."""

    kind = "torchft_ddp"

    def __init__(self, ddp: DistributedDataParallel):
        super().__init__(list(named_trainable_parameters(ddp.module)))
        self.ddp = ddp

    def enable_reduction_hook(self, inner: Any = None, inner_state: Any = None) -> bool:
        """Never: torchft's comm hook averages the gradients, and DDP takes one hook."""
        self.hook_status = ("torchft's DDP averages gradients in its own comm hook (DDP takes one): "
                            "measured after backward")
        return False


def pure_ddp_refusal() -> str:
    """Why torchft's ``PureDistributedDataParallel`` cannot be clipped exactly, and what to use instead."""
    return ("distclip cannot clip torchft's PureDistributedDataParallel exactly: it starts one all-reduce per "
            "gradient and never waits for it (torchft 0.2.0, torchft/ddp.py:97), so the gradients may still be "
            "written when they are read, and the division by the number of participants, which torchft chains "
            "onto that wait, never runs (the gradients are summed, not averaged). Use "
            "torchft.ddp.DistributedDataParallel")
