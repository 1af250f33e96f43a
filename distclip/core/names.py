"""Canonical parameter names: the names of the user's unwrapped model, whatever wraps it."""

from __future__ import annotations

from typing import Iterator

import torch

# Name components that only wrappers add (FSDP1, activation checkpointing, torch.compile,
# Lightning/Accelerate forward wrappers). Stripped wherever they appear.
WRAPPER_COMPONENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod", "_forward_module"})
# DDP, DataParallel, DeepSpeed and Accelerate put the model under ``module``: stripped when leading.
LEADING_WRAPPER_COMPONENTS = frozenset({"module"})


def canonical_name(name: str) -> str:
    """``module._fsdp_wrapped_module.layers.0._checkpoint_wrapped_module.attn.weight`` -> ``layers.0.attn.weight``."""
    parts = [p for p in name.split(".") if p not in WRAPPER_COMPONENTS]
    while len(parts) > 1 and parts[0] in LEADING_WRAPPER_COMPONENTS:
        parts.pop(0)
    return ".".join(parts)


def named_trainable_parameters(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """Each trainable parameter once (tied weights once), with its canonical name, in module order."""
    for name, param in module.named_parameters():
        if param.requires_grad:
            yield canonical_name(name), param
