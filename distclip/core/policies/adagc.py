"""``kind: adagc``: AdaGC-style per-group adaptive clipping (Wang et al., arXiv 2502.11034; OLMo's
per-tensor ``max_grad_norm_ratio``). Meant for ``per_parameter`` groups.

- Warm-up (the first ``warmup_steps`` accepted steps): global clipping of all covered groups
  together at their ``max_norm`` (lambda_abs), on the norm over the covered groups: one
  coefficient ``c = min(1, max_norm / (norm + 1e-6))`` for all. Each group's reported threshold
  is its share ``max_norm * (norm_i + 1e-6) / (norm + 1e-6)``. gamma_i tracks the running
  minimum of the group's clipped norm ``c * norm_i``.
- Then ``h_i = min(1, lambda_rel * gamma_i / (norm_i + 1e-6))`` and
  ``gamma_i <- beta * gamma_i + (1 - beta) * h_i * norm_i``.

One choice beyond the paper: a group whose norm is 0 this step (no gradient reached it) leaves
its gamma_i as it is. Otherwise a tensor unused during warm-up would get gamma_i = 0, and with
it a zero threshold forever. A gamma_i still unset after warm-up (inf: no gradient seen yet)
is not clipped and takes its first clipped norm as its value.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..config import AdaGCPolicySpec, ConfigError
from ..groups import ClipGroup
from .base import EPS, ClipPolicy, clip_coefficients

F64 = torch.float64


class AdaGCPolicy(ClipPolicy):
    kind = "adagc"

    def __init__(self, spec: AdaGCPolicySpec, groups: Sequence[ClipGroup]):
        for what in ("max_norm", "norm_type"):
            values = {getattr(g, what) for g in groups}
            if len(values) > 1:
                raise ConfigError(
                    f"policy (adagc): its warm-up clips all the groups it covers together, but they have different "
                    f"{what} values {sorted(values)} ({', '.join(g.name for g in groups)}); give them the same "
                    f"{what}, or give the odd groups their own policy"
                )
        self.max_norm, self.norm_type = groups[0].max_norm, groups[0].norm_type
        state = {
            "gamma": torch.full((len(groups),), math.inf, dtype=F64),  # inf: no gradient seen yet
            "count": torch.zeros((), dtype=torch.int64),  # accepted steps so far
        }
        super().__init__(spec, groups, state)

    def _warming(self, st: dict[str, torch.Tensor]) -> torch.Tensor:
        return st["count"] < self.spec.warmup_steps

    def coefficients(self, group_norms: torch.Tensor, total_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        st = self._on(group_norms.device)
        norms = group_norms.to(F64)
        covered = torch.linalg.vector_norm(norms, ord=self.norm_type)  # the norm over the covered groups
        shares = self.max_norm * (norms + EPS) / (covered + EPS)
        adaptive = self.spec.lambda_rel * st["gamma"]
        warming = self._warming(st)
        thresholds = torch.where(warming, shares, adaptive)
        coefs = torch.where(warming, clip_coefficients(self.max_norm, covered), clip_coefficients(adaptive, norms))
        return thresholds, coefs

    def update(
        self, group_norms: torch.Tensor, total_norm: torch.Tensor, coefs: torch.Tensor, accepted: torch.Tensor
    ) -> None:
        st = self._on(group_norms.device)
        norms = group_norms.to(F64)
        ok = self._usable(norms, accepted)
        gamma, beta = st["gamma"], self.spec.beta
        clipped = coefs.to(F64) * norms
        seen = norms > 0
        running_min = torch.minimum(gamma, clipped)
        ema = torch.where(torch.isinf(gamma), clipped, beta * gamma + (1 - beta) * clipped)
        new_gamma = torch.where(self._warming(st), running_min, ema)
        self._commit(ok & seen, gamma=new_gamma)
        self._commit(ok, count=st["count"] + 1)
