"""OLMo-core: exact global and per-group clipping as one Trainer callback, OLMo's own clip off.

    train_module_config = TransformerTrainModuleConfig(..., max_grad_norm=None)   # OLMo's clip off
    trainer_config = trainer_config.with_callback(
        "distclip", DistclipCallback(config={"max_norm": 1.0}))                   # distclip's on

OLMo-core (checked on 3.0.0) clips inside ``TrainModule.optim_step``: torchtitan's recipe,
``get_total_norm`` then ``full_tensor()`` of the DTensor norm (one collective per sharded mesh
dimension: 2 under FSDP2 x TP), plus an all-reduce over the pipeline group in the pipeline train
module. The callback clips one hook earlier, in ``Callback.pre_optim_step`` (OLMo's extension
point: after every micro-batch's backward, before ``optim_step``), with distclip's exact norm:
ONE collective for the total and every group norm, whatever the mesh.

* The clipper is a :class:`~distclip.GradClipper` on ``train_module.model``, or, for
  ``TransformerPipelineTrainModule``, on its pipeline stages (``train_pp_schedule.stages``,
  each holding one of ``model_parts``) with ``pipeline_group=train_module.pp_group``. It is
  built once, at the first ``pre_epoch`` (after the train module built its pipeline schedule).
* Nothing clips twice: a train module with ``max_grad_norm`` set is refused when the callback is
  attached and again before training (put the threshold in the distclip config instead).
  ``OLMoDDPTrainModule`` is refused: its ``OLMoDDPOptimizer`` clips inside ``step()``, on its own
  gradient buffers, where no callback runs.
* Metrics go through ``trainer.record_metric`` (``reduce_type=None``: the values are identical,
  bitwise, on every rank; no reduction, no host sync): ``optim/total grad norm`` (the pre-clip
  total norm, OLMo-core's own name, which its console logger and ``StabilityMonitorCallback`` read),
  and with ``group_metrics`` per group ``optim/grad norm/<group>`` (pre-clip),
  ``optim/clip coef/<group>`` and ``optim/clip threshold/<group>``, plus ``optim/clip skipped``.
* A ``SkipStepOptimizer`` (``SkipStepAdamW``, ``SkipStepLion``) gets the pre-clip total norm as
  ``latest_grad_norm``, as OLMo-core's own clip does (it needs it before ``step()``).
* Checkpoints: the callback's ``state_dict`` is the clipper's (adaptive policy state, clip counts),
  saved by OLMo-core with the trainer state (``train/rank<N>.pt``) and restored on resume.

Imports ``olmo_core``; ``import distclip`` never does.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .. import (
    ClipConfig,
    ClipReport,
    ConfigError,
    GradClipper,
    MissingExtraError,
    UsageError,
    load_config,
)


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"distclip.olmo_core needs OLMo-core ({err}); install the extra: pip install 'distclip[olmo-core]' "
            "(ai2-olmo-core, checked on 3.0.0)") from None


_callbacks = _require("olmo_core.train.callbacks")
_Callback: Any = _callbacks.Callback  # a base class only known at run time
_optim = _require("olmo_core.optim")
_modules = _require("olmo_core.train.train_module")

__all__ = ["TOTAL_NORM_METRIC", "DistclipCallback"]

TOTAL_NORM_METRIC = "optim/total grad norm"  # olmo_core.train.common.OPTIM_GRAD_NORM_METRIC


@dataclass
class DistclipCallback(_Callback):
    """Clip every optimizer step exactly with distclip (see the module docstring).

    Args:
        config: a distclip config: a dict (e.g. ``{"max_norm": 1.0, "groups": [...]}``), a YAML path,
            or a :class:`~distclip.ClipConfig`; None reads ``$DISTCLIP_CONFIG``, else the defaults.
            A dict or path keeps the callback serialisable with OLMo-core's experiment config.
        group_metrics: also record the per-group norms, coefficients and thresholds (else only
            ``optim/total grad norm`` and ``optim/clip skipped``).

    ``clipper`` is the :class:`~distclip.GradClipper` (None before the first epoch starts),
    ``last_report`` its latest :class:`~distclip.ClipReport`.
    """

    # Runs after the other callbacks' pre_optim_step (e.g. GAPMonitorCallback's gradient statistics),
    # as OLMo-core's own clip does (in optim_step, after every callback): they see the pre-clip gradients.
    priority: ClassVar[int] = -100

    config: dict[str, Any] | str | ClipConfig | None = None
    group_metrics: bool = True

    clipper: GradClipper | None = field(default=None, init=False, repr=False)
    _clip_config: ClipConfig | None = field(default=None, init=False, repr=False)
    _pending_state: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.config, os.PathLike):
            self.config = os.fspath(self.config)
        self._clip_config = load_config(self.config)  # a bad config fails here, on every rank, before training

    @property
    def last_report(self) -> ClipReport | None:
        return None if self.clipper is None else self.clipper.last_report

    # ------------------------------------------------------------------ set-up
    def post_attach(self) -> None:
        _refuse_double_clipping(self.trainer.train_module, self._clip_config)

    def pre_train(self) -> None:
        _refuse_double_clipping(self.trainer.train_module, self._clip_config)

    def pre_epoch(self) -> None:
        """Build the clipper once, on every rank (one set-up exchange): after the train module's own
        ``pre_train`` (which builds the pipeline schedule), before the first batch."""
        if self.clipper is None:
            assert self._clip_config is not None  # loaded in __post_init__
            self.clipper = _build_clipper(self.trainer.train_module, self._clip_config)
            if self._pending_state is not None:
                self.clipper.load_state_dict(self._pending_state)
                self._pending_state = None

    # ---------------------------------------------------------------- per step
    def pre_optim_step(self) -> None:
        """Clip (one collective), record the metrics, and hand the norm to skip-step optimizers."""
        if self.clipper is None:  # a trainer driven without pre_epoch
            self.pre_epoch()
        assert self.clipper is not None
        report = self.clipper.clip()
        for optim in _optimizers(self.trainer.train_module):
            if isinstance(optim, _optim.SkipStepOptimizer):
                optim.latest_grad_norm = report.total_norm  # as OLMo's own clip does, before step()
        self._record(report)

    def _record(self, report: ClipReport) -> None:
        """Device tensors, ``reduce_type=None``: OLMo-core moves them to the host when it logs."""
        record = self.trainer.record_metric
        record(TOTAL_NORM_METRIC, report.total_norm, reduce_type=None)
        record("optim/clip skipped", float(report.skipped), reduce_type=None)  # a host bool: no sync
        if not self.group_metrics:
            return
        for name, norm in report.group_norms.items():
            record(f"optim/grad norm/{name}", norm, reduce_type=None)
            record(f"optim/clip coef/{name}", report.coefs[name], reduce_type=None)
            if name in report.thresholds:
                record(f"optim/clip threshold/{name}", report.thresholds[name], reduce_type=None)

    def close(self) -> None:
        if self.clipper is not None:
            self.clipper.close()  # flushes the config's own sinks (JSONL, TensorBoard), if any

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The clipper's state (policy state by group, clip counts, steps): what a resume needs."""
        if self.clipper is not None:
            return {"distclip": self.clipper.state_dict()}
        return {"distclip": self._pending_state} if self._pending_state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: now if the clipper exists, else when it is built (OLMo-core loads
        checkpoints at the start of ``fit``, before ``pre_epoch``)."""
        state = state_dict.get("distclip") if isinstance(state_dict, Mapping) else None
        if state is None:
            return  # a checkpoint written without distclip: start its state afresh
        if self.clipper is not None:
            self.clipper.load_state_dict(state)
        else:
            self._pending_state = dict(state)


# --------------------------------------------------------------------- helpers
def _build_clipper(train_module: Any, config: ClipConfig) -> GradClipper:
    """A clipper on the train module's model, or on its pipeline stages with its pipeline group."""
    _refuse_fused_train_module(train_module)
    if isinstance(train_module, _modules.TransformerPipelineTrainModule):
        # torch PipelineStages (each holds one of model_parts and knows its stage index, loop or V style)
        stages = list(train_module.train_pp_schedule.stages)
        return GradClipper(stages, config, pipeline_group=train_module.pp_group)
    model = getattr(train_module, "model", None)
    if not isinstance(model, torch.nn.Module):
        raise UsageError(
            f"DistclipCallback clips train_module.model, but {type(train_module).__name__} has no module there "
            f"(got {type(model).__name__}). Use a TransformerTrainModule, a TransformerPipelineTrainModule or a "
            "BasicTrainModule, or build distclip.GradClipper(your_model, config) and call clipper.clip() yourself."
        )
    return GradClipper(model, config)


