"""``distclip.mpi``: the stable import path of :mod:`distclip.cli.mpi`; ``python -m distclip.mpi script.py`` runs it."""

import sys
from typing import TYPE_CHECKING

from .cli import mpi as _module

if TYPE_CHECKING:  # what a type checker sees here: the real module's public names (its __all__)
    from .cli.mpi import *  # noqa: F403

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
