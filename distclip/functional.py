"""Functional API, drop-in for ``torch.nn.utils.clip_grad_norm_`` but exact under any sharding."""

from __future__ import annotations

import math
import types
import warnings
import weakref
from collections import OrderedDict
from operator import attrgetter
from typing import Any

import torch

from .clipper import GradClipper
from .compat import pytorch as _compat
from .compat.pytorch import outside_compile

_MAX_CACHED = 16  # clippers kept for parameter lists (modules keep one per settings in a weak dict)
_by_module: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, tuple[tuple[Any, ...], GradClipper]]]" = (
    weakref.WeakKeyDictionary())
_by_params: "OrderedDict[tuple[Any, ...], tuple[list[weakref.ref], GradClipper]]" = OrderedDict()


def _signature(module: torch.nn.Module) -> tuple[Any, ...]:
    """Which tensors the module trains right now: changes when layers are (un)frozen or a Parameter is replaced.

    The parameters of ``module.parameters()``, found without building their names (a fraction of the cost).
    """
    params = _compat.module_parameters(module)
    return tuple(map(id, params)), tuple(map(_REQUIRES_GRAD, params))


_REQUIRES_GRAD = attrgetter("requires_grad")


def _key(settings: dict[str, Any], layout: dict[str, Any]) -> Any:
    """The cache key of a call's settings: (name, type, value) triples when every value is a plain scalar (the
    usual call: no repr per call), else their repr (lists, dicts, tensors: compared by what they hold)."""
    places = tuple(sorted((k, id(v) if k != "tied" else repr(v)) for k, v in layout.items()))
    if all(type(v) in _SCALARS and v == v for v in settings.values()):  # NaN != NaN: not a usable key
        return tuple(sorted((k, type(v), v) for k, v in settings.items())), places
    return repr(sorted(settings.items())) + repr(places)


_SCALARS = frozenset({bool, int, float, str, type(None)})


LAYOUT_KEYWORDS = ("pipeline_group", "tied", "params")  # GradClipper arguments, not config settings


def _split(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config settings, GradClipper layout arguments) from a call's keyword arguments."""
    layout = {k: options.pop(k) for k in LAYOUT_KEYWORDS if options.get(k) is not None}
    for k in LAYOUT_KEYWORDS:
        options.pop(k, None)
    return options, layout


def _clipper(model_or_params: Any, settings: dict[str, Any], layout: dict[str, Any] | None = None) -> GradClipper:
    """The clipper for this call, reused while the parameters it was built for are still the trained ones.

    Building one runs the set-up check (a collective on distributed layouts), so clippers are kept:
    per module and settings while the module trains the same tensors (a rebuild follows
    freezing, unfreezing or replacing parameters: on every rank alike), per list of parameters
    and settings while those very tensors are alive.
    """
    settings = {"comm_hook": False, **settings}
    layout = layout or {}
    key = _key(settings, layout)
    if layout.get("pipeline_group") is not None:  # this rank's stage(s): a module, a PipelineStage, or a list
        stages = model_or_params if isinstance(model_or_params, (list, tuple)) else [model_or_params]
        modules: list[Any] = [getattr(s, "submod", s) for s in stages]
        owner = modules[0] if isinstance(modules[0], torch.nn.Module) else None
        if owner is not None:
            per_model = _by_module.setdefault(owner, {})
            signature = tuple(x for m in modules for x in _signature(m))
            cached = per_model.get(key)
            if cached is None or cached[0] != signature:
                cached = per_model[key] = (signature, GradClipper(model_or_params, settings, **layout))
            return cached[1]
        if all(isinstance(s, (list, tuple)) and all(_is_tensor_or_named(x) for x in s) for s in stages):
            shape = tuple(len(s) for s in stages)  # stages given as parameter lists: kept while those tensors live
            flat = [x for s in stages for x in s]
            return _by_tensors((key, shape), flat, lambda: GradClipper(model_or_params, settings, **layout))
        return GradClipper(model_or_params, settings, **layout)
    if isinstance(model_or_params, torch.nn.Module):
        per_model = _by_module.setdefault(model_or_params, {})
        signature = _signature(model_or_params)
        cached = per_model.get(key)
        if cached is None or cached[0] != signature:
            cached = per_model[key] = (signature, GradClipper(model_or_params, settings, **layout))
        return cached[1]
    if isinstance(model_or_params, torch.Tensor):
        model_or_params = [model_or_params]
    elif isinstance(model_or_params, types.GeneratorType):
        model_or_params = list(model_or_params)
        if not model_or_params:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=4)
    else:
        if not isinstance(model_or_params, (str, bytes, dict)):
            model_or_params = list(model_or_params)
    if not isinstance(model_or_params, list) or not all(_is_tensor_or_named(x) for x in model_or_params):
        return GradClipper(model_or_params, settings, **layout)  # raises the clear error for what it is
    return _by_tensors(key, model_or_params, lambda: GradClipper(model_or_params, settings, **layout))


def _by_tensors(key: Any, items: list[Any], build: Any) -> GradClipper:
    """The clipper kept for these very tensors (or (name, tensor) pairs) and settings, built if none is."""
    tensors = [x[1] if isinstance(x, tuple) else x for x in items]
    list_key = (key, tuple(id(t) for t in tensors), tuple(x[0] for x in items if isinstance(x, tuple)),
                tuple(t.requires_grad for t in tensors))
    cached_params = _by_params.get(list_key)
    if cached_params is not None and all(ref() is t for ref, t in zip(cached_params[0], tensors)):
        _by_params.move_to_end(list_key)
        return cached_params[1]
    clipper = build()
    _by_params[list_key] = ([weakref.ref(t) for t in tensors], clipper)
    while len(_by_params) > _MAX_CACHED:
        _by_params.popitem(last=False)
    return clipper


def _is_tensor_or_named(x: Any) -> bool:
    return isinstance(x, torch.Tensor) or (isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], torch.Tensor))


@outside_compile  # builds and caches clippers, issues a collective: never traced
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
    compatibility; distclip always uses foreach kernels where the device has them. With pipeline
    parallelism pass this rank's stage(s) and ``pipeline_group=`` (and ``tied=``), as for
    :class:`GradClipper`.
    """
    options, layout = _split(dict(options))
    settings = {"max_norm": max_norm, "norm_type": norm_type,
                "nonfinite": "error" if error_if_nonfinite else "ignore", **options}
    return _clipper(model_or_params, settings, layout).clip().total_norm


@outside_compile
def global_grad_norm(model_or_params: Any, norm_type: float | str = 2.0, **options: Any) -> torch.Tensor:
    """The exact pre-clip global gradient norm (plain fp32 tensor, identical on every rank); nothing is clipped."""
    options, layout = _split(dict(options))
    settings = {"max_norm": math.inf, "norm_type": norm_type, "nonfinite": "ignore", **options}
    return _clipper(model_or_params, settings, layout).measure().total_norm
