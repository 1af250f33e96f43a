"""``distclip.accelerate``: the stable import path of :mod:`distclip.integrations.accelerate`
(the same module object)."""

import sys

from .integrations import accelerate as _module

sys.modules[__name__] = _module
