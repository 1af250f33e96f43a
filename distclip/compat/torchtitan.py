"""What distclip reads or replaces inside torchtitan (checked on torchtitan 0.3.0 with torch 2.13).

torchtitan has no clip hook: ``Trainer.train_step`` calls ``dist_utils.clip_grad_norm_(...)`` inline
(``torchtitan/trainer.py:940``, ``dist_utils`` being ``torchtitan.distributed.utils``), as do its
other trainers (flux, torchft, forge, rl). :func:`clip_routed_to` replaces that one function for the
duration of one ``train_step`` and restores it after, so the rest of ``train_step`` (gradient
accumulation, the pipeline schedule, loss and metric reduction, the optimizer and LR steps, the
metrics log of the returned norm) stays torchtitan's own code. :func:`check_clip_call` verifies, once,
that the trainer's ``train_step`` still reaches the clip through that name with the signature this
was checked on; :func:`checkpoint_states` is the checkpoint manager's ``states`` dict, where the
clipper's state is added next to ``train_state``; :func:`pipeline_stages` reads the ``PipelineStage``
objects torchtitan's schedule runs (torch's private ``_stages`` / ``_stage``), whose ``stage_index``
says which stages this rank holds.

Each raises :class:`~distclip.UnsupportedVersionError` naming the installed and the
checked torchtitan versions when what it reads has moved.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import UnsupportedVersionError

CHECKED_ON = "0.3.0"
CLIP_PARAMETERS = ("parameters", "max_norm", "norm_type", "error_if_nonfinite", "foreach", "pp_mesh", "ep_enabled")


def installed_version() -> str:
    import torchtitan

    return str(getattr(torchtitan, "__version__", "unknown"))


def unsupported(what: str) -> UnsupportedVersionError:
    """The one message for a torchtitan internal that is not where distclip expects it (install advice only
    when another torchtitan than the checked one is installed)."""
    installed = installed_version()
    if installed == CHECKED_ON:
        advice = ("This is the version distclip was checked on, so the trainer is one distclip does not handle "
                  "(e.g. a subclass with its own train_step): call distclip.integrations.torchtitan.clip_grad_norm_ "
                  "from that train_step instead, or report it")
    else:
        advice = (f"Install torchtitan=={CHECKED_ON}, or upgrade distclip; meanwhile "
                  "distclip.integrations.torchtitan.clip_grad_norm_ can be called from your own train_step")
    return UnsupportedVersionError(
        f"distclip: {what} (installed torchtitan {installed}; distclip's torchtitan integration was checked on "
        f"torchtitan {CHECKED_ON}). {advice}.")


def dist_utils() -> Any:
    """``torchtitan.distributed.utils``: the module whose ``clip_grad_norm_`` the trainers call."""
    return importlib.import_module("torchtitan.distributed.utils")


def check_clip_call(train_step: Callable[..., Any]) -> None:
    """Raise unless ``train_step`` calls ``dist_utils.clip_grad_norm_`` with torchtitan 0.3.0's signature."""
    code = getattr(train_step, "__code__", None)
    names = code.co_names if code is not None else ()
    if "dist_utils" not in names or "clip_grad_norm_" not in names:
        raise unsupported(f"{getattr(train_step, '__qualname__', train_step)} no longer calls "
                          "dist_utils.clip_grad_norm_, the call distclip replaces")
    module = train_step.__globals__.get("dist_utils")
    if module is not dist_utils():
        raise unsupported(f"'dist_utils' in {train_step.__module__} is {module!r}, not torchtitan.distributed.utils")
    clip = getattr(module, "clip_grad_norm_", None)
    try:
        parameters = tuple(inspect.signature(clip).parameters) if callable(clip) else ()
    except (TypeError, ValueError):
        parameters = ()
    if parameters != CLIP_PARAMETERS:
        raise unsupported(f"torchtitan.distributed.utils.clip_grad_norm_ takes {parameters}, not {CLIP_PARAMETERS}")


@contextlib.contextmanager
def clip_routed_to(clip: Callable[..., Any]) -> Iterator[None]:
    """Within the block, ``torchtitan.distributed.utils.clip_grad_norm_`` is ``clip``; restored on exit (also
    on an exception). Scoped to one ``train_step`` on the training thread; torchtitan calls nothing else
    through that name during it."""
    module = dist_utils()
    original = module.clip_grad_norm_
    module.clip_grad_norm_ = clip
    try:
        yield
    finally:
        module.clip_grad_norm_ = original


def checkpoint_states(checkpointer: Any) -> dict[str, Any] | None:
    """The dict of Stateful objects torchtitan's checkpoint manager saves and loads (``states``: the
    ``{"train_state": trainer}`` it was built with, plus model, optimizer, lr_scheduler, dataloader), or None
    when checkpointing is off (the manager then has no ``states``)."""
    if checkpointer is None or not getattr(checkpointer, "enable", False):
        return None
    states = getattr(checkpointer, "states", None)
    if not isinstance(states, dict) or "train_state" not in states:
        raise unsupported(f"the checkpoint manager {type(checkpointer).__name__} has no 'states' dict holding "
                          "'train_state' (torchtitan 0.3.0's CheckpointManager does)")
    return states


def pipeline_stages(schedule: Any) -> list[Any]:
    """The ``PipelineStage`` objects a torchtitan pipeline schedule runs on this rank (stage order)."""
    stages = getattr(schedule, "_stages", None)
    if stages is None and getattr(schedule, "_stage", None) is not None:
        stages = [schedule._stage]
    if not stages or not all(hasattr(s, "submod") and hasattr(s, "stage_index") for s in stages):
        raise unsupported(f"the pipeline schedule {type(schedule).__name__} holds no '_stages' / '_stage' with "
                          "'submod' and 'stage_index' (torch.distributed.pipelining's schedules do in torch 2.13)")
    return list(stages)
