"""APPLY: what a decision does to this rank's gradients, through the adapter (or a fused optimizer)."""

from __future__ import annotations

from typing import Callable

import torch

from .audit import Applied
from .contract import GradAdapter
from .decide import Decision

__all__ = ["apply", "Fold"]

Fold = Callable[[torch.Tensor], None]  # takes the (uniform) coefficients instead of multiplying the gradients


def apply(decision: Decision, adapter: GradAdapter, fold: Fold | None = None) -> Applied:
    """Carry out ``decision`` on the local gradients; returns what was done (for the audit)."""
    action = decision.action
    if action == "scale":
        if decision.groups:
            adapter.scale(decision.coefs, decision.groups, decision.host_coefs)
        if decision.scale_rows and decision.row_coefs is not None:
            adapter.scale_rows(decision.row_coefs)
    elif action == "fold":
        assert fold is not None, "a fold decision needs the optimizer to fold into"
        fold(decision.coefs)
    elif action == "zero":
        adapter.zero(decision.groups)
    elif action == "drop":
        adapter.drop_grads()
    return Applied(action, decision.groups if action in ("scale", "fold", "zero") else ())
