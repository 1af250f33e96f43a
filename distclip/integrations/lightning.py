"""PyTorch Lightning: exact global and per-group clipping as one callback, for DDP, FSDP and DeepSpeed.

    trainer = Trainer(strategy="ddp", callbacks=[distclip.lightning.DistclipCallback({"max_norm": 1.0})])
    trainer.fit(model)              # logs grad_norm, grad_norm/<group>, clip_coef/<group>, ... each step

Where it clips, by strategy (the clipper is built in ``on_fit_start`` on ``trainer.strategy.model``):

* DDP (``"ddp"``, ``DDPStrategy``): a :class:`~distclip.GradClipper` on the ``DistributedDataParallel``
  wrapper, clipping in ``on_before_optimizer_step``; the norm is computed inside DDP's all-reduce
  (distclip's comm hook) unless the strategy registered a comm hook of its own (then after backward).
* FSDP (``FSDPStrategy``: FSDP1, which Lightning cannot norm-clip: Lightning #19235) and
  ``ModelParallelStrategy`` (FSDP2 ``fully_shard`` / tensor parallel, applied in ``configure_model``):
  the same, on the FSDP-wrapped module or the LightningModule holding the ``fully_shard`` modules.
* DeepSpeed (``DeepSpeedStrategy``): :func:`distclip.deepspeed.attach` on the engine: the clip runs
  inside ``engine.step()`` (where DeepSpeed has reduced the gradients), DeepSpeed's own
  ``gradient_clipping`` is off. Lightning's ``configure_gradient_clipping`` does nothing there.

The clip comes after AMP unscaling (Lightning's ``16-mixed`` precision plugins call
``scaler.unscale_(optimizer)`` right before ``on_before_optimizer_step``), and once per optimizer
step under gradient accumulation (Lightning calls the hook only on the step). Trainer's
``gradient_clip_val`` must stay unset: distclip's ``max_norm`` is the threshold.

Metrics: the latest clip's :meth:`~distclip.ClipReport.to_metrics` go to ``pl_module.log_dict``
every ``log_every_n_steps`` clips (default: the Trainer's), ``on_step=True, on_epoch=False,
sync_dist=False``: the values are already identical, bitwise, on every rank (they come from the one
all-reduce), so a sync would add one collective per key and change nothing; an epoch mean of norms
would need Lightning to accumulate every step. They are logged on every rank, so callbacks such as
``ModelCheckpoint(monitor="grad_norm")`` decide the same everywhere. One host read per logged step,
none on the others (the values are handed to Lightning as CPU tensors: it moves nothing to the
device and reads nothing back). The config's ``log`` section (JSONL, TensorBoard) works as well.

Checkpoints: the callback's ``state_dict`` is the clipper's (adaptive policy state, clip counts), so
``trainer.fit(ckpt_path=...)`` resumes zclip/autoclip/adagc where they were.
Imports ``lightning``; ``import distclip`` never does.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from ..clipper import GradClipper
from ..compat import pytorch as _compat
from ..compat.deepspeed import is_engine as is_deepspeed_engine
from ..core.config import ClipConfig, ConfigError, load_config
from ..core.errors import UsageError, require_extra
from ..core.report import ClipReport

pl = require_extra("lightning.pytorch", "lightning", "distclip.lightning")
_Callback: Any = pl.Callback  # a base class only known at run time

__all__ = ["DistclipCallback"]


class DistclipCallback(_Callback):
    """Clip every optimizer step exactly with distclip (see the module docstring).

    Args:
        config: a :class:`~distclip.ClipConfig`, dict, YAML path or preset name; None reads ``$DISTCLIP_CONFIG``
            (which ``distclip launch`` sets), else the defaults.
        log_every_n_steps: log the metrics every this many clips (None: the Trainer's
            ``log_every_n_steps``; 0: never).
        **overrides: config settings that take precedence, e.g. ``max_norm=0.5``.

    ``clipper`` is the :class:`~distclip.GradClipper` of the current fit (None before it),
    ``last_report`` its latest :class:`~distclip.ClipReport`.
    """

    def __init__(self, config: ClipConfig | Mapping[str, Any] | str | os.PathLike | None = None, *,
                 log_every_n_steps: int | None = None, **overrides: Any):
        if log_every_n_steps is not None and (isinstance(log_every_n_steps, bool)
                                              or not isinstance(log_every_n_steps, int) or log_every_n_steps < 0):
            raise ConfigError(
                f"DistclipCallback(log_every_n_steps={log_every_n_steps!r}): expected None or an int >= 0")
        self.config = load_config(config, **overrides)
        self.log_every_n_steps = log_every_n_steps
        self.clipper: GradClipper | None = None
        self._clips_in_step = False  # DeepSpeed: the clipper clips inside engine.step() by itself
        self._fitting = False
        self._pending_state: dict[str, Any] | None = None  # loaded from a checkpoint before the clipper exists
        self._logged_steps = 0  # clipper.steps when the metrics were last considered

    @property
    def last_report(self) -> ClipReport | None:
        return None if self.clipper is None else self.clipper.last_report

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            _refuse_lightning_clipping(trainer, self.config)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Build the clipper on the model as the strategy wrapped it (before the first backward)."""
        _refuse_lightning_clipping(trainer, self.config)
        _refuse_unsupported_optimizers(trainer)
        previous = self.clipper
        model = trainer.strategy.model
        self._clips_in_step = is_deepspeed_engine(model)
        self.clipper = _build_clipper(model, self.config)
        state = self._pending_state if self._pending_state is not None else (
            previous.state_dict() if previous is not None else None)  # a second fit continues the first
        if state is not None:
            self.clipper.load_state_dict(state)
        self._pending_state = None
        self._logged_steps = self.clipper.steps
        self._fitting = True

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and self.clipper is not None:
            self._fitting = False
            self.clipper.close()  # flushes the config's sinks

    # ---------------------------------------------------------------- per step
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.clipper is not None and not self._clips_in_step:  # DeepSpeed: inside engine.step(), after this hook
            self.clipper.clip()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log the latest clip's metrics when a multiple of ``log_every_n_steps`` clips was reached."""
        clipper = self.clipper
        if clipper is None or clipper.last_report is None or clipper.steps == self._logged_steps:
            return
        every = trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
        due = every > 0 and clipper.steps // every > self._logged_steps // every
        self._logged_steps = clipper.steps
        if not due:
            return
        metrics = clipper.last_report.to_metrics()  # the one host read
        # CPU float64 tensors: Lightning keeps results on the value's device, so nothing goes back to
        # the accelerator and the logger's .item() reads no device memory (floats would be copied there)
        values = torch.tensor(list(metrics.values()), dtype=torch.float64).unbind()
        pl_module.log_dict(dict(zip(metrics, values)), on_step=True, on_epoch=False, sync_dist=False,
                           prog_bar=False, batch_size=1)

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The clipper's state (policy state by group, clip counts, steps): what a resume needs."""
        if self.clipper is not None:
            return self.clipper.state_dict()
        return dict(self._pending_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, now if a fit is running (FSDP, DeepSpeed restore after set-up),
        else when the clipper is built (DDP restores callbacks before it)."""
        if self.clipper is not None and self._fitting:
            self.clipper.load_state_dict(state_dict)
        else:
            self._pending_state = dict(state_dict)


# --------------------------------------------------------------------- helpers
def _build_clipper(model: Any, config: ClipConfig) -> GradClipper:
    if is_deepspeed_engine(model):
        from . import deepspeed as distclip_deepspeed

        return distclip_deepspeed.attach(model, config)
    if config.comm_hook is not False and _compat.ddp_has_comm_hook(model):
        # DDPStrategy(ddp_comm_hook=...) registered its hook already and DDP takes one: measure after backward
        config = config.replace(comm_hook=False)
    return GradClipper(model, config)


def _refuse_lightning_clipping(trainer: Any, config: ClipConfig) -> None:
    value = trainer.gradient_clip_val
    if value is not None and value != 0:
        raise ConfigError(
            f"distclip: Trainer(gradient_clip_val={value}) asks Lightning to clip the gradients too, after "
            "DistclipCallback has clipped them (under DeepSpeed: inside DeepSpeed's step). Remove gradient_clip_val "
            "(and gradient_clip_algorithm) from the Trainer and put the threshold in the distclip config instead, "
            f"e.g. max_norm: {value} (the config has max_norm: {config.max_norm})."
        )


def _refuse_unsupported_optimizers(trainer: Any) -> None:
    optimizers = trainer.optimizers
    if len(optimizers) > 1:
        raise UsageError(
            f"DistclipCallback clips the whole model before each optimizer step, but configure_optimizers returned "
            f"{len(optimizers)} optimizers, which would clip it once per optimizer. Use one optimizer (with several "
            "param groups if needed), or build a distclip.GradClipper(model, config, params=...) per optimizer and "
            "call clipper.clip() yourself."
        )
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and any(_compat.supports_amp_scaling(opt) for opt in optimizers):
        raise UsageError(
            f"DistclipCallback: {type(optimizers[0]).__qualname__} unscales the gradients inside its own step (a fused "
            "optimizer under 16-mixed precision), so in on_before_optimizer_step they still carry the loss scale and "
            "cannot be clipped to a threshold (Lightning refuses its own clipping here too). Use the optimizer with "
            "fused=False, or precision='bf16-mixed'."
        )
