"""distclip's version: the one place it is written (pyproject.toml reads it, ``distclip.__version__`` is it).

Kept in a module of its own, importing nothing, so that the build reads it without importing torch.
"""

__version__ = "0.1.0"
