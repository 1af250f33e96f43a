"""``distclip.lightning``: the stable import path of :mod:`distclip.integrations.lightning` (the same module object)."""

import sys

from .integrations import lightning as _module

sys.modules[__name__] = _module
