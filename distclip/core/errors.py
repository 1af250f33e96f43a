"""distclip's error types beyond :class:`~distclip.ConfigError`: each names what was wrong and how to fix it."""

from __future__ import annotations

from .config import ConfigError


class NonFiniteGradientError(RuntimeError):
    """The global gradient norm is NaN or inf and ``nonfinite: error`` was asked for (raised on every rank)."""


class UsageError(TypeError):
    """An argument of the wrong kind (e.g. ``attach("x")``): the message says what was expected."""


class StateDictError(ConfigError):
    """A state dict that does not belong to this clipper (another version, group layout or policy kind)."""
