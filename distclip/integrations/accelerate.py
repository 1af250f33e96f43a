"""Accelerate integration: one line makes ``accelerator.clip_grad_norm_`` exact and configurable.

    accelerator = Accelerator()
    distclip.accelerate.enable(accelerator)          # config: argument, else $DISTCLIP_CONFIG, else defaults
    model, optimizer = accelerator.prepare(model, optimizer)
    ...
    accelerator.backward(loss)
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)   # exact, plain fp32, same on every rank

What ``clip_grad_norm_(params, max_norm, norm_type)`` does after ``enable``, by distributed type:

* DDP (``MULTI_CPU``, ``MULTI_GPU``, ...) and single process: a :class:`~distclip.GradClipper` on the
  prepared model (the norm computed inside DDP's reduction from the second call on).
* FSDP (v1 and v2): the same, through distclip's FSDP adapters, also when ``params`` is a SUBSET of
  the model's parameters (Accelerate itself falls back to a rank-local norm there under FSDP1).
* DeepSpeed: DeepSpeed steps inside ``accelerator.backward()``, so the clip is attached inside
  DeepSpeed's optimizer step at ``prepare`` (``distclip.deepspeed.attach``; DeepSpeed's own
  ``gradient_clipping`` is turned off) with the config's ``max_norm``; ``clip_grad_norm_`` then
  returns that step's exact pre-clip norm.

The call's ``max_norm`` replaces the config's top-level one (torch semantics: it is the default
group's threshold), and so does ``norm_type`` when given (omitted: the config's); explicit
``groups``/``per_layer`` keep their own thresholds and norm types, and ``nonfinite``/``policy``
come from the config. ``max_norm=inf`` measures without clipping anything.
``accelerate`` is imported only when this module is used.

Metrics: the config's ``log`` section writes every clip's :meth:`~distclip.ClipReport.to_metrics`
(JSONL, TensorBoard) from the main process, and :func:`log_to_trackers` sends the same keys to the
accelerator's own trackers (``accelerator.log``; wandb, TensorBoard, ... as set up by
``accelerator.init_trackers``), with ``step`` = the number of clips so far.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from typing import Any, Iterable, Mapping

import torch

from ..clipper import GradClipper
from ..compat import accelerate as accelerate_compat
from ..compat import pytorch as torch_compat
from ..compat.deepspeed import is_engine as is_deepspeed_engine
from ..core.config import ClipConfig, load_config
from ..core.names import canonical_name
from ..core.report import ClipReport
from ..core.sinks import CallbackSink, MetricsLog
from ..errors import UnsupportedModelError

__all__ = ["enable", "disable", "last_report", "log_to_trackers", "AccelerateClipping"]

DDP_TYPES = frozenset({"NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA",
                       "MULTI_XPU", "MULTI_HPU", "MULTI_NEURON"})
FSDP_MODULE = "distclip.adapters.fsdp1"  # distclip's FSDP1/FSDP2 adapters (adapter_for picks them)
# attach(engine, config) -> GradClipper, clip inside DeepSpeed's step
DEEPSPEED_MODULE = "distclip.integrations.deepspeed"


def enable(accelerator: Any, config: ClipConfig | Mapping[str, Any] | str | os.PathLike | None = None,
           **overrides: Any) -> "AccelerateClipping":
    """Make ``accelerator.clip_grad_norm_`` exact (and per-group) with distclip. Call before or after ``prepare``.

    Args:
        accelerator: an ``accelerate.Accelerator``.
        config: a :class:`ClipConfig`, dict, YAML path or preset name; None reads ``$DISTCLIP_CONFIG`` (which
            ``distclip launch`` sets from the YAML's ``distclip:`` section), else the defaults.
        **overrides: config settings that take precedence, e.g. ``nonfinite="error"``.

    Returns the :class:`AccelerateClipping` (also ``accelerator._distclip``); its ``last_report``
    is the :class:`~distclip.ClipReport` of the latest clip. Calling ``enable`` again replaces it.
    """
    disable(accelerator)
    return AccelerateClipping(accelerator, load_config(config, **overrides))


def disable(accelerator: Any) -> None:
    """Give ``accelerator`` back its own ``clip_grad_norm_`` and ``prepare``."""
    clipping = getattr(accelerator, "_distclip", None)
    if clipping is not None:
        clipping.disable()


def last_report(accelerator: Any) -> ClipReport | None:
    """The report of the latest ``accelerator.clip_grad_norm_`` (per-group norms, coefficients, skipped)."""
    clipping = getattr(accelerator, "_distclip", None)
    return None if clipping is None else clipping.last_report


def log_to_trackers(accelerator: Any, every: int | None = None) -> CallbackSink:
    """Send every ``every`` clips' metrics (:meth:`~distclip.ClipReport.to_metrics` keys) to
    ``accelerator.log`` (its trackers), from the main process. Call after :func:`enable`."""
    clipping = getattr(accelerator, "_distclip", None)
    if clipping is None:
        raise RuntimeError("distclip: call distclip.accelerate.enable(accelerator) before log_to_trackers(accelerator)")
    return clipping.log_to_trackers(every)


class AccelerateClipping:
    """distclip behind one ``Accelerator``: replaces its ``clip_grad_norm_`` and wraps its ``prepare``."""

    def __init__(self, accelerator: Any, config: ClipConfig):
        self.accelerator = accelerator
        self.config = config
        self.distributed_type = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
        self.kind = _kind(self.distributed_type)
        self.last_report: ClipReport | None = None
        self.clips = 0  # clip_grad_norm_ calls (DDP/FSDP): the step the metrics are logged at
        self.log = MetricsLog.from_config(config.log, None, info=self._log_info)  # one log for all the clippers
        self._clippers: dict[tuple[Any, ...], GradClipper] = {}
        self._hooked: set[int] = set()  # models whose reduction hook a clipper already owns
        self._deepspeed: dict[int, GradClipper] = {}  # id(engine) -> clipper attached inside its step
        self._warned_max_norm = False
        self._wrapped: list[Any] = []  # what prepare_model returned (DDP wrappers: Accelerate keeps only the module)
        self._saved = {name: accelerator.__dict__.get(name) for name in ("clip_grad_norm_", "prepare", "prepare_model")}
        self._original_prepare = accelerator.prepare
        self._original_prepare_model = accelerator.prepare_model
        accelerator.clip_grad_norm_ = self.clip_grad_norm_
        accelerator.prepare = self._prepare
        accelerator.prepare_model = self._prepare_model
        accelerator._distclip = self
        if self.kind == "deepspeed":
            self._attach_deepspeed()

    def add_sink(self, sink: Any, every: int | None = None, rank: int | None = 0) -> Any:
        """Write the clips' metrics to ``sink`` (see :meth:`GradClipper.add_sink`); rank 0 is the main process."""
        return self.log.add(sink, every=every, rank=rank)

    def log_to_trackers(self, every: int | None = None) -> CallbackSink:
        """Send the clips' metrics to ``accelerator.log`` (the trackers) every ``every`` clips."""
        return self.log.add(CallbackSink(self.accelerator.log), every=every)

    def _log_info(self) -> dict[str, Any]:
        clippers = [*self._clippers.values(), *self._deepspeed.values()]
        return clippers[-1].log_info() if clippers else {"config": self.config.to_dict()}

    def disable(self) -> None:
        self.log.close()
        for name, saved in self._saved.items():  # the class's own methods (or earlier patches) show through again
            if saved is None:
                self.accelerator.__dict__.pop(name, None)
            else:
                self.accelerator.__dict__[name] = saved
        if getattr(self.accelerator, "_distclip", None) is self:
            del self.accelerator._distclip

    # ----------------------------------------------------------------- hooks
    def _prepare(self, *args: Any, **kwargs: Any) -> Any:
        result = self._original_prepare(*args, **kwargs)
        if self.kind == "deepspeed":
            self._attach_deepspeed()
        return result

    def _prepare_model(self, *args: Any, **kwargs: Any) -> Any:
        model = self._original_prepare_model(*args, **kwargs)
        self._wrapped.append(model)
        return model

    def clip_grad_norm_(self, parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float,
                        norm_type: float | str | None = None) -> torch.Tensor:
        """Exact global norm of ``parameters``' gradients (plain fp32 tensor), clipped per the config."""
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        if self.kind == "deepspeed":
            return self._deepspeed_norm(float(max_norm))
        self.accelerator.unscale_gradients()  # fp16 AMP: clip the true gradients (a no-op otherwise)
        model, subset = self._owner(params)
        clipper = self._clipper(model, subset, float(max_norm), norm_type)
        report = clipper.measure() if math.isinf(float(max_norm)) else clipper.clip()
        self.last_report = report
        self.clips += 1
        self.log.observe(report, self.clips)
        return report.total_norm

    # -------------------------------------------------------------- DDP/FSDP
    def _owner(self, params: list[torch.Tensor]) -> tuple[Any, list[Any] | None]:
        """The prepared model holding every given parameter, and the subset (None: all its trainable ones)."""
        wanted = {id(p) for p in params}
        # Wrappers first: under DDP the wrapper knows the reduction (enable before prepare to get it);
        # Accelerate's own list holds the bare module there, the FSDP wrapper under FSDP.
        for prepared in [*reversed(self._wrapped), *accelerate_compat.prepared_models(self.accelerator)]:
            model = torch_compat.uncompiled(prepared)
            named = list(model.named_parameters())
            if not wanted <= {id(p) for _, p in named}:
                continue
            if {id(p) for _, p in named if p.requires_grad} <= wanted:
                return model, None
            return model, _subset_spec(model, named, wanted)
        if self.kind == "fsdp":
            raise UnsupportedModelError(
                "distclip: accelerator.clip_grad_norm_ was given parameters that belong to no model prepared by "
                "this Accelerator; under FSDP distclip needs the model to know how the gradients are sharded. "
                "Pass parameters of the model returned by accelerator.prepare(model)."
            )
        return None, params  # torch semantics: the given tensors' local gradients

    def _clipper(self, model: Any, subset: list[Any] | None, max_norm: float,
                 norm_type: float | str | None) -> GradClipper:
        subset_key = None if subset is None else tuple(p if isinstance(p, str) else id(p) for p in subset)
        p = self.config.norm_type if norm_type is None else float(
            ClipConfig.from_dict({"norm_type": norm_type}, source="clip_grad_norm_ norm_type").norm_type)
        owner_key = id(model) if model is not None else None
        if math.isinf(max_norm):  # measuring: any clipper of the same model, subset and p will do
            for (owner, key_subset, _, key_p), clipper in self._clippers.items():
                if (owner, key_subset, key_p) == (owner_key, subset_key, p):
                    return clipper
        key = (owner_key, subset_key, max_norm, p)
        if key not in self._clippers:
            # one reduction hook per model (DDP takes one): the first whole-model clipper may have it
            may_hook = model is not None and subset is None and id(model) not in self._hooked
            hook = self.config.comm_hook if may_hook else False
            config = self.config.replace(max_norm=max_norm, norm_type=p, comm_hook=hook, log=None)
            target = model if model is not None else subset
            self._clippers[key] = GradClipper(target, config, params=subset if model is not None else None)
            if hook is not False:
                self._hooked.add(id(model))
        return self._clippers[key]

    # -------------------------------------------------------------- DeepSpeed
    def _attach_deepspeed(self) -> None:
        engines = [m for m in accelerate_compat.prepared_models(self.accelerator) if is_deepspeed_engine(m)]
        if not engines:
            return
        attach = _require(DEEPSPEED_MODULE, "DeepSpeed").attach
        for engine in engines:
            if id(engine) not in self._deepspeed:
                clipper = attach(engine, self.config.replace(log=None))
                clipper.log = self.log  # it clips inside DeepSpeed's step: it writes this log itself
                self._deepspeed[id(engine)] = clipper

    def _deepspeed_norm(self, max_norm: float) -> torch.Tensor:
        self._attach_deepspeed()
        if not self._deepspeed:
            raise RuntimeError("distclip: under DeepSpeed, call accelerator.prepare(model, ...) before clip_grad_norm_")
        clipper = list(self._deepspeed.values())[-1]
        report = clipper.last_report
        if report is None:
            raise RuntimeError(
                "distclip: no DeepSpeed step yet. Under DeepSpeed the clip happens inside accelerator.backward() "
                "(DeepSpeed steps there); call clip_grad_norm_ after backward to read its norm."
            )
        if not (math.isinf(max_norm) or max_norm == clipper.config.max_norm or self._warned_max_norm):
            self._warned_max_norm = True
            warnings.warn(
                f"distclip: under DeepSpeed the clip runs inside accelerator.backward() with the config's "
                f"max_norm={clipper.config.max_norm}; the max_norm={max_norm} given to clip_grad_norm_ comes too late "
                "to apply. Set max_norm in the distclip config (or distclip.accelerate.enable(..., max_norm=...)).",
                stacklevel=3,
            )
        self.last_report = report
        return report.total_norm


# --------------------------------------------------------------------- helpers
def _kind(distributed_type: str) -> str:
    if distributed_type in DDP_TYPES:
        return "ddp"
    if distributed_type == "FSDP":
        _require(FSDP_MODULE, "FSDP")
        return "fsdp"
    if distributed_type == "DEEPSPEED":
        _require(DEEPSPEED_MODULE, "DeepSpeed")
        return "deepspeed"
    raise UnsupportedModelError(
        f"distclip does not support Accelerate's {distributed_type} mode; supported: DDP (NO, MULTI_CPU, "
        "MULTI_GPU, ...), FSDP (v1 and v2) and DEEPSPEED"
    )


def _require(module: str, what: str) -> Any:
    if importlib.util.find_spec(module) is None:
        raise UnsupportedModelError(
            f"distclip: this installation has no {what} support ({module} is missing), so it cannot clip "
            f"exactly under Accelerate's {what} mode; upgrade distclip"
        )
    return importlib.import_module(module)


def _subset_spec(model: Any, named: list[tuple[str, torch.Tensor]], wanted: set[int]) -> list[Any]:
    """The subset as distclip's ``params``: tensors, except FSDP1 flat parameters, given as their original names."""
    spec: list[Any] = []
    for name, p in named:
        if id(p) not in wanted or not p.requires_grad:
            continue
        fqns = torch_compat.flat_param_fqns(p)  # FSDP1 FlatParameter (use_orig_params=False): the params it holds
        if fqns is None:
            spec.append(p)
        else:
            prefix = name[: -len("_flat_param")] if name.endswith("_flat_param") else ""
            spec.extend(canonical_name(prefix + fqn) for fqn in fqns)
    return spec
