"""``distclip.mpi``: the stable import path of :mod:`distclip.cli.mpi`; ``python -m distclip.mpi script.py`` runs it."""

import sys

from .cli import mpi as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
