"""Counting host round trips made from distclip's own code (tensors built from host data, device reads)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from typing import Iterator

import torch

import distclip
from tests.helpers.checks import cpu_kernel_flag_read

PACKAGE = os.path.dirname(distclip.__file__)
BUILDERS = {"torch.tensor": (torch, "tensor"), "torch.as_tensor": (torch, "as_tensor")}
SYNCS = {f"Tensor.{m}": (torch.Tensor, m) for m in ("item", "tolist", "__bool__", "__float__")}


@contextlib.contextmanager
def count_distclip_calls() -> Iterator[Counter]:
    """Count calls of the wrapped entry points made from distclip's own code."""
    counts: Counter = Counter()
    originals = {}

    def wrap(label: str, fn):
        def counted(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PACKAGE) and not cpu_kernel_flag_read(caller, args):
                counts[label] += 1
            return fn(*args, **kwargs)
        return counted

    for label, (owner, name) in {**BUILDERS, **SYNCS}.items():
        originals[label] = getattr(owner, name)
        setattr(owner, name, wrap(label, originals[label]))
    try:
        yield counts
    finally:
        for label, (owner, name) in {**BUILDERS, **SYNCS}.items():
            setattr(owner, name, originals[label])
