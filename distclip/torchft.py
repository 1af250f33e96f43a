"""``distclip.torchft``: the stable import path of :mod:`distclip.integrations.torchft` (the same module object)."""

import sys

from .integrations import torchft as _module

sys.modules[__name__] = _module
