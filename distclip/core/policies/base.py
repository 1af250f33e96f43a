"""The policy contract: from the exact, reduced norms of some groups to their thresholds and coefficients.

A policy sees only reduced values (the same on every rank), so its state is the same on every
rank with no extra communication. Everything on the per-step path stays on the device: no
``.item()``, no ``.tolist()``, no Python ``if`` on a tensor; a step that must not count is masked
with ``torch.where``. State is a few fixed-size tensors (ring buffers, never growing lists).
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import torch

from ..config import ConfigError
from ..groups import ClipGroup

EPS = 1e-6  # torch's: coefficient = min(1, threshold / (norm + 1e-6))


def clip_coefficients(thresholds: torch.Tensor | float, norms: torch.Tensor) -> torch.Tensor:
    """torch's coefficient: ``min(1, threshold / (norm + 1e-6))`` (a clamp, not an ``if``: no sync)."""
    return torch.clamp(thresholds / (norms + EPS), max=1.0)


class Stateful:
    """Device-resident state with a checked ``state_dict`` (base of policies and the spike detector).

    ``self._state`` holds the tensors a checkpoint must carry, ``self._const`` per-group constants
    derived from the config; both move to the norms' device on first use (and after a load).
    """

    kind: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def __init__(
        self, num_groups: int | None, state: dict[str, torch.Tensor], const: dict[str, torch.Tensor] | None = None
    ):
        self.num_groups = num_groups
        self._state = state
        self._const = const or {}
        self._device: torch.device | None = None

    def _on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The state on ``device`` (moved once, when the device changes; no sync)."""
        if device != self._device:
            self._state = {k: v.to(device) for k, v in self._state.items()}
            self._const = {k: v.to(device) for k, v in self._const.items()}
            self._device = device
        return self._state

    def _commit(self, ok: torch.Tensor, **new: torch.Tensor) -> None:
        """Replace state entries where ``ok`` (a bool tensor broadcast to each entry) holds; elsewhere the
        old bits stay exactly as they were."""
        for key, value in new.items():
            self._state[key] = torch.where(ok, value, self._state[key])

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors (copies) and numbers, with ``kind``, ``version`` and (per-group state) ``num_groups``."""
        header = {"kind": self.kind, "version": self.version}
        if self.num_groups is not None:
            header["num_groups"] = self.num_groups
        return {**header, **{k: v.detach().clone() for k, v in self._state.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict` of the same kind, version, group count and sizes (else ConfigError)."""
        self._install(self._checked(state))

    def _install(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take checked state tensors; they move to the norms' device on the next call."""
        self._state, self._device = tensors, None

    def _checked(self, state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The tensors of ``state``, after checking it fits this object; raises ConfigError naming the mismatch."""
        what = f"distclip {self.kind} state"
        if not isinstance(state, Mapping):
            raise ConfigError(f"{what}: expected a mapping from state_dict(), got {type(state).__name__}")
        if state.get("kind") != self.kind:
            raise ConfigError(
                f"{what}: the saved state is of kind {state.get('kind')!r}, not {self.kind!r}; load it into "
                f"a clipper configured with policy kind {state.get('kind')!r}, or start this policy afresh"
            )
        if state.get("version") != self.version:
            raise ConfigError(
                f"{what}: saved with version {state.get('version')!r}, this distclip reads version {self.version}"
            )
        if self.num_groups is not None and state.get("num_groups") != self.num_groups:
            raise ConfigError(
                f"{what}: saved for {state.get('num_groups')!r} groups but this policy covers {self.num_groups}; "
                "load it into a clipper built with the same config and model"
            )
        loaded = {}
        for key, current in self._state.items():
            value = state.get(key)
            if not isinstance(value, torch.Tensor):
                raise ConfigError(f"{what}: entry {key!r} is missing or not a tensor (got {type(value).__name__})")
            if value.shape != current.shape or value.dtype != current.dtype:
                raise ConfigError(
                    f"{what}: {key!r} has shape {tuple(value.shape)} / {value.dtype}, expected "
                    f"{tuple(current.shape)} / {current.dtype}: it was saved with other settings "
                    "(e.g. another history_length or window)"
                )
            loaded[key] = value.detach().clone()
        return loaded


class ClipPolicy(Stateful):
    """A threshold policy over some clip groups.

    Contract (every method runs on the device, without host synchronisation):

    ``__init__(spec, groups)``: ``spec`` is the policy's config section, ``groups`` the
    :class:`ClipGroup` objects it covers, in order (their ``max_norm`` and ``name``).

    ``coefficients(group_norms, total_norm) -> (thresholds, coefficients)``: float64 ``[G]`` on
    ``group_norms.device``. ``group_norms``: the exact reduced pre-clip norm of each covered group
    (identical on every rank); ``total_norm``: the global norm (0-dim). Coefficients follow
    torch: ``min(1, threshold / (norm + 1e-6))``; the coefficients are what gets applied, the
    thresholds are what gets reported.

    ``update(group_norms, total_norm, coefs, accepted)``: learn from this step after clipping.
    ``coefs`` are the coefficients applied; ``accepted`` is a 0-dim bool tensor, False when the
    step was non-finite or skipped: the state then stays bitwise unchanged. A non-finite norm
    never enters the state, whatever ``accepted`` says.

    ``state_dict()`` / ``load_state_dict(state)``: plain tensors and numbers with ``kind`` and
    ``version``; loading another kind, version or group count raises :class:`ConfigError`.
    """

    learns = True  # False: ``update`` does nothing (stateless policies), so the clipper need not prepare its inputs

    def __init__(self, spec: Any, groups: Sequence[ClipGroup], state: dict[str, torch.Tensor] | None = None,
                 const: dict[str, torch.Tensor] | None = None):
        self.spec = spec
        self.groups = tuple(groups)
        if not self.groups:
            raise ConfigError(f"distclip {self.kind} policy: it covers no group")
        max_norms = torch.tensor([g.max_norm for g in self.groups], dtype=torch.float64)
        super().__init__(len(self.groups), state or {}, {"max_norm": max_norms, **(const or {})})

    def coefficients(self, group_norms: torch.Tensor, total_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def update(
        self, group_norms: torch.Tensor, total_norm: torch.Tensor, coefs: torch.Tensor, accepted: torch.Tensor
    ) -> None:
        raise NotImplementedError

    def thresholds(self, group_norms: torch.Tensor) -> torch.Tensor:
        """Transitional, for callers that predate :meth:`coefficients`: the thresholds alone."""
        return self.coefficients(group_norms, torch.linalg.vector_norm(group_norms))[0]

    def _usable(self, group_norms: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
        """0-dim bool: the step may enter the state (accepted, and every covered norm finite)."""
        return accepted.to(group_norms.device) & torch.isfinite(group_norms).all()