def _optimizers(train_module: Any) -> list[torch.optim.Optimizer]:
    optimizers = getattr(train_module, "optimizers", None)  # the pipeline train module: one per model part
    if optimizers is not None:
        return list(optimizers)
    optim = getattr(train_module, "optim", None)
    return [] if optim is None else [optim]


def _refuse_double_clipping(train_module: Any, config: ClipConfig | None) -> None:
    _refuse_fused_train_module(train_module)
    value = getattr(train_module, "max_grad_norm", None)
    if value is not None:
        max_norm = config.max_norm if config is not None else "?"
        raise ConfigError(
            f"distclip: the train module has max_grad_norm={value}, so OLMo-core would clip the gradients again in "
            f"optim_step, after DistclipCallback clipped them. Set max_grad_norm=None in "
            f"{type(train_module).__name__}'s config (TransformerTrainModuleConfig(..., max_grad_norm=None)) and put "
            f"the threshold in the distclip config instead, e.g. max_norm: {value} (it has max_norm: {max_norm})."
        )


def _refuse_fused_train_module(train_module: Any) -> None:
    if isinstance(train_module, _modules.OLMoDDPTrainModule):
        raise UsageError(
            "distclip: OLMoDDPTrainModule clips inside OLMoDDPOptimizer.step(), on its own flat gradient buffers, "
            "where no Trainer callback runs, so DistclipCallback cannot clip there. Use TransformerTrainModule (FSDP, "
            "HSDP, DDP, TP, CP) or TransformerPipelineTrainModule with DistclipCallback, or keep OLMoDDP's own clip."
        )
