"""Raising :class:`~distclip.MissingExtraError` for optional packages; the error types live in
:mod:`distclip.errors`."""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import ClipAuditError, ConfigError, MissingExtraError, NonFiniteGradientError, StateDictError, UsageError  # noqa: F401


def require_extra(module: str, extra: str, feature: str) -> Any:
    """Import ``module`` for ``feature``, or raise :class:`MissingExtraError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"distclip: {feature} needs the {module.split('.')[0]!r} package, which is not installed "
            f"({err}). Install the extra: pip install 'distclip[{extra}]'"
        ) from None
