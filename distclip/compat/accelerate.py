"""Every private Accelerate attribute distclip reads, checked on Accelerate 1.16.0 (tested range 1.15-1.x)."""

from __future__ import annotations

from typing import Any

CHECKED_ON = "1.16.0"


def prepared_models(accelerator: Any) -> list[Any]:
    """The models ``accelerator.prepare`` returned, in order (``Accelerator._models``; [] before any prepare)."""
    return list(getattr(accelerator, "_models", []))
