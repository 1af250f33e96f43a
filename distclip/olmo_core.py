"""``distclip.olmo_core``: the stable import path of :mod:`distclip.integrations.olmo_core` (the same module object)."""

import sys
from typing import TYPE_CHECKING

from .integrations import olmo_core as _module

if TYPE_CHECKING:  # what a type checker sees here: the real module's public names (its __all__)
    from .integrations.olmo_core import *  # noqa: F403

sys.modules[__name__] = _module
