"""``distclip.hf_trainer``: the stable import path of :mod:`distclip.integrations.hf_trainer`
(the same module object)."""

import sys
from typing import TYPE_CHECKING

from .integrations import hf_trainer as _module

if TYPE_CHECKING:  # what a type checker sees here: the real module's public names (its __all__)
    from .integrations.hf_trainer import *  # noqa: F403

sys.modules[__name__] = _module
