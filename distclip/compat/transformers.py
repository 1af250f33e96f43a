"""What distclip reads or sets inside the Hugging Face Trainer (checked on transformers 5.24.0).

The Trainer clips through ``accelerator.clip_grad_norm_`` (where :mod:`distclip.hf_trainer` puts
distclip), except when the gradients are mixed: DTensors on different device meshes, or DTensors
beside plain tensors (a PEFT adapter attached to a model transformers sharded at load time, with some
DTensor parameters trainable too; experts on an expert mesh beside dense weights). Then
``Trainer._clip_grad_norm`` (``transformers/trainer.py:2781``) calls the Trainer's own
``_mixed_mesh_grad_norm`` instead: one 2-norm per mesh, whatever ``norm_type``, a plain tensor counted
as this rank's own, and one collective per mesh dimension. distclip would never run, and the logged
``grad_norm`` would be that one.

The Trainer takes that branch from ``_has_mixed_mesh_grads``, which it resolves once, at the first
clip, into the attribute ``_mixed_mesh_grads`` (None until then). :func:`route_mixed_grads_to_accelerator`
sets it to False, so that the Trainer calls ``accelerator.clip_grad_norm_`` on every model, and distclip
counts any mix of meshes and plain tensors exactly, in one collective. Nothing else the Trainer does
changes (it still gives each mesh its own optimizer parameter group: ``has_mixed_dtensor``).
"""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedVersionError

CHECKED_ON = "5.24.0"


def installed_version() -> str:
    import transformers

    return str(getattr(transformers, "__version__", "unknown"))


def route_mixed_grads_to_accelerator(trainer: Any) -> bool:
    """Make ``trainer`` clip mixed gradients through ``accelerator.clip_grad_norm_`` too.

    Returns whether the Trainer has the mixed-mesh branch (a Trainer without it always calls the
    accelerator: nothing to do). Raises :class:`~distclip.UnsupportedVersionError` when the branch
    exists but its cached decision is no longer the ``_mixed_mesh_grads`` attribute this was checked on.
    """
    if not callable(getattr(type(trainer), "_has_mixed_mesh_grads", None)):
        return False
    if getattr(trainer, "_mixed_mesh_grads", "absent") not in (None, True, False):
        raise UnsupportedVersionError(
            f"distclip: this {type(trainer).__name__} has _has_mixed_mesh_grads but no '_mixed_mesh_grads' "
            f"attribute (installed transformers {installed_version()}; distclip.hf_trainer was checked on "
            f"{CHECKED_ON}): with gradients on several meshes or beside plain tensors the Trainer would clip with "
            f"its own per-mesh norm and skip distclip. Install transformers=={CHECKED_ON}, or upgrade distclip")
    trainer._mixed_mesh_grads = False
    return True
