"""Which path measures the norm: inside the gradient reduction (a reduction hook) or after backward.

``comm_hook`` in the config picks it: ``true`` and ``false`` force either path, ``auto`` (the
default) decides per adapter, at set-up, from where its gradients are reduced: the backend of the
group that reduces them and the gradients' device (:class:`ReductionVenue`; the same facts on
every rank, and the decision is part of the set-up check, so ranks cannot decide differently).

Why ``auto`` uses the hook only with NCCL on CUDA: there the norm kernels run on the GPU while
backward still runs, so the clip-time work shrinks to the small slot vector. On CPU (gloo) the
hook's work runs on the same cores as backward: measured no faster than the post-backward path
(``launch/bench_ddp_hook_step.py``), while the hook keeps one limit (a write through
``tensor.data`` after backward bumps no version counter, so the hook cannot see it; see
:mod:`distclip.adapters.hooks`). Both paths count the same elements and give the same norm.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HookChoice", "ReductionVenue", "choose_hook"]

HOOK_BACKENDS = {"cuda": "nccl"}  # device type -> the backend with which auto measures inside the reduction


@dataclass(frozen=True)
class ReductionVenue:
    """Where a layout reduces its gradients: facts known at set-up, the same on every rank.

    Attributes:
        backend: the backend of the group that reduces the gradients, as ``torch.distributed.get_backend``
            names it: ``"gloo"``, ``"nccl"``, or one per device type such as ``"cpu:gloo,cuda:nccl"``.
        device: the gradients' device type (``"cpu"``, ``"cuda"``, ...).
    """

    backend: str
    device: str

    def backend_of_device(self) -> str:
        """The backend that reduces tensors of :attr:`device` (a multi-device backend string names one per type)."""
        text = self.backend.lower()
        if ":" not in text:
            return text
        per_device = dict(part.split(":", 1) for part in text.split(",") if ":" in part)
        return per_device.get(self.device.lower(), "")

    def __str__(self) -> str:
        return f"{self.backend_of_device() or self.backend} on {self.device}"


@dataclass(frozen=True)
class HookChoice:
    """Whether to measure inside the reduction, and why (recorded in the adapter's ``hook_status``)."""

    enable: bool
    reason: str
    auto: bool = False  # decided by ``comm_hook: auto`` (not forced by true / false)


def hook_pays(venue: ReductionVenue) -> bool:
    """Whether the in-reduction norm pays here: gradients reduced by NCCL on CUDA."""
    wanted = HOOK_BACKENDS.get(venue.device.lower())
    return wanted is not None and venue.backend_of_device() == wanted


def choose_hook(setting: bool | str, venue: ReductionVenue | None) -> HookChoice:
    """The path for one adapter.

    Args:
        setting: the config's ``comm_hook``: ``True``, ``False`` or ``"auto"``.
        venue: where the adapter reduces its gradients; None for a layout with no reduction hook (its
            ``enable_reduction_hook`` then says why).
    """
    if setting is False:
        return HookChoice(False, "off (comm_hook: false): measured after backward")
    if setting is True:
        return HookChoice(True, "comm_hook: true")
    if setting != "auto":
        raise ValueError(f"comm_hook must be True, False or 'auto', got {setting!r}")
    if venue is None:
        return HookChoice(True, "comm_hook: auto", auto=True)  # the layout has no hook: it says why itself
    if hook_pays(venue):
        return HookChoice(True, f"comm_hook: auto, gradients reduced by {venue}", auto=True)
    return HookChoice(False, (f"post-backward (comm_hook: auto, gradients reduced by {venue}: the in-reduction norm "
                              "pays only with NCCL on CUDA; comm_hook: true forces it)"), auto=True)
