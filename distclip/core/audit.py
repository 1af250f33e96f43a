"""The opt-in clip audit (``audit: true`` or ``audit: {every: N, stale_after: M}``).

Every N clips each rank checks what its APPLY step actually did, and the ranks compare:

* **measured**: per group, the partial norm of EVERY local gradient piece this rank's APPLY
  scales (replicated copies included, not only the pieces it counts), after APPLY divided by
  before, is the factor the group's local gradients were really multiplied by; it must be the
  coefficient the rank applied (within 1%: fp32/bf16 rounding of the scaled gradients). A rank
  whose adapter scaled the wrong tensors, by the wrong factor or not at all fails here.
  (Skipped where APPLY happens later: DeepSpeed, a fold into a fused optimizer, and a loss-scale
  overflow left to GradScaler.)
* **cross-rank**: a checksum (a 60-bit hash) of the coefficients applied, of which groups were
  scaled and of the action (scale, zero, drop, ...), all-gathered with the count of measured
  mismatches: ONE all-gather of 3 int64 per rank. Details travel (two more all-gathers) only when
  something disagrees; the verdict is then the same on every rank, which all raise
  :class:`~distclip.ClipAuditError` naming the ranks (or warn, ``on_mismatch: warn``).

Cost per audited clip: two local norm passes over this rank's gradients (before and after APPLY),
one host sync, that all-gather. Between audits: nothing (the clip's own single collective is unchanged).

The same audit steps read the device-side streak counters and warn (:class:`StaleClippingWarning`,
once per streak, from rank 0 of the reduce group) when a group with a finite threshold has been
clipped on every one, or on none, of the last ``stale_after`` clips.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .errors import ClipAuditError
from .reduce import ProcessGroup, exchange_bytes, exchange_ints, group_size, hash60
from .sinks import rank_in_group

if TYPE_CHECKING:
    from .config import AuditSpec
    from .norms import SlotLayout

from ..errors import StaleClippingWarning

__all__ = ["Applied", "ClipAudit", "StaleClippingWarning", "ACTIONS", "MEASURED_RTOL"]

ACTIONS = ("none", "scale", "fold", "zero", "drop", "leave")  # what APPLY did with this clip
MEASURED = frozenset({"none", "scale", "zero", "drop"})  # actions whose effect is in the gradients right away
MEASURED_RTOL = 1e-2




@dataclass(frozen=True)
class Applied:
    """What one rank's APPLY step did: the action and the (visible) groups it scaled or zeroed."""

    action: str
    groups: tuple[int, ...] = ()


