"""torchft: clip inside the fault-tolerant step, after ``should_commit()``, and heal the clipper with the model.

torchft's ``OptimizerWrapper.step()`` asks its ``Manager`` whether the step may be committed and only
then steps the optimizer it wraps. That is where the clip belongs:

* on averaged gradients: the Manager's all-reduce (torchft's DDP comm hook, or FSDP2's all-reduce
  hook over torchft's replica dimension) has completed by then;
* only on committed steps: a step torchft discards (an all-reduce failed, too few replicas) may
  hold corrupted gradients; clipping it would still advance an adaptive threshold, the clip
  counters, and with ``nonfinite: error`` raise on a step torchft was about to drop. Replicas then
  agree on every clip because they agree on every commit;
* after healing: a replica that joins receives the model and optimizer state inside
  ``should_commit()`` (asynchronous quorum) or at ``zero_grad()`` (synchronous quorum), in both
  cases before the wrapped optimizer steps. :func:`attach` registers the clipper's own state
  (adaptive thresholds, counters) with the Manager, so the joining replica clips with the same
  threshold as the others from its first step.

Usage (after building torchft's model, e.g. ``torchft.DistributedDataParallel(manager, model)``)::

    optimizer = torchft.OptimizerWrapper(manager, torch.optim.AdamW(model.parameters()))
    clipper = distclip.GradClipper(model, "clip.yaml")
    distclip.integrations.torchft.attach(clipper, optimizer)

``GradClipper.attach(optimizer)`` on the ``OptimizerWrapper`` itself is refused: the wrapper never runs
torch's step hooks. Never call ``clipper.clip()`` yourself before ``optimizer.step()`` under torchft
(it would clip steps torchft discards). torchft is imported only when this module's functions run.
"""

from __future__ import annotations

from typing import Any

import torch

import distclip

__all__ = ["attach"]


def attach(clipper: distclip.GradClipper, optimizer: torch.optim.Optimizer, manager: Any = None, *,
           state_key: str = "distclip", fold: bool | None = None) -> Any:
    """Clip right before torchft steps the wrapped optimizer, and heal the clipper's state with the model.

    Args:
        clipper: a :class:`distclip.GradClipper` of the torchft model (torchft's ``DistributedDataParallel``,
            or a ``fully_shard`` model whose all-reduce hook averages over torchft's replica dimension).
        optimizer: torchft's ``OptimizerWrapper`` (the clip is attached to the optimizer it wraps), or that
            wrapped optimizer itself together with ``manager``.
        manager: the ``torchft.Manager`` (default: the wrapper's).
        state_key: the key of the clipper's state among the Manager's state dicts (one per clipper).
        fold: as in :meth:`distclip.GradClipper.attach`.

    Returns:
        The attachment; ``.remove()`` stops clipping (the state stays registered with the Manager).
    """
    from torchft.optim import OptimizerWrapper

    if isinstance(optimizer, OptimizerWrapper):
        inner, manager = optimizer.optim, manager if manager is not None else optimizer.manager
    elif manager is None:
        raise distclip.UsageError(
            f"distclip.integrations.torchft.attach: got a {type(optimizer).__qualname__}, not torchft's "
            "OptimizerWrapper, and no manager: pass the OptimizerWrapper, or "
            "attach(clipper, inner_optimizer, manager=manager)")
    else:
        inner = optimizer
    try:
        manager.register_state_dict_fn(state_key, clipper.load_state_dict, clipper.state_dict)
    except AssertionError as err:  # torchft asserts that a key is registered once
        raise distclip.UsageError(
            f"distclip.integrations.torchft.attach: the Manager already holds a state under {state_key!r}; "
            "attach each clipper once, and give a second clipper its own state_key=") from err
    return clipper.attach(inner, fold=fold)
