"""Hugging Face Trainer: one line gives a Trainer exact distclip clipping where it already clips.

    trainer = Trainer(model=model, args=TrainingArguments(..., max_grad_norm=1.0), ...)
    distclip.hf_trainer.enable(trainer)          # config: argument, else $DISTCLIP_CONFIG, else defaults
    trainer.train()

The Trainer clips with ``accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)`` on
every optimizer step (with ``max_grad_norm <= 0`` it only measures, with ``max_norm=inf``), so
``enable`` puts distclip behind that call (:func:`distclip.accelerate.enable` on
``trainer.accelerator``): ``max_grad_norm`` is the default group's threshold, the config's groups
keep theirs, and the logged ``grad_norm`` is the exact global pre-clip norm, for DDP, FSDP and
DeepSpeed alike, and for gradients on several device meshes or beside plain tensors (PEFT adapters on a
model transformers sharded at load time with some sharded parameters trainable, experts as plain
tensors), where the Trainer would otherwise skip ``accelerator.clip_grad_norm_`` for its own per-mesh
2-norm (:mod:`distclip.compat.transformers`). Each log line also gets the last clip's per-group metrics,
with the names of :meth:`distclip.ClipReport.to_metrics` (``grad_norm/<group>``, ``clip_coef/<group>``,
``clip_threshold/<group>``, ``clipped/<group>``, ``nonfinite/<group>``, ``clip_rate/<group>``
and ``skipped``), so wandb / TensorBoard reporters show them. Imports ``transformers``.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Mapping

from transformers import TrainerCallback

from ..compat import transformers as transformers_compat
from ..core.config import ClipConfig
from . import accelerate as distclip_accelerate

__all__ = ["enable", "GroupNormLogger"]


def enable(trainer: Any, config: ClipConfig | Mapping[str, Any] | str | os.PathLike | None = None, *,
           log_groups: bool = True, **overrides: Any) -> distclip_accelerate.AccelerateClipping:
    """Clip ``trainer``'s gradients with distclip. Call after building the Trainer, before ``train()``.

    Under DeepSpeed the clip runs inside DeepSpeed's step with the config's ``max_norm``; this
    sets it from ``args.max_grad_norm`` (no clipping when that is <= 0) unless given here.
    """
    if getattr(trainer, "is_deepspeed_enabled", False) and "max_norm" not in overrides:
        max_grad_norm = trainer.args.max_grad_norm
        overrides["max_norm"] = max_grad_norm if max_grad_norm and max_grad_norm > 0 else math.inf
    clipping = distclip_accelerate.enable(trainer.accelerator, config, **overrides)
    transformers_compat.route_mixed_grads_to_accelerator(trainer)  # else mixed meshes skip the accelerator's clip
    if log_groups:
        # first, so that the reporters (wandb, TensorBoard...) called after it see the group norms too
        trainer.callback_handler.callbacks.insert(0, GroupNormLogger(clipping))
    return clipping


class GroupNormLogger(TrainerCallback):
    """Adds the last clip's :meth:`~distclip.ClipReport.to_metrics` to the Trainer's logs (the Trainer's own
    ``grad_norm`` stays: it is the same exact total norm). One host read per log line."""

    def __init__(self, clipping: distclip_accelerate.AccelerateClipping):
        self.clipping = clipping
        self._warned = False

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        report = self.clipping.last_report
        if logs is None or "grad_norm" not in logs:
            return
        if report is None:
            if not self._warned:  # the Trainer measured a norm without calling accelerator.clip_grad_norm_
                self._warned = True
                warnings.warn(
                    "distclip: the Trainer logged a grad_norm but never called accelerator.clip_grad_norm_, so "
                    "distclip neither measured nor clipped: this Trainer clips some other way (a subclass's own "
                    "_clip_grad_norm, or a transformers version distclip.hf_trainer was not checked on)",
                    stacklevel=2)
            return
        extra = {k: v for k, v in report.to_metrics().items() if k != "grad_norm"}
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("grad_norm") == logs["grad_norm"]:
            state.log_history[-1].update(extra)  # the Trainer stored this log line just before calling us
