"""Independent float64 reference: norms and clipping written the obvious way, sharing no distclip code."""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Callable

import torch


def norm64(tensors: list[torch.Tensor], p: float) -> float:
    flat = torch.cat([t.detach().double().flatten() for t in tensors]) if tensors else torch.zeros(0, dtype=torch.float64)
    if flat.numel() == 0:
        return 0.0
    if math.isinf(p):
        return flat.abs().max().item()
    return flat.abs().pow(p).sum().pow(1.0 / p).item()


def assign(name: str, groups: list[dict[str, Any]]) -> str:
    for g in groups:
        patterns = [g["match"]] if isinstance(g["match"], str) else g["match"]
        if any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
            return g["name"]
    return "default"


def reference_clip(grads: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, Any]:
    """Total norm, per-group norms and the clipped gradients (float64), per the distclip semantics."""
    p = float(config.get("norm_type", 2.0))
    max_norm = float(config.get("max_norm", 1.0))
    groups = config.get("groups", [])
    members: dict[str, list[str]] = {g["name"]: [] for g in groups} | {"default": []}
    for name in grads:
        members[assign(name, groups)].append(name)
    spec = {g["name"]: g for g in groups}
    group_norms, clipped = {}, {}
    for gname, names in members.items():
        gp = float(spec.get(gname, {}).get("norm_type", p))
        gmax = float(spec.get(gname, {}).get("max_norm", max_norm))
        n = norm64([grads[k] for k in names], gp)
        group_norms[gname] = n
        coef = min(1.0, gmax / (n + 1e-6))
        for k in names:
            clipped[k] = grads[k].double() * coef
    total = norm64(list(grads.values()), p)
    return {"total": total, "groups": group_norms, "clipped": clipped}


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def reference_run(config: dict[str, Any], world: int, steps: int, lr: float,
                  make_model: Callable[[torch.dtype], torch.nn.Module] | None = None,
                  step_loss: Callable[[torch.nn.Module, int], torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """``steps`` of clip + SGD in one process, float64, on all ranks' batches concatenated.

    ``make_model(dtype)`` builds the model (default: :func:`tests.helpers.models.make_model`);
    ``step_loss(model, step)`` is the loss of one step (default: :func:`tests.helpers.models.loss_fn` on
    :func:`tests.helpers.models.global_batch`). Per step: the :func:`reference_clip` result plus ``params``
    (every parameter after the step).
    """
    from tests.helpers import models

    model = (make_model or (lambda dtype: models.make_model(dtype=dtype)))(torch.float64)
    step_loss = step_loss or (lambda m, step: models.loss_fn(m, *models.global_batch(step, world)))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out = []
    for step in range(steps):
        step_loss(model, step).backward()
        ref = reference_clip({n: p.grad for n, p in model.named_parameters()}, config)
        for n, p in model.named_parameters():
            p.grad.copy_(ref["clipped"][n])
        opt.step()
        opt.zero_grad()
        out.append({**ref, "params": {n: p.detach().clone() for n, p in model.named_parameters()}})
    return out
