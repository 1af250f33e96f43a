"""``distclip.accelerate``: the stable import path of :mod:`distclip.integrations.accelerate`
(the same module object)."""

import sys
from typing import TYPE_CHECKING

from .integrations import accelerate as _module

if TYPE_CHECKING:  # what a type checker sees here: the real module's public names (its __all__)
    from .integrations.accelerate import *  # noqa: F403

sys.modules[__name__] = _module
