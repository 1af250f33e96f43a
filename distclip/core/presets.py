"""Where the clip presets shipped with distclip live, and which names they answer to.

The presets are YAML files installed with the package (``distclip/presets/*.yaml``, package data),
so that ``GradClipper(model, "demo")`` works from a wheel, with no source checkout. This module
only finds them (it imports nothing from distclip, so the config loader can use it); loading is
:func:`distclip.core.config.load_config`'s, and :mod:`distclip.presets` is the public face.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
SUFFIX = ".yaml"
# What a preset name looks like: a bare word. A string of this shape is never read as inline YAML.
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def preset_names() -> list[str]:
    """The names of the presets shipped with this installation, sorted."""
    return sorted(path.stem for path in PRESET_DIR.glob(f"*{SUFFIX}") if NAME.fullmatch(path.stem))


def preset_file(name: str) -> Path | None:
    """The file of preset ``name``, or None when there is no such preset."""
    if name not in preset_names():  # a listing, not a stat: a 300-letter word raises no ENAMETOOLONG
        return None
    return PRESET_DIR / f"{name}{SUFFIX}"


def unknown_preset(name: str) -> str:
    """For a word that names no preset: the closest preset, and all of them (to follow "no such preset")."""
    names = preset_names()
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}. Presets: {', '.join(names)} (distclip.presets.names())"


def preset_hint(path: str) -> str:
    """For a config path that does not exist but whose file name is a preset's (``configs/demo.yaml`` outside
    a checkout): how to use the shipped preset instead. Empty otherwise."""
    stem = Path(path).stem
    if Path(path).suffix in (".yaml", ".yml") and preset_file(stem) is not None:
        return f" (distclip ships this config as the preset {stem!r}: pass {stem!r} instead of the path)"
    return ""
