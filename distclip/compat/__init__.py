"""The compat layer: every private name of a framework distclip reads, one module per framework.

Each module (``pytorch``, ``deepspeed``, ``accelerate``, ``lightning``, ``torchtitan``, ``olmo_core``,
``torchft``) says which version its private reads were checked on, imports its framework lazily,
and raises :class:`~distclip.UnsupportedVersionError` with the installed and the
checked version when an internal has moved. Nothing outside this package reads a private name of
torch or of a training framework.
"""
