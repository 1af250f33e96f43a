"""Clip right before ``optimizer.step()``, and fold the coefficient into fused optimizers.

A fused torch optimizer (``AdamW(fused=True)``, ...) divides every gradient by its
``grad_scale`` attribute inside its single pass over the parameters (GradScaler's contract).
With uniform clipping, setting ``grad_scale = 1 / coef`` applies the clip there, so clipping
costs no pass over the gradients at all; the gradients end up clipped in place as usual.

GradScaler's own fused path also leaves the gradients *scaled* until that kernel: the pending
scale is then divided out of the norms, so the threshold applies to the true gradients.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..compat.pytorch import outside_compile, supports_amp_scaling
from .config import ConfigError
from .report import ClipReport

__all__ = ["Attachment", "fused_optimizer_blocker"]


def fused_optimizer_blocker(optimizer: torch.optim.Optimizer) -> str | None:
    """Why the clip coefficient cannot go into this optimizer's ``grad_scale`` (None when it can)."""
    if not (supports_amp_scaling(optimizer) and optimizer.defaults.get("fused")):
        return "the optimizer is not a fused torch optimizer (e.g. AdamW(fused=True))"
    return None


class Attachment:
    """Pre-step hook that clips (or folds), post-step hook that tidies; ``remove()`` detaches both."""

    def __init__(self, clip: Callable[..., ClipReport], optimizer: torch.optim.Optimizer, blocker: str | None,
                 fold: bool | None = None):
        if fold and blocker:
            raise ConfigError(f"cannot fold the clip coefficient into this optimizer: {blocker}")
        self.clip = clip
        self.fold = blocker is None if fold is None else fold
        self._owns_grad_scale = False
        self._handles = [optimizer.register_step_pre_hook(self._before_step),
                         optimizer.register_step_post_hook(self._after_step)]

    @outside_compile  # under a compiled optimizer.step too: the fold must set the real optimizer's grad_scale
    def _before_step(self, optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        pending = getattr(optimizer, "grad_scale", None)  # set by GradScaler for fused optimizers

        def fold_into_optimizer(coefs: torch.Tensor) -> None:
            self._owns_grad_scale = pending is None
            # torch's fused optimizers read grad_scale, which torch.optim.Optimizer does not declare
            optimizer.grad_scale = (pending if pending is not None else 1.0) / coefs[0]  # type: ignore[attr-defined]

        self.clip(pending_scale=pending, fold=fold_into_optimizer if self.fold else None)

    @outside_compile
    def _after_step(self, optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        if self._owns_grad_scale and hasattr(optimizer, "grad_scale"):
            del optimizer.grad_scale
        self._owns_grad_scale = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
