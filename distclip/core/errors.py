"""distclip's error types beyond :class:`~distclip.ConfigError`: each names what was wrong and how to fix it."""

from __future__ import annotations

import importlib
from typing import Any

from .config import ConfigError


class NonFiniteGradientError(RuntimeError):
    """The global gradient norm is NaN or inf and ``nonfinite: error`` was asked for (raised on every rank)."""


class UsageError(TypeError):
    """An argument of the wrong kind (e.g. ``attach("x")``): the message says what was expected."""


class StateDictError(ConfigError):
    """A state dict that does not belong to this clipper (another version, group layout or policy kind)."""


class ClipAuditError(RuntimeError):
    """The clip audit found ranks that applied different coefficients (raised on every rank, naming them)."""


class MissingExtraError(ImportError):
    """A feature needs an optional package: the message names the ``distclip[...]`` extra to install."""


def require_extra(module: str, extra: str, feature: str) -> Any:
    """Import ``module`` for ``feature``, or raise :class:`MissingExtraError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"distclip: {feature} needs the {module.split('.')[0]!r} package, which is not installed "
            f"({err}). Install the extra: pip install 'distclip[{extra}]'"
        ) from None
