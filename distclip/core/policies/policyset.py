"""PolicySet: the policies of all G groups behind the one policy contract."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..config import ConfigError
from ..groups import ClipGroup
from .base import ClipPolicy


class PolicySet:
    """Each policy over its group indices; ``coefficients`` / ``update`` / ``state_dict`` over all G groups.

    Index tensors are cached per device; a policy that covers every group in order is called
    on the norms as they are (no gather, no scatter).
    """

    kind = "policy_set"
    version = 1

    def __init__(self, groups: Sequence[ClipGroup], members: Sequence[tuple[ClipPolicy, Sequence[int]]]):
        self.groups = tuple(groups)
        self.names = [g.name for g in self.groups]
        covered = sorted(i for _, indices in members for i in indices)
        if covered != list(range(len(self.groups))):
            raise ValueError(f"PolicySet: every group must be covered by exactly one policy, got indices {covered}")
        self.members = [(policy, list(indices)) for policy, indices in members]
        self._whole = len(self.members) == 1 and self.members[0][1] == list(range(len(self.groups)))
        self.learns = any(policy.learns for policy, _ in self.members)  # False: update is a no-op
        self._index: dict[torch.device, list[torch.Tensor]] = {}

    @property
    def policies(self) -> list[ClipPolicy]:
        return [policy for policy, _ in self.members]

    def _indices(self, device: torch.device) -> list[torch.Tensor]:
        if device not in self._index:
            self._index[device] = [torch.tensor(ix, dtype=torch.long, device=device) for _, ix in self.members]
        return self._index[device]

    def coefficients(self, group_norms: torch.Tensor, total_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(thresholds, coefficients), float64 [G], each group's from its own policy."""
        if self._whole:
            return self.members[0][0].coefficients(group_norms, total_norm)
        thresholds = torch.empty(len(self.groups), dtype=torch.float64, device=group_norms.device)
        coefs = torch.empty_like(thresholds)
        for (policy, _), index in zip(self.members, self._indices(group_norms.device)):
            t, c = policy.coefficients(group_norms.index_select(0, index), total_norm)
            thresholds.index_copy_(0, index, t)
            coefs.index_copy_(0, index, c)
        return thresholds, coefs

    def update(
        self, group_norms: torch.Tensor, total_norm: torch.Tensor, coefs: torch.Tensor, accepted: torch.Tensor
    ) -> None:
        """Each policy learns from its groups; a step with a non-finite norm in ANY group teaches none of them."""
        if not self.learns:  # stateless policies only (fixed, agc): nothing to compute
            return
        accepted = accepted.to(group_norms.device) & torch.isfinite(group_norms).all() & torch.isfinite(total_norm)
        if self._whole:
            self.members[0][0].update(group_norms, total_norm, coefs, accepted)
            return
        for (policy, _), index in zip(self.members, self._indices(group_norms.device)):
            policy.update(group_norms.index_select(0, index), total_norm, coefs.index_select(0, index), accepted)

    def state_dict(self) -> dict[str, Any]:
        """Each policy's state, keyed by the name of the first group it covers (with all its group names)."""
        return {
            "kind": self.kind,
            "version": self.version,
            "groups": list(self.names),
            "policies": {self.names[ix[0]]: {"groups": [self.names[i] for i in ix], **policy.state_dict()}
                         for policy, ix in self.members},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """All or nothing: every policy's state is checked before any is loaded."""
        if not isinstance(state, Mapping) or state.get("kind") != self.kind:
            raise ConfigError(
                "distclip policy state: expected the state_dict() of a PolicySet (kind 'policy_set'), got "
                f"{state.get('kind') if isinstance(state, Mapping) else type(state).__name__!r}"
            )
        if state.get("version") != self.version:
            raise ConfigError(
                f"distclip policy state: saved with version {state.get('version')!r}, this distclip reads "
                f"{self.version}"
            )
        if list(state.get("groups", [])) != self.names:
            raise ConfigError(
                f"distclip policy state: saved for groups {state.get('groups')} but this clipper has {self.names}; "
                "load it into a clipper built with the same config and model"
            )
        saved = state.get("policies", {})
        expected = {self.names[ix[0]]: [self.names[i] for i in ix] for _, ix in self.members}
        layout = {key: list(entry.get("groups", [])) for key, entry in saved.items()}
        if layout != expected:
            raise ConfigError(
                f"distclip policy state: the saved policies cover the groups {layout}, this config's cover {expected}; "
                "the policy layout (top-level, per-group and per_layer policies) must be the same to resume"
            )
        checked = [policy._checked(saved[self.names[ix[0]]]) for policy, ix in self.members]
        for (policy, _), tensors in zip(self.members, checked):
            policy._install(tensors)
