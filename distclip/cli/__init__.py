"""The ``distclip`` command (``distclip.cli:main``), the Accelerate launcher wrapper and the mpi4py bootstrap."""

from .main import COMMANDS, main

__all__ = ["COMMANDS", "main"]
