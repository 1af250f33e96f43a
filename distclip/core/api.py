"""Functional API, drop-in for ``torch.nn.utils.clip_grad_norm_`` but exact under any sharding."""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch

from .clipper import GradClipper

_cache: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, GradClipper]]" = weakref.WeakKeyDictionary()


def _clipper(model_or_params: Any, settings: dict[str, Any]) -> GradClipper:
    """A clipper for one call. Modules keep theirs (plans are built once); no set-up collective here."""
    settings = {"comm_hook": False, "check_consistency": False, **settings}
    if not isinstance(model_or_params, torch.nn.Module):
        return GradClipper(model_or_params, settings)
    per_model = _cache.setdefault(model_or_params, {})
    key = repr(sorted(settings.items()))
    if key not in per_model:
        per_model[key] = GradClipper(model_or_params, settings)
    return per_model[key]


def clip_grad_norm_(
    model_or_params: Any,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    **options: Any,
) -> torch.Tensor:
    """Clip gradients to the EXACT global norm and return the pre-clip norm (plain fp32 tensor).

    Same semantics as ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + 1e-6)``
    clamped to 1; a non-finite norm is applied as is unless ``error_if_nonfinite``), but the norm
    counts every gradient element exactly once across ranks for DDP (and the other supported
    wrappers), and is identical on every rank. ``options`` are :class:`ClipConfig` settings, e.g.
    ``groups=[...]`` for per-group clipping or ``nonfinite="skip"``. ``foreach`` is accepted for
    compatibility; distclip always uses foreach kernels where the device has them.
    """
    settings = {"max_norm": max_norm, "norm_type": norm_type,
                "nonfinite": "error" if error_if_nonfinite else "ignore", **options}
    return _clipper(model_or_params, settings).clip().total_norm


def global_grad_norm(model_or_params: Any, norm_type: float | str = 2.0, **options: Any) -> torch.Tensor:
    """The exact pre-clip global gradient norm (plain fp32 tensor, identical on every rank); nothing is clipped."""
    settings = {"max_norm": math.inf, "norm_type": norm_type, "nonfinite": "ignore", **options}
    return _clipper(model_or_params, settings).measure().total_norm
