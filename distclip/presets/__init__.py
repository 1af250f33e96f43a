"""The clip presets shipped with distclip, loadable by name from any installation (no checkout needed).

    >>> import distclip
    >>> distclip.presets.names()
    ['autoclip', 'demo', 'demo_measure', 'no_clip', 'per_layer', 'uniform', 'zclip']
    >>> clipper = distclip.GradClipper(model, "demo")          # the same as distclip.presets.load("demo")

Each preset is a YAML file in this folder (package data): ``path(name)`` gives it, to read or to
copy and edit. A string config is resolved in one order everywhere (``GradClipper``,
``load_config``, ``$DISTCLIP_CONFIG``, ``distclip demo --config``): an existing file first, then a
preset name, then inline YAML (:func:`distclip.core.config.config_from_string`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.config import ClipConfig, load_config
from ..core.presets import preset_file, preset_names, unknown_preset
from ..errors import ConfigError

__all__ = ["load", "names", "path"]


def names() -> list[str]:
    """The names of the shipped presets, sorted."""
    return preset_names()


def path(name: str) -> Path:
    """The YAML file of preset ``name``; :class:`~distclip.ConfigError` listing the presets when there is none."""
    found = preset_file(name) if isinstance(name, str) else None
    if found is None:
        raise ConfigError(f"no distclip preset is named {name!r}{unknown_preset(str(name))}")
    return found


def load(name: str, **overrides: Any) -> ClipConfig:
    """The :class:`~distclip.ClipConfig` of preset ``name``, with keyword overrides (e.g. ``max_norm=0.5``) applied."""
    return load_config(path(name), **overrides)
