"""Threshold policies: from the exact, reduced group norms to one threshold and coefficient per group.

One module per policy (``fixed``, ``zclip``, ``autoclip``, ``adagc``, ``agc``), the spike detector
(``skip_spikes``) and :class:`PolicySet`, which holds the policies of all groups. The contract
is in :mod:`.base`. Policies see only reduced norms (identical on every rank), so their state
stays identical on every rank with no extra communication; they run on device, never syncing.
"""

from __future__ import annotations

from typing import Sequence

from ..config import ClipConfig, FixedPolicySpec, PolicySpec
from ..groups import ClipGroup
from .adagc import AdaGCPolicy
from .agc import AGCPolicy
from .autoclip import AutoClipPolicy
from .base import EPS, ClipPolicy, Stateful, clip_coefficients
from .fixed import FixedPolicy
from .policyset import PolicySet
from .spikes import SpikeDetector
from .zclip import ZClipPolicy

POLICIES: dict[str, type[ClipPolicy]] = {
    cls.kind: cls for cls in (FixedPolicy, ZClipPolicy, AutoClipPolicy, AdaGCPolicy, AGCPolicy)
}

__all__ = [
    "EPS", "POLICIES", "AGCPolicy", "AdaGCPolicy", "AutoClipPolicy", "ClipPolicy", "FixedPolicy", "PolicySet",
    "SpikeDetector", "Stateful", "ZClipPolicy", "build_policies", "build_policy", "build_spike_detector",
    "clip_coefficients",
]


def build_policy(spec: PolicySpec, groups: Sequence[ClipGroup]) -> ClipPolicy:
    """The policy of ``spec.kind`` over ``groups``."""
    cls = POLICIES.get(getattr(spec, "kind", ""))
    if cls is None:
        raise TypeError(f"no policy implementation for {spec!r}")
    return cls(spec, groups)


def policy_scope(config: ClipConfig, group: ClipGroup) -> tuple[str, PolicySpec]:
    """Which config section's ``policy`` governs ``group``: its own (explicit group), ``per_layer``'s
    (per-layer groups), else the top-level one. The hidden group of a clipped subset and measured-only groups
    (``max_norm: null``) are never clipped: the fixed policy, at threshold inf, whatever the top-level policy."""
    if group.origin == "excluded":
        return "excluded", FixedPolicySpec()
    if not group.clipped:
        return "measured", FixedPolicySpec()
    if group.origin == "groups":
        own = next((g.policy for g in config.groups if g.name == group.name), None)
        if own is not None:
            return f"groups.{group.name}", own
    if group.origin == "per_layer" and config.per_layer is not None and config.per_layer.policy is not None:
        return "per_layer", config.per_layer.policy
    return "policy", config.policy


def build_policies(config: ClipConfig, groups: Sequence[ClipGroup]) -> PolicySet:
    """One policy per config section that sets one, over the groups it governs (see :func:`policy_scope`).

    Fixed groups share one stateless :class:`FixedPolicy` whatever their section.
    """
    scopes: dict[str, tuple[PolicySpec, list[int]]] = {}
    for i, group in enumerate(groups):
        scope, spec = policy_scope(config, group)
        if spec.kind == "fixed":
            scope, spec = "fixed", FixedPolicySpec()
        scopes.setdefault(scope, (spec, []))[1].append(i)
    members = [(build_policy(spec, [groups[i] for i in ix]), ix) for spec, ix in scopes.values()]
    return PolicySet(groups, members)


def build_spike_detector(config: ClipConfig) -> SpikeDetector | None:
    """The ``skip_spikes`` detector, or None when the config has none."""
    return SpikeDetector(config.skip_spikes) if config.skip_spikes is not None else None
