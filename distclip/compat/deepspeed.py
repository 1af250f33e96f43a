"""Every private DeepSpeed attribute distclip reads or replaces, checked on DeepSpeed 0.19.8.

DeepSpeed has no public seam between its gradient reduction and its optimizer step, so distclip
reads its ZeRO optimizer's partition layout (public-looking attributes such as
``averaged_gradients`` behind :func:`internal`, and the private ones below) and replaces the
optimizer instance's norm-and-clip methods (:func:`replace_zero12_clip`, :func:`replace_zero3_clip`).
A DeepSpeed release that moves any of it fails here with :class:`~distclip.UnsupportedVersionError`
naming what is missing, never silently. DeepSpeed is never imported by this module: an engine
exists only when DeepSpeed is imported.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import torch

from ..errors import UnsupportedVersionError
from .pytorch import unsupported

CHECKED_ON = "0.19.8"
ENGINE_MODULE = "deepspeed.runtime.engine"

__all__ = ["CHECKED_ON", "internal", "is_engine", "config_params", "turn_off_engine_clipping", "fragment",
           "is_padding", "replace_zero12_clip", "replace_zero3_clip", "UnsupportedVersionError"]


def internal(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn an AttributeError/KeyError raised while reading DeepSpeed's internals into UnsupportedVersionError."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except (AttributeError, KeyError) as err:
                raise unsupported(what, err, "deepspeed", _installed()) from err

        return run

    return wrap


def _installed() -> str:
    module = sys.modules.get("deepspeed")
    return str(getattr(module, "__version__", "unknown"))


def is_engine(obj: Any) -> bool:
    """True for a ``DeepSpeedEngine``, without importing DeepSpeed (an engine implies it is imported)."""
    module = sys.modules.get(ENGINE_MODULE)
    return module is not None and isinstance(obj, module.DeepSpeedEngine)


def config_params(engine: Any) -> dict[str, Any]:
    """The engine's DeepSpeed config as the user wrote it (``engine._config._param_dict``); {} if unknown."""
    return getattr(getattr(engine, "_config", None), "_param_dict", None) or {}


@internal("the DeepSpeed engine's config object (engine._config.gradient_clipping)")
def turn_off_engine_clipping(engine: Any) -> None:
    """DeepSpeed's own clipping off, so that nothing clips twice (ZeRO-0 reads the engine's config,
    ZeRO 1-3 captured ``clip_grad`` at construction)."""
    engine._config.gradient_clipping = 0.0
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = 0.0


@internal("DeepSpeed's parameter -> partition mapping (param._hp_mapping)")
def fragment(param: Any) -> tuple[int, int, int] | None:
    """ZeRO-1/2: ``(start in the parameter's flat order, start in the fp32 partition, numel)`` of this rank's
    fragment of ``param``; None when this rank holds none of it."""
    mapping = param._hp_mapping
    if mapping is None:
        return None
    return mapping.lp_fragment_address.start, mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel


def is_padding(grad: torch.Tensor) -> bool:
    """Whether a reduced ZeRO-1/2 gradient piece is alignment padding DeepSpeed appended to a partition."""
    return bool(getattr(grad, "_zero_padding", False))


@internal("DeepSpeed ZeRO-1/2 optimizer methods (scaled_global_norm, unscale_and_clip_grads)")
def replace_zero12_clip(optimizer: Any, norm: Callable[[], torch.Tensor],
                        apply: Callable[[torch.Tensor, int], None]) -> None:
    """On this ZeRO-1/2 optimizer instance (never its class): ``norm()`` computes the norm DeepSpeed steps
    with, ``apply(flat, partition)`` unscales and clips each fp32 flat partition gradient in place."""
    partitions = optimizer.single_partition_of_fp32_groups
    optimizer.compute_grad_norm = True  # DeepSpeed computes (now: asks distclip for) the norm in step()
    optimizer.check_grad_overflow = False  # distclip's reduced norm decides; one collective instead of two

    def scaled_global_norm(norm_type: float = 2) -> torch.Tensor:
        return norm()

    def unscale_and_clip_grads(grad_groups_flat: list[torch.Tensor], total_norm: Any) -> None:
        for flat in grad_groups_flat:
            i = next((i for i, part in enumerate(partitions) if part.grad is flat), None)
            if i is None:
                raise RuntimeError("distclip: DeepSpeed unscaled a gradient that is not one of its fp32 partitions")
            apply(flat, i)

    optimizer.scaled_global_norm = scaled_global_norm
    optimizer.unscale_and_clip_grads = unscale_and_clip_grads


@internal("DeepSpeed ZeRO-3 optimizer methods (check_overflow, _get_norm_groups, unscale_and_clip_grads)")
def replace_zero3_clip(optimizer: Any, norm: Callable[[], torch.Tensor],
                       apply: Callable[[torch.Tensor, int], None]) -> None:
    """On this ZeRO-3 optimizer instance: DeepSpeed's separate overflow check off (distclip's reduced norm
    decides), ``norm()`` as its norm, ``apply(flat, sub_group)`` on each fp32 sub-group gradient."""
    flats = optimizer.fp32_partitioned_groups_flat

    def check_overflow(partition_gradients: bool = True) -> None:
        """distclip's reduced norm decides (one collective instead of two); DeepSpeed's check is off."""

    def get_norm_groups() -> list[torch.Tensor]:
        return [norm()]

    def unscale_and_clip_grads(sub_group_id: int, total_norm: Any) -> None:
        apply(flats[sub_group_id].grad, sub_group_id)

    optimizer.check_overflow = check_overflow
    optimizer._get_norm_groups = get_norm_groups
    optimizer.unscale_and_clip_grads = unscale_and_clip_grads
