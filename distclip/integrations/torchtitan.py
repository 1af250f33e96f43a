"""torchtitan: exact global and per-group clipping in torchtitan's Trainer, chosen by config.

torchtitan (0.3.0) clips inline in ``Trainer.train_step`` with ``dist_utils.clip_grad_norm_``:
one collective per sharded mesh dimension of the norm DTensor (``full_tensor()``), plus one over the
pipeline mesh, with expert and dense norms reduced apart under EP. distclip computes the same norm
exactly (every gradient element counted once, from the DTensor placements and the mesh layout) in
ONE all-reduce, identical on every rank, with per-group thresholds and adaptive policies.

The route for a torchtitan user is torchtitan's own: a ``Trainer`` subclass whose ``Config`` carries
a ``distclip`` section, selected with ``--module``/``--config`` (torchtitan's config manager takes a
fully qualified module path). Your config module::

    # my_configs.py
    from torchtitan.models.llama3.config_registry import llama3_8b
    from distclip.integrations.torchtitan import with_distclip

    def llama3_8b_distclip():
        return with_distclip(llama3_8b(), {"groups": [{"name": "embeddings", "match": "tok_embeddings.*",
                                                       "max_norm": 0.5}]})

    torchrun --nproc_per_node 8 -m torchtitan.train --module my_configs --config llama3_8b_distclip \\
        [--distclip.config clip.yaml] [--distclip.max_norm 1.0] [--distclip.norm_type inf]

:class:`DistclipTrainer` replaces ONLY the clip: during its ``train_step`` (torchtitan's own code,
unchanged), ``torchtitan.distributed.utils.clip_grad_norm_`` is this trainer's distclip clip, and is
restored right after (:func:`distclip.compat.torchtitan.clip_routed_to`; torchtitan has no clip hook,
so this scoped replacement is the one way in without copying ``train_step``). It is checked at
construction (``train_step`` still calls it, with 0.3.0's signature) and after every step (it was
called exactly once: nothing clips twice, and a torchtitan that stopped calling it is an error, not
a silent no-clip). torchtitan's ``pp_mesh`` becomes distclip's ``pipeline_group`` (the stages are the
ones its schedule runs); expert parallelism needs nothing (EP placements count as they are).

* Threshold: the distclip config's ``max_norm`` if it sets one, else torchtitan's ``--training.max_norm``.
* Metrics: torchtitan logs the returned pre-clip norm as ``grad_norm`` (distclip's exact one); the
  clip's per-group metrics (:meth:`~distclip.ClipReport.to_metrics`) go through torchtitan's metrics
  logger (TensorBoard / W&B) as ``distclip/<metric>`` on its log steps, from the rank it logs on.
* Checkpoints: the clipper's state (adaptive thresholds, clip counts) is a ``distclip`` entry of
  torchtitan's checkpoints; to resume a checkpoint saved without distclip, add
  ``--checkpoint.exclude_from_loading distclip``.
* A skipped step (``nonfinite: skip`` or ``skip_spikes``) drops the gradients, so torchtitan's
  optimizer step leaves the parameters alone.

For your own training loop on torchtitan's components, :func:`clip_grad_norm_` has the signature of
``torchtitan.distributed.utils.clip_grad_norm_``. For another Trainer subclass (e.g. torchtitan's
``FaultTolerantTrainer``), mix in :class:`DistclipTrainerMixin` and add ``distclip: DistclipSection``
to its Config.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch

import distclip
from distclip import (
    ClipConfig,
    ClipReport,
    ConfigError,
    GradClipper,
    MissingExtraError,
    UsageError,
)

from ..compat import torchtitan as compat

try:
    import tyro
    from torch.distributed.checkpoint.stateful import Stateful
    from torchtitan.components.metrics import BaseLogger
    from torchtitan.trainer import Trainer
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise MissingExtraError(
        f"distclip.integrations.torchtitan needs torchtitan ({err}). Install the extra: "
        "pip install 'distclip[torchtitan]' (torchtitan==0.3.0 and triton)") from None

__all__ = ["ClipperCheckpointState", "DistclipSection", "DistclipTrainer", "DistclipTrainerMixin", "clip_grad_norm_",
           "resolve_config", "with_distclip"]

METRIC_PREFIX = "distclip/"
CHECKPOINT_KEY = "distclip"


@dataclass(kw_only=True, slots=True)
class DistclipSection:
    """The ``distclip`` section of a :class:`DistclipTrainer` config (``--distclip.<field>`` on the CLI).

    Precedence, lowest first: ``settings`` (from your config function), the YAML file ``config``,
    then ``max_norm`` / ``norm_type`` / ``nonfinite`` given here. A ``max_norm`` set nowhere is
    torchtitan's ``training.max_norm``.
    """

    enable: bool = True
    """Clip with distclip (False: torchtitan's own clip_grad_norm_ runs, unchanged)."""

    config: str | None = None
    """Path of a distclip YAML config (groups, policy, nonfinite, log...; a top-level ``distclip:`` section
    is used)."""

    max_norm: float | None = None
    """Threshold of the default group (None: the distclip config's, else ``training.max_norm``)."""

    norm_type: float | None = None
    """p of the norm, e.g. 2.0, 1.0, inf (None: the distclip config's, default 2.0)."""

    nonfinite: Literal["skip", "error", "zero", "ignore"] | None = None
    """What a non-finite norm does (None: the distclip config's, default skip: the step is dropped)."""

    log_metrics: bool = True
    """Log the clip's per-group metrics through torchtitan's metrics logger as distclip/<metric>."""

    settings: Annotated[dict[str, Any], tyro.conf.Suppress] = field(default_factory=dict)
    """distclip config settings set in Python (your config function); not a CLI flag."""


def resolve_config(section: DistclipSection, training_max_norm: float) -> ClipConfig:
    """The distclip config of a run: ``settings`` < YAML ``config`` < the section's fields; ``max_norm``
    falls back to torchtitan's ``training.max_norm``. ``comm_hook`` defaults to off (distclip measures after
    torchtitan's backward, as torchtitan's clip does)."""
    base = ClipConfig.from_dict({"comm_hook": False, **dict(section.settings)}, source="distclip.settings")
    explicit = set(section.settings)
    if section.config:
        from_file = distclip.load_config(os.fspath(section.config))
        base = base.replace(**{k: v for k, v in from_file.to_dict().items() if k in from_file.model_fields_set})
        explicit |= from_file.model_fields_set
    overrides = {k: v for k, v in (("max_norm", section.max_norm), ("norm_type", section.norm_type),
                                   ("nonfinite", section.nonfinite)) if v is not None}
    if "max_norm" not in explicit and "max_norm" not in overrides:
        overrides["max_norm"] = training_max_norm
    return base.replace(**overrides) if overrides else base


class DistclipTrainerMixin:
    """Clip with distclip in a torchtitan Trainer (subclass) whose ``config.distclip`` is a :class:`DistclipSection`.

    ``grad_clipper`` is the :class:`~distclip.GradClipper` (built in ``__init__``, or on the first clip),
    ``last_clip_report`` the latest :class:`~distclip.ClipReport`.
    """

    # what the torchtitan Trainer this is mixed into provides
    config: Any
    parallel_dims: Any
    pp_schedule: Any
    model_parts: list[torch.nn.Module]
    step: int
    metrics_processor: Any
    checkpointer: Any

    grad_clipper: GradClipper | None = None
    last_clip_report: ClipReport | None = None
    _distclip_clips_in_step: int = 0
    _distclip_params_checked: bool = False
    _distclip_pending_state: dict[str, Any] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.setup_distclip()

    def setup_distclip(self) -> None:
        """What ``__init__`` adds after torchtitan's: the clipper (a set-up collective) and its checkpoint entry."""
        if self._distclip_enabled():
            self.grad_clipper = self.build_grad_clipper()
            self.register_checkpoint_state()

    # ---------------------------------------------------------------- set-up
    def _distclip_enabled(self) -> bool:
        section = getattr(self.config, "distclip", None)
        if not isinstance(section, DistclipSection):
            raise ConfigError(
                f"{type(self).__name__}: config.distclip must be a DistclipSection (add `distclip: DistclipSection = "
                f"field(default_factory=DistclipSection)` to the trainer's Config), got {type(section).__name__}")
        return section.enable

    def build_grad_clipper(self) -> GradClipper:
        """The clipper of this trainer's model parts: one stage each under pipeline parallelism (the stages
        its schedule runs), with torchtitan's ``pp_mesh`` as the pipeline group. A collective (the set-up
        check): every rank builds it."""
        compat.check_clip_call(super().train_step)  # type: ignore[misc]
        config = resolve_config(self.config.distclip, self.config.training.max_norm)
        parallel_dims = self.parallel_dims
        if parallel_dims.pp_enabled:
            stages = compat.pipeline_stages(self.pp_schedule)
            parts = {id(p) for p in self.model_parts}
            if {id(s.submod) for s in stages} != parts or len(stages) != len(self.model_parts):
                raise UsageError("distclip: the pipeline schedule's stages are not this trainer's model_parts")
            clipper = GradClipper(stages, config, pipeline_group=parallel_dims.get_mesh("pp"))
        else:
            if len(self.model_parts) != 1:
                raise UsageError(f"distclip: {len(self.model_parts)} model parts without pipeline parallelism")
            clipper = GradClipper(self.model_parts[0], config)
        if self._distclip_pending_state is not None:
            clipper.load_state_dict(self._distclip_pending_state)
            self._distclip_pending_state = None
        return clipper

    # -------------------------------------------------------------- per step
    def train_step(self, data_iterator: Any) -> Any:
        """torchtitan's ``train_step``, with its clip call routed to :meth:`distclip_clip_grad_norm_`."""
        if not self._distclip_enabled():
            return super().train_step(data_iterator)  # type: ignore[misc]
        self._distclip_clips_in_step = 0
        with compat.clip_routed_to(self.distclip_clip_grad_norm_):
            out = super().train_step(data_iterator)  # type: ignore[misc]
        if self._distclip_clips_in_step != 1:
            raise compat.unsupported(
                f"{type(self).__name__}.train_step called torchtitan's clip_grad_norm_ {self._distclip_clips_in_step} "
                "times in one step (distclip expects exactly once)")
        return out

    def distclip_clip_grad_norm_(self, parameters: Any, max_norm: float, norm_type: float = 2.0,
                                 error_if_nonfinite: bool = False, foreach: bool | None = None,
                                 pp_mesh: Any = None, ep_enabled: bool = False) -> torch.Tensor:
        """What ``train_step`` calls in place of torchtitan's ``clip_grad_norm_`` (same signature).

        The threshold, p and non-finite handling are the distclip config's (resolved at set-up);
        ``pp_mesh`` / ``ep_enabled`` are already known from the layout. Returns the exact pre-clip
        total norm (fp32, identical on every rank), which torchtitan logs as ``grad_norm``.
        """
        self._distclip_clips_in_step += 1
        if self.grad_clipper is None:
            self.grad_clipper = self.build_grad_clipper()
        if not self._distclip_params_checked:
            self._check_parameters(parameters)
        report = self.grad_clipper.clip()
        self.last_clip_report = report
        self._log_clip_metrics(report)
        return report.total_norm

    def _check_parameters(self, parameters: Any) -> None:
        """Once: torchtitan passes the parameters of the model parts the clipper was built on."""
        given = {id(p) for p in ([parameters] if isinstance(parameters, torch.Tensor) else parameters)}
        mine = {id(p) for m in self.model_parts for p in m.parameters()}
        if not given <= mine:
            raise UsageError(f"distclip: train_step clips {len(given - mine)} parameters that are not in model_parts")
        self._distclip_params_checked = True

    def _log_clip_metrics(self, report: ClipReport) -> None:
        """``distclip/<metric>`` through torchtitan's metrics logger on its log steps (one host read, only on
        the rank whose logger writes)."""
        processor = getattr(self, "metrics_processor", None)
        if not self.config.distclip.log_metrics or processor is None or not processor.should_log(self.step):
            return
        logger = processor.logger
        if type(logger) is BaseLogger:  # this rank does not log (torchtitan's no-op logger)
            return
        logger.log({METRIC_PREFIX + k: v for k, v in report.to_metrics().items()}, self.step)

    def close(self) -> None:
        """torchtitan's ``close``, then the clipper's (flushes the sinks of the distclip config's ``log``)."""
        super().close()  # type: ignore[misc]
        if self.grad_clipper is not None:
            self.grad_clipper.close()

    # ----------------------------------------------------------- checkpoints
    def register_checkpoint_state(self) -> None:
        """Put the clipper's state in torchtitan's checkpoints under ``distclip`` (next to ``train_state``,
        ``optimizer``, ...), so that ``--checkpoint.exclude_from_loading distclip`` resumes a checkpoint
        saved without it. Nothing to do when checkpointing is off."""
        states = compat.checkpoint_states(getattr(self, "checkpointer", None))
        if states is not None:
            states[CHECKPOINT_KEY] = ClipperCheckpointState(self)


class ClipperCheckpointState(Stateful):
    """The trainer's clipper state (adaptive thresholds, clip counts, steps) as a torchtitan checkpoint entry:
    one opaque bytes value (its shape varies with the policy, which DCP's load template could not follow)."""

    def __init__(self, trainer: DistclipTrainerMixin):
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        clipper = trainer.grad_clipper
        state = clipper.state_dict() if clipper is not None else trainer._distclip_pending_state
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        return {"clipper": buffer}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        blob = state_dict["clipper"]
        if isinstance(blob, (bytes, bytearray)):
            blob = io.BytesIO(blob)
        blob.seek(0)
        state = torch.load(blob, map_location="cpu", weights_only=False)
        trainer = self.trainer
        if state is None:
            return
        if trainer.grad_clipper is not None:
            trainer.grad_clipper.load_state_dict(state)
        else:
            trainer._distclip_pending_state = state


class DistclipTrainer(DistclipTrainerMixin, Trainer):
    """torchtitan's ``Trainer`` clipping with distclip (see the module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        distclip: DistclipSection = field(default_factory=DistclipSection)


def with_distclip(config: Any, settings: Mapping[str, Any] | None = None, **section: Any) -> DistclipTrainer.Config:
    """A :class:`DistclipTrainer.Config` holding everything of torchtitan's ``Trainer.Config`` ``config``
    (e.g. ``llama3_8b()`` from its registry), with distclip ``settings`` and section fields ``section``
    (``config=``, ``max_norm=``, ...)."""
    if isinstance(config, DistclipTrainer.Config) or type(config) is Trainer.Config:
        values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    else:
        raise UsageError(
            f"with_distclip takes torchtitan's Trainer.Config (as its config_registry functions return), got "
            f"{type(config).__qualname__}. For a Trainer subclass of your own, mix in DistclipTrainerMixin and add "
            "`distclip: DistclipSection = field(default_factory=DistclipSection)` to its Config.")
    base = values.get("distclip") or DistclipSection()
    merged = dataclasses.replace(base, **section)
    if settings:
        merged = dataclasses.replace(merged, settings={**merged.settings, **dict(settings)})
    values["distclip"] = merged
    return DistclipTrainer.Config(**values)


def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: bool | None = None, pp_mesh: Any = None, ep_enabled: bool = False, *,
                    stages: Iterable[Any] | None = None, **settings: Any) -> torch.Tensor:
    """``torchtitan.distributed.utils.clip_grad_norm_``, exact, in one collective.

    Args:
        parameters: what torchtitan passes (the parameters of ``model_parts``: uniform clipping), or
            ``model_parts`` themselves (a module or a list of modules: needed for per-group
            ``settings``, whose patterns match parameter names).
        max_norm, norm_type, error_if_nonfinite, foreach: as torchtitan's (torch semantics).
        pp_mesh: torchtitan's pipeline mesh (``parallel_dims.get_optional_mesh("pp")``). With
            ``model_parts``, a V-shaped schedule (ZBV, DualPipeV) needs ``stages`` (the schedule's
            ``PipelineStage`` objects), whose order is not the looped one; the parameters of all this
            rank's stages are counted as one stage.
        ep_enabled: accepted for torchtitan's signature; expert parameters are counted from their
            placements whatever it says.
        **settings: distclip config settings, e.g. ``groups=[...]``, ``nonfinite="skip"``.

    Returns the pre-clip total norm (fp32 tensor, identical on every rank). The clipper is cached
    per model (or parameter list) and settings, as :func:`distclip.clip_grad_norm_` does.
    """
    del ep_enabled
    target = _clip_target(parameters, pp_mesh, stages)
    return distclip.clip_grad_norm_(target, max_norm, norm_type, error_if_nonfinite, foreach,
                                    pipeline_group=pp_mesh, **settings)


def _clip_target(parameters: Any, pp_mesh: Any, stages: Iterable[Any] | None) -> Any:
    if stages is not None:
        if pp_mesh is None:
            raise UsageError("distclip clip_grad_norm_: stages= is for pipeline parallelism; pass pp_mesh too")
        return list(stages)
    if isinstance(parameters, torch.nn.Module):
        return [parameters] if pp_mesh is not None else parameters
    items = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    if items and all(isinstance(m, torch.nn.Module) for m in items):  # model_parts
        if pp_mesh is None and len(items) != 1:
            raise UsageError(f"distclip clip_grad_norm_: {len(items)} model parts without pp_mesh; torchtitan has "
                             "several model parts only under pipeline parallelism")
        return items if pp_mesh is not None else items[0]
    if pp_mesh is not None:
        return [items]  # this rank's stage(s) as one stage of bare parameters (uniform clipping: no names)
    return items
