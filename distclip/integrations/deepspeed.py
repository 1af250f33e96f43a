"""DeepSpeed integration: exact clipping inside ``engine.step()`` for ZeRO stages 0, 1, 2 and 3.

One call after ``deepspeed.initialize``::

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    clipper = distclip.deepspeed.attach(engine, {"max_norm": 1.0, "groups": [...]})
    for batch in loader:
        engine.backward(engine(batch))
        engine.step()                       # distclip measures and clips in here
        clipper.last_report                 # ClipReport of the last optimizer step
        engine.get_global_grad_norm()       # distclip's exact pre-clip norm (also at ZeRO-0)

DeepSpeed's own ``gradient_clipping`` (1.0 by default) is turned off, so nothing clips twice.
DeepSpeed is imported only when this module's functions run; ``import distclip`` never imports it.

How it hooks in: DeepSpeed has no public seam between its gradient reduction and its step, so
:func:`attach` replaces the norm-and-clip methods of this engine's ZeRO optimizer *instance*
(:mod:`distclip.compat.deepspeed`, checked on DeepSpeed 0.19.8; ZeRO-0: a step pre-hook of the
torch optimizer). There distclip runs its clip (the layout's counting:
:mod:`distclip.adapters.zero`), tells DeepSpeed to skip through its own ``overflow`` flag, and
multiplies the coefficients into the fp32 partitions DeepSpeed hands over.
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from typing import Any, Mapping

import torch

from ..adapters.zero import DeepSpeedAdapter, Zero0Adapter, Zero3Adapter, deepspeed_adapter
from ..clipper import GradClipper
from ..compat import deepspeed as ds_compat
from ..core.config import ClipConfig, load_config
from ..core.reduce import share_setup_failure
from ..errors import UnsupportedDeepSpeedSetup

is_deepspeed_engine = ds_compat.is_engine

__all__ = ["attach", "config_section", "build_ops", "is_deepspeed_engine", "UnsupportedDeepSpeedSetup"]

SECTION = "distclip"  # key of the distclip section in the DeepSpeed JSON config


def attach(
    engine: Any,
    config: ClipConfig | Mapping[str, Any] | str | os.PathLike | None = None,
    **overrides: Any,
) -> GradClipper:
    """Make ``engine.step()`` clip with distclip's exact global (and per-group) norm; return the clipper.

    Call once on every rank, after ``deepspeed.initialize`` (under Accelerate: after
    ``accelerator.prepare``, on ``accelerator.deepspeed_engine_wrapped.engine``).

    Args:
        engine: a ``DeepSpeedEngine`` (ZeRO 0 in fp32; ZeRO 1, 2, 3 in fp32, bf16 or fp16; models with
            ``deepspeed.moe.layer.MoE`` layers at ZeRO 0-2, each expert counted once over the job).
        config: a :class:`ClipConfig`, dict, YAML path or preset name. When None: the ``distclip`` section of the
            DeepSpeed config if it has one, else ``$DISTCLIP_CONFIG``, else the defaults.
        **overrides: settings that take precedence, e.g. ``max_norm=0.5``.

    Returns:
        The :class:`GradClipper`; ``clipper.last_report`` is the :class:`ClipReport` of the last step.

    Effects on the engine: DeepSpeed's ``gradient_clipping`` is set to 0 (a warning says so when
    the DeepSpeed config set it); ``engine.get_global_grad_norm()`` returns distclip's pre-clip
    norm; a non-finite norm with ``nonfinite: skip`` skips the step the DeepSpeed way (no update,
    ``engine.skipped_steps`` + 1, fp16 loss scale backs off, no LR scheduler step). With fp16,
    a non-finite norm is always a skip (the dynamic loss scaler relies on it).
    """
    if not is_deepspeed_engine(engine):
        raise TypeError(f"distclip.deepspeed.attach expects a DeepSpeedEngine, got {type(engine).__qualname__}")
    if engine in _ATTACHED:
        raise RuntimeError("distclip is already attached to this DeepSpeed engine (attach once, after initialize)")
    try:
        clip_config = resolve_config(engine, config, **overrides)
    except Exception as err:  # invalid on some ranks only: the others raise too instead of waiting in the set-up
        share_setup_failure(deepspeed_adapter(engine).reduce_group, err)
        raise
    _warn_about_deepspeed_clipping(engine, clip_config)
    clipper = GradClipper(engine, clip_config)
    adapter = clipper.adapter
    assert isinstance(adapter, DeepSpeedAdapter)
    _take_over_the_clip(engine, clipper, adapter)
    _ATTACHED[engine] = clipper
    return clipper


_ATTACHED: "weakref.WeakKeyDictionary[Any, GradClipper]" = weakref.WeakKeyDictionary()


def _take_over_the_clip(engine: Any, clipper: GradClipper, adapter: DeepSpeedAdapter) -> None:
    """DeepSpeed's clipping off; distclip's clip where DeepSpeed computes its norm; distclip's norm as the engine's."""
    ds_compat.turn_off_engine_clipping(engine)
    adapter.attached = True
    optimizer = engine.optimizer

    def global_grad_norm() -> torch.Tensor | None:
        """Replaces ``engine.get_global_grad_norm``: distclip's pre-clip global norm of the last step (fp32)."""
        return None if clipper.last_report is None else clipper.last_report.total_norm

    engine.get_global_grad_norm = global_grad_norm
    if isinstance(adapter, Zero0Adapter):  # a torch optimizer: clip in its step pre-hook
        def clip_before_step(_optimizer: Any, _args: Any, _kwargs: Any) -> None:
            optimizer.overflow = clipper.clip().skipped  # the engine then counts a skipped step, no LR step

        optimizer.overflow = False
        optimizer.register_step_pre_hook(clip_before_step)
        return

    def clip_inside_step() -> torch.Tensor:
        """distclip's clip; plans the coefficients, or tells DeepSpeed to skip. Returns the scaled norm DeepSpeed
        expects."""
        scale = adapter.grad_scale()
        report = clipper.clip()
        if report.skipped:
            adapter.plan(None, scale, zero=False)
            optimizer.overflow = True  # DeepSpeed's own skip: no update, scaler backs off, step counted as skipped
            return torch.tensor(math.inf)
        adapter.plan(report, scale, zero=clipper.config.nonfinite_action == "zero" and not bool(report.finite))
        # DeepSpeed skips on a non-finite value; here distclip decided not to skip (nonfinite: zero / ignore)
        return torch.nan_to_num(report.total_norm * scale, nan=0.0, posinf=0.0, neginf=0.0)

    replace = ds_compat.replace_zero3_clip if isinstance(adapter, Zero3Adapter) else ds_compat.replace_zero12_clip
    replace(optimizer, clip_inside_step, adapter.apply_to_partition)


