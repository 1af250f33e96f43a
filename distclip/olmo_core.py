"""``distclip.olmo_core``: the stable import path of :mod:`distclip.integrations.olmo_core` (the same module object)."""

import sys

from .integrations import olmo_core as _module

sys.modules[__name__] = _module
