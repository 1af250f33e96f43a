"""Start a module on N local ranks under torchrun, as ``distclip demo`` and ``distclip bench`` do when not
launched by torchrun themselves."""

from __future__ import annotations

import sys


def torchrun_command(module: str, nproc: int, argv: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone`` running ``python -m module`` on ``nproc`` ranks with ``argv``
    (without ``--nproc``: the launcher's, which torchrun would read as its own ``--nproc-per-node``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", module, *without_nproc(argv)]


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