def config_section(engine: Any) -> Mapping[str, Any] | None:
    """The ``distclip`` section of the engine's DeepSpeed config (DeepSpeed ignores unknown top-level keys)."""
    return ds_compat.config_params(engine).get(SECTION)


def resolve_config(engine: Any, config: Any = None, **overrides: Any) -> ClipConfig:
    """The config to clip with: ``config``, else the DeepSpeed JSON section, else ``$DISTCLIP_CONFIG``, else
    defaults."""
    section = config_section(engine)
    if config is None and section is not None:
        config = ClipConfig.from_dict(section, source=f"DeepSpeed config '{SECTION}' section")
    elif config is not None and section is not None:
        _warn_rank0(
            f"distclip: both a config argument and a '{SECTION}' section in the DeepSpeed config were given; "
            "the argument is used and the section ignored"
        )
    resolved = load_config(config, **overrides)
    if engine.fp16_enabled() and resolved.nonfinite_action != "skip":
        _warn_rank0(
            f"distclip: nonfinite={resolved.nonfinite_action!r} is replaced by 'skip' under DeepSpeed fp16: a "
            "non-finite norm there is a loss-scale overflow, and the dynamic loss scaler needs the step skipped"
        )
        limit = resolved.nonfinite_limit
        resolved = resolved.replace(nonfinite={"action": "skip", "max_consecutive": limit} if limit else "skip")
    return resolved


def build_ops(names: tuple[str, ...] = ("ShareMemCommBuilder",)) -> list[str]:
    """Build (or load from ``~/.cache/torch_extensions``) the DeepSpeed ops a CPU run needs, in this process.

    DeepSpeed JIT-compiles ``deepspeed_shm_comm`` on the first ``deepspeed.initialize`` of a machine
    (about a minute on 2 cores). Run this once before starting ranks, e.g. in CI:
    ``python -c "import distclip.deepspeed as d; d.build_ops()"``, so ranks only load it.
    """
    from deepspeed.accelerator import get_accelerator

    built = []
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is not None and builder.is_compatible():
            builder.load(verbose=False)
            built.append(builder.NAME)
    return built


def _warn_about_deepspeed_clipping(engine: Any, config: ClipConfig) -> None:
    value = ds_compat.config_params(engine).get("gradient_clipping")
    if value not in (None, 0, 0.0):
        _warn_rank0(
            f"distclip: DeepSpeed's gradient_clipping={value} (from the DeepSpeed config) is turned off; distclip "
            f"clips instead, with its own thresholds (max_norm={config.max_norm}, norm_type={config.norm_type}"
            + (f", {len(config.groups)} groups" if config.groups else "")
            + "). Set max_norm in the distclip config, and drop gradient_clipping from the DeepSpeed config."
        )


def _warn_rank0(message: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        warnings.warn(message, stacklevel=3)
