"""Running per-group clip counts, kept on the device: the clip rate without a host sync per step."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .errors import StateDictError


class ClipCounters:
    """How many clips scaled each group down, and (with ``streaks``) for how many clips in a row
    each group has been clipped / not clipped (the audit's stale-clipping warnings read those).

    :meth:`update` is a few tiny device ops: no host sync, no tensor built from Python values.
    Every update makes new tensors (out of place), so a :class:`ClipReport` holding the counts
    of its step keeps them.
    """

    def __init__(self, num_groups: int, streaks: bool = False):
        self.num_groups = num_groups
        self.steps = 0
        self.clipped: torch.Tensor | None = None  # int64 [G]
        self.track_streaks = streaks
        self.streaks: torch.Tensor | None = None  # int64 [2, G]: clipped in a row, not clipped in a row

    def update(self, clipped: torch.Tensor) -> None:
        """Count one clip; ``clipped`` is the bool [G] mask of the groups it scaled down."""
        if clipped.dtype != torch.bool:
            clipped = clipped.long()
        if self.clipped is None or self.clipped.device != clipped.device:
            self.clipped = (torch.zeros(clipped.shape, dtype=torch.long, device=clipped.device) if self.clipped is None
                            else self.clipped.to(clipped.device))
        self.clipped = self.clipped + clipped  # int64 + bool: int64
        if self.track_streaks:
            hits = clipped.long()
            if self.streaks is None or self.streaks.device != hits.device:
                self.streaks = torch.zeros((2, self.num_groups), dtype=torch.long, device=hits.device)
            self.streaks = (self.streaks + 1) * torch.stack([hits, 1 - hits])
        self.steps += 1

    def current(self, device: torch.device) -> torch.Tensor:
        """The clip counts so far (zeros before the first clip, allocated once)."""
        if self.clipped is None:
            self.clipped = torch.zeros(self.num_groups, dtype=torch.long, device=device)
        return self.clipped

    def state_dict(self) -> dict[str, Any]:
        clipped = (torch.zeros(self.num_groups, dtype=torch.long) if self.clipped is None
                   else self.clipped.detach().cpu())
        return {"steps": self.steps, "clipped": clipped.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (streaks start afresh: they describe recent clips, not the run)."""
        steps = state.get("steps") if isinstance(state, Mapping) else None
        clipped = state.get("clipped") if isinstance(state, Mapping) else None
        valid_steps = isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0
        valid_counts = isinstance(clipped, torch.Tensor) and clipped.shape == (self.num_groups,) \
            and clipped.dtype == torch.long
        if not (valid_steps and valid_counts):
            raise StateDictError(
                f"distclip state's 'counts' must be {{'steps': int >= 0, 'clipped': int64 tensor of {self.num_groups} "
                f"counts}} as GradClipper.state_dict() writes it; got {state!r}")
        assert isinstance(steps, int) and isinstance(clipped, torch.Tensor)  # checked just above
        device = clipped.device if self.clipped is None else self.clipped.device
        self.steps, self.clipped, self.streaks = steps, clipped.detach().clone().to(device), None


class BadStepStreaks:
    """How many bad steps in a row: non-finite steps distclip skipped or zeroed, and spike skips.

    Kept as host integers, advanced from what the decision has already read on the host (its one
    sync per clip): no extra sync, and the same numbers on every rank (the decision is taken on the
    reduced norms). A clip of the other kind, or an accepted one, ends a streak; a loss-scale
    overflow left to GradScaler / DeepSpeed (``skip_reason: overflow``) neither counts nor ends
    one (the loss scaler backs off and retries). ``nonfinite: ignore`` reads no flag: its streak stays 0.
    """

    def __init__(self, nonfinite_limit: int | None = None, spike_limit: int | None = None):
        self.nonfinite_limit = nonfinite_limit
        self.spike_limit = spike_limit
        self.nonfinite = 0
        self.spike = 0

    def advance(self, kind: str | None) -> str | None:
        """Count one clip of ``kind`` (``nonfinite``, ``spike``, ``overflow`` or None: accepted); return the kind
        whose limit the streak has just reached (``nonfinite`` / ``spike``), else None."""
        if kind == "overflow":
            return None
        self.nonfinite = self.nonfinite + 1 if kind == "nonfinite" else 0
        self.spike = self.spike + 1 if kind == "spike" else 0
        if kind == "nonfinite" and self.nonfinite_limit is not None and self.nonfinite >= self.nonfinite_limit:
            return "nonfinite"
        if kind == "spike" and self.spike_limit is not None and self.spike >= self.spike_limit:
            return "spike"
        return None

    def state_dict(self) -> dict[str, int]:
        return {"nonfinite": self.nonfinite, "spike": self.spike}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (a resumed run continues its streaks: a run that died skipping is not reset)."""
        values = [state.get(k) for k in ("nonfinite", "spike")] if isinstance(state, Mapping) else [None]
        if not (isinstance(state, Mapping) and set(state) == {"nonfinite", "spike"}
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)):
            raise StateDictError(
                "distclip state's 'streaks' must be {'nonfinite': int >= 0, 'spike': int >= 0} as "
                f"GradClipper.state_dict() writes it; got {state!r}")
        nonfinite, spike = values
        assert isinstance(nonfinite, int) and isinstance(spike, int)  # checked just above
        self.nonfinite, self.spike = nonfinite, spike
