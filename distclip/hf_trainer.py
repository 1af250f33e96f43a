"""``distclip.hf_trainer``: the stable import path of :mod:`distclip.integrations.hf_trainer`
(the same module object)."""

import sys

from .integrations import hf_trainer as _module

sys.modules[__name__] = _module
