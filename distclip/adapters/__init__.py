"""Pick the adapter for whatever the user passed: plain module or parameters, DDP, DeepSpeed engine (later FSDP)."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.nn.parallel import DistributedDataParallel

from ..names import canonical_name, named_trainable_parameters
from .base import GradAdapter
from .ddp import DDPAdapter
from .deepspeed import deepspeed_adapter, is_deepspeed_engine  # imports no DeepSpeed
from .plain import PlainAdapter

__all__ = ["GradAdapter", "PlainAdapter", "DDPAdapter", "adapter_for", "UnsupportedModelError"]


class UnsupportedModelError(TypeError):
    """distclip does not know how this object's gradients are laid out."""


def adapter_for(obj: Any) -> GradAdapter:
    """The adapter for a module (plain, DDP), a DeepSpeed engine, a parameter, or an iterable of parameters / (name, parameter)."""
    if isinstance(obj, DistributedDataParallel):
        return DDPAdapter(obj)
    if is_deepspeed_engine(obj):  # before nn.Module: an engine is one
        return deepspeed_adapter(obj)
    if isinstance(obj, torch.nn.Module):
        return PlainAdapter(list(named_trainable_parameters(obj)))
    if isinstance(obj, torch.Tensor):
        return _unnamed([obj])
    if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes, dict)):
        items = list(obj)
        if all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], torch.Tensor) for x in items):
            return PlainAdapter([(canonical_name(str(n)), p) for n, p in items])
        if all(isinstance(x, torch.Tensor) for x in items):
            return _unnamed(items)
    raise UnsupportedModelError(
        f"distclip cannot clip a {type(obj).__module__}.{type(obj).__qualname__}: pass a torch.nn.Module "
        "(plain or wrapped in DDP), a DeepSpeed engine, model.parameters(), or model.named_parameters()"
    )


def _unnamed(params: list[torch.Tensor]) -> GradAdapter:
    adapter = PlainAdapter([(f"<param {i}>", p) for i, p in enumerate(params)])
    adapter.has_names = False
    return adapter