class ClipAudit:
    """The audit of one clipper (see the module docstring). ``check`` runs on every rank at once."""

    def __init__(self, spec: "AuditSpec", names: Sequence[str], layout: "SlotLayout", group: ProcessGroup | None,
                 measurable: bool = True):
        self.spec = spec
        self.names = list(names)
        self.layout = layout
        self.group = group
        self.measurable = measurable  # False where the adapter applies the coefficients later (DeepSpeed)
        self._warned: set[tuple[str, int]] = set()

    def due(self, step: int) -> bool:
        return step % self.spec.every == 0

    def measures(self, applied: Applied) -> bool:
        return self.measurable and applied.action in MEASURED

    def check(self, step: int, applied: Applied, coefs: torch.Tensor, thresholds: torch.Tensor,
              before: torch.Tensor | None = None, after: torch.Tensor | None = None,
              streaks: torch.Tensor | None = None) -> None:
        """Audit clip ``step``. ``coefs``/``thresholds``: the visible groups' (fp32, device); ``before``/``after``:
        this rank's local slot partials around APPLY (None: not measured); ``streaks``: the counters' [2, G]."""
        g = len(self.names)
        device = coefs.device
        parts = [coefs.double(), thresholds.double().to(device)]
        measured = before is not None and after is not None
        if before is not None and after is not None:  # = measured
            ratio = after[:g].to(device) / before[:g].to(device)
            p = self.layout.total_norm_type
            parts += [ratio if math.isinf(p) else ratio.pow(1.0 / p), before[:g].to(device)]
        if streaks is not None:
            parts.append(streaks.reshape(-1).double().to(device))
        values = torch.cat(parts).tolist()  # the audit's one host sync
        host_coefs, host_thresholds = values[:g], values[g : 2 * g]
        off = 2 * g
        mismatched: dict[str, float] = {}
        if measured:
            effective, local = values[off : off + g], values[off + g : off + 2 * g]
            off += 2 * g
            for i, (c, e, b) in enumerate(zip(host_coefs, effective, local)):
                if b > 0 and math.isfinite(b) and math.isfinite(c) and not abs(e - c) <= MEASURED_RTOL * c + 1e-12:
                    mismatched[self.names[i]] = e
        self._compare(step, applied, host_coefs, mismatched)
        if streaks is not None:
            self._warn_stale(values[off : off + g], values[off + g : off + 2 * g], host_thresholds)

    # ---------------------------------------------------------------- ranks
    def _compare(self, step: int, applied: Applied, coefs: list[float], mismatched: dict[str, float]) -> None:
        mine = json.dumps([applied.action, list(applied.groups), coefs])  # repr of floats: exact
        signature = [ACTIONS.index(applied.action), hash60(mine), len(mismatched)]
        rows = [signature] if group_size(self.group) == 1 else exchange_ints(self.group, signature).tolist()
        agreed = Counter((a, h) for a, h, _ in rows).most_common(1)[0][0]  # ties: rank 0's
        differ = [r for r, (a, h, _) in enumerate(rows) if (a, h) != agreed]
        broken = [r for r, (_, _, n) in enumerate(rows) if n]
        if not differ and not broken:
            return
        detail = {"action": applied.action, "groups": [self.names[i] for i in applied.groups],
                  "coefs": dict(zip(self.names, coefs)), "measured": mismatched}
        details = [detail] if len(rows) == 1 else [json.loads(b) for b in exchange_bytes(
            self.group, json.dumps(detail).encode())]
        message = _mismatch_message(step, rows, agreed, differ, broken, details)
        if self.spec.on_mismatch == "raise":
            raise ClipAuditError(message)
        if rank_in_group(self.group) == 0:
            warnings.warn(message, RuntimeWarning, stacklevel=6)

    # ---------------------------------------------------------------- stale
    def _warn_stale(self, clipped_run: list[float], unclipped_run: list[float], thresholds: list[float]) -> None:
        after = self.spec.stale_after
        writes = rank_in_group(self.group) == 0
        for i, name in enumerate(self.names):
            for kind, run in (("always", clipped_run[i]), ("never", unclipped_run[i])):
                key = (kind, i)
                if run < after or not math.isfinite(thresholds[i]):
                    self._warned.discard(key)
                    continue
                if key in self._warned:
                    continue
                self._warned.add(key)
                if not writes:
                    continue
                if kind == "always":
                    text = (f"clipped on each of the last {int(run)} clips (threshold {thresholds[i]:.4g}): clipping "
                            "is always on, which scales every update down like a smaller learning rate instead of "
                            "guarding against spikes. Raise its max_norm (`distclip suggest LOG.jsonl` proposes one "
                            "from a run logged with max_norm: inf)")
                else:
                    text = (f"not clipped in any of the last {int(run)} clips (threshold {thresholds[i]:.4g}): "
                            "clipping is a no-op for it. Lower its max_norm if it should catch spikes, or set "
                            "max_norm: inf to only measure")
                warnings.warn(f"distclip: group {name!r} was {text}", StaleClippingWarning, stacklevel=6)


def _mismatch_message(step: int, rows: list[list[int]], agreed: tuple[int, int], differ: list[int],
                      broken: list[int], details: list[dict[str, Any]]) -> str:
    reference = next(r for r, (a, h, _) in enumerate(rows) if (a, h) == agreed)
    lines = [f"distclip audit at clip {step}: ranks {sorted(set(differ) | set(broken))} did not clip like the others "
             "(every rank must apply the same coefficients to the same groups: they come from the same reduced norms)."]

    def applied(r: int) -> str:
        d = details[r] if len(details) > 1 else details[0]
        coefs = ", ".join(f"{n} x{c:.6g}" for n, c in d["coefs"].items())
        return f"{d['action']} of groups {d['groups']} with coefficients {coefs}"

    for r in differ[:4]:
        lines.append(f"  rank {r} applied {applied(r)}; rank {reference} (and those agreeing) applied "
                     f"{applied(reference)}")
    for r in broken[:4]:
        d = details[r] if len(details) > 1 else details[0]
        found = ", ".join(f"{n} by {v:.6g} (coefficient {d['coefs'][n]:.6g})" for n, v in d["measured"].items())
        lines.append(f"  rank {r}: measured on its own gradients, APPLY scaled {found}")
    lines.append("A rank-dependent code path does this: a patched or custom adapter, a rank-local decision, or a "
                 "distclip bug (please report it with this message). Set audit.on_mismatch: warn to keep training.")
    return "\n".join(lines)
