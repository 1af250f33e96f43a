"""What distclip reads of torchft (checked on torchft 0.2.0), without importing it.

distclip reads no private torchft attribute. What it relies on is torchft's *classes* and one
behaviour of each, all checked on 0.2.0:

* ``torchft.ddp.DistributedDataParallel`` (a subclass of torch's DDP) is built on a
  ``ProcessGroupDummy(0, 1)`` (``torchft/ddp.py:48``) and averages gradients through its
  ``Manager`` in its own comm hook, which waits for the all-reduce and its division by the
  number of participants before it returns (``torchft/ddp.py:63-70``,
  ``torchft/manager.py:478``). After backward every replica that took part holds the same averaged
  gradients, so the exact norm needs no collective across replicas.
* ``torchft.ddp.PureDistributedDataParallel`` starts one ``manager.allreduce(p.grad)`` per
  gradient and drops the returned work (``torchft/ddp.py:97``): nobody waits for it, so the
  gradients may still be written when a clip reads them, and the division by the number of
  participants, which torchft chains lazily onto that work, never runs (the gradients end up
  summed, not averaged). distclip refuses it.
* ``torchft.optim.OptimizerWrapper`` does not call ``torch.optim.Optimizer.__init__``, so its
  ``step()`` runs no step hooks; it steps its public ``optim`` only when its public ``manager``'s
  ``should_commit()`` is true (``torchft/optim.py:53-56``). distclip attaches to ``optim``.

The classes are looked up in ``sys.modules``: an object of a torchft class can only exist once
torchft is imported, so ``import distclip`` never imports torchft. A DDP subclass from a torchft
module that is not the one above (torchft moved it) is refused with the installed and the checked
version, instead of being mistaken for torch's DDP (whose process group it does not have).
"""

from __future__ import annotations

import sys
from typing import Any

from ..errors import UnsupportedVersionError

TESTED_TORCHFT = "0.2.0"


def _torchft_version() -> str:
    try:
        from importlib.metadata import version

        return version("torchft")
    except Exception:  # noqa: BLE001  (a source checkout without metadata)
        return "unknown"


def _class(module: str, name: str) -> type | None:
    """``module.name`` if that torchft module is already imported (never imports it)."""
    loaded = sys.modules.get(module)
    cls = getattr(loaded, name, None) if loaded is not None else None
    return cls if isinstance(cls, type) else None


def _from_torchft(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "torchft"


def moved(what: str) -> UnsupportedVersionError:
    """The error for a torchft object distclip cannot place: names the installed and the checked version."""
    return UnsupportedVersionError(
        f"distclip: {what}. distclip's torchft support is checked on torchft {TESTED_TORCHFT}; torchft "
        f"{_torchft_version()} is installed. Install torchft=={TESTED_TORCHFT}, or upgrade distclip."
    )


def is_ft_ddp(obj: Any) -> bool:
    """Whether ``obj`` is torchft's ``DistributedDataParallel`` (Manager-averaged gradients, dummy process group).

    Raises :class:`UnsupportedVersionError` for a torch DDP subclass defined in torchft that is not
    ``torchft.ddp.DistributedDataParallel``: its gradient averaging is unknown to distclip.
    """
    cls = _class("torchft.ddp", "DistributedDataParallel")
    if cls is not None and isinstance(obj, cls):
        return True
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(obj, DistributedDataParallel) and _from_torchft(obj):
        raise moved(f"{type(obj).__module__}.{type(obj).__qualname__} is a DDP subclass from torchft that is "
                    "not torchft.ddp.DistributedDataParallel, so how it averages gradients is unknown")
    return False


def is_pure_ddp(obj: Any) -> bool:
    """Whether ``obj`` is torchft's ``PureDistributedDataParallel`` (all-reduces never waited for: refused)."""
    cls = _class("torchft.ddp", "PureDistributedDataParallel")
    return cls is not None and isinstance(obj, cls)
