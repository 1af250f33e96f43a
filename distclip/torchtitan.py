"""``distclip.torchtitan``: the stable import path of :mod:`distclip.integrations.torchtitan`
(the same module object)."""

import sys

from .integrations import torchtitan as _module

sys.modules[__name__] = _module
