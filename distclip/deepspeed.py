"""``distclip.deepspeed``: the stable import path of :mod:`distclip.integrations.deepspeed` (the same module object)."""

import sys

from .integrations import deepspeed as _module

sys.modules[__name__] = _module
