"""Shared by the N-D parallelism tests (TP / SP / EP / declared layouts, pipelines).

* the config sweep: p in {1, 2, 3.5, inf}, uniform and per group, plus one layout mixing norm types;
* :func:`sweep`: inside the ranks, one clip per config on the same gradients (restored between
  clips), with its collectives counted and its norms compared bitwise across ranks (all_gather),
  the clipped gradients gathered into full float64 tensors;
* :func:`check_sweep`: in the test process, against an independent float64 single-process
  reference (:mod:`tests.helpers.reference`, which shares no code with distclip);
* Megatron-style autograd functions for hand-written tensor / expert parallelism;
* the naive counts the negative controls compute (each written here, independently of distclip).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode

from tests.helpers.checks import assert_grad_close, assert_same_on_all_ranks
from tests.helpers.reference import reference_clip, rel_err

P_VALUES = (1.0, 2.0, 3.5, math.inf)
MAX_NORM = 0.01  # below every norm of the test models: the default group is always clipped


def configs(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per p: uniform, and per group; then a p = 2 layout with an inf-norm and a 1-norm group (one all-gather)."""
    out: list[dict[str, Any]] = []
    for p in P_VALUES:
        out.append({"max_norm": MAX_NORM, "norm_type": p})
        out.append({"max_norm": MAX_NORM, "norm_type": p, "groups": groups})
    mixed = [{**g, "norm_type": q} for g, q in zip(groups, (math.inf, 1.0, 3.5))]
    out.append({"max_norm": MAX_NORM, "norm_type": 2.0, "groups": mixed})
    return out


def count_collectives(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and how many c10d collectives it issued (CommDebugMode sees every c10d op)."""
    with CommDebugMode() as comm:
        out = fn()
    return out, comm.get_total_counts()


def local_of(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (the local tensor of a DTensor; the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_grads_dtensor(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every gradient as a full float64 tensor (``full_tensor`` of DTensors: a collective)."""
    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().double().clone()
            for n, p in model.named_parameters() if p.grad is not None}


def report_record(report: Any) -> dict[str, Any]:
    assert_same_on_all_ranks(report.total_norm, *report.group_norms.values())  # bitwise, via all_gather
    return {"total": report.total_norm.item(), "groups": {k: v.item() for k, v in report.group_norms.items()},
            "coefs": {k: v.item() for k, v in report.coefs.items()}, "source": report.source}


def sweep(build_clipper: Callable[[dict[str, Any]], Any], config_list: Sequence[dict[str, Any]],
          grads: Callable[[], list[torch.Tensor]], gather: Callable[[], dict[str, torch.Tensor]],
          naive: Callable[[float], dict[str, float]] | None = None) -> dict[str, Any]:
    """One clip per config on the same gradients: norms, collectives per clip, gathered clipped gradients.

    ``grads()``: the local gradient tensors (restored in place after each clip); ``gather()``:
    every gradient as a full float64 tensor, keyed by the reference's names; ``naive(p)``: the
    negative control's norms per group name (and "total").
    """
    saved = [g.detach().clone() for g in grads()]
    held = gather()  # what the ranks hold before any clip: the norms must be those of these
    records = []
    for config in config_list:
        wrong = naive(float(config["norm_type"])) if naive is not None else None  # on the unclipped gradients
        clipper = build_clipper({"comm_hook": False, **config})  # construction: one set-up exchange, not counted
        report, collectives = count_collectives(clipper.clip)
        records.append({**report_record(report), "collectives": collectives, "grads": gather(), "naive": wrong})
        with torch.no_grad():
            for g, s in zip(grads(), saved):
                g.copy_(s)
    return {"held": held, "records": records}


def check_sweep(name: str, results: list[dict[str, Any]], config_list: Sequence[dict[str, Any]],
                reference_grads: dict[str, torch.Tensor], model_tol: float = 1e-5,
                rename: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = lambda g: g,
                collectives: int = 1) -> None:
    """Every rank's sweep: ``collectives`` per clip (one; none where every counted gradient is a copy every
    rank holds whole); norms and clipped gradients equal the float64 reference of the gradients the ranks
    hold (1e-6) and of the single-process model (``model_tol``)."""
    clipped_somewhere = unclipped_somewhere = False
    for rank, result in enumerate(results):
        held = rename(result["held"])
        assert set(held) == set(reference_grads), (name, sorted(set(held) ^ set(reference_grads)))
        for config, rec in zip(config_list, result["records"]):
            where = (name, rank, config)
            assert rec["collectives"] == collectives, (*where, rec["collectives"])
            grads = rename(rec["grads"])
            for ref, tol in ((reference_clip(held, config), 1e-6),  # the gradients the ranks hold
                             (reference_clip(reference_grads, config), model_tol)):  # the one-process model
                assert rel_err(rec["total"], ref["total"]) <= tol, (*where, rec["total"], ref["total"])
                assert set(rec["groups"]) == set(ref["groups"]), (*where, rec["groups"], ref["groups"])
                for group, value in ref["groups"].items():
                    assert rel_err(rec["groups"][group], value) <= tol, (*where, group, rec["groups"][group], value)
                for param, grad in ref["clipped"].items():
                    assert_grad_close(grads[param], grad, max(tol, 1e-6))
            clipped_somewhere |= any(c < 1.0 for c in rec["coefs"].values())
            unclipped_somewhere |= any(c == 1.0 for g, c in rec["coefs"].items() if rec["groups"][g] > 0)
    assert clipped_somewhere and unclipped_somewhere, name


def check_naive(name: str, result: dict[str, Any], config_list: Sequence[dict[str, Any]],
                reference_grads: dict[str, torch.Tensor], group: str, factor: Callable[[float], float]) -> None:
    """The negative control: for every finite p whose config has ``group``, the naive count of the
    group is ``factor(p)`` times its exact norm, so measurably wrong (inf: copies do not change a max)."""
    seen = 0
    for config, rec in zip(config_list, result["records"]):
        p = float(config["norm_type"])
        spec = {g["name"]: g for g in config.get("groups", [])}.get(group)
        if math.isinf(p) or spec is None or "norm_type" in spec:
            continue
        exact = reference_clip(reference_grads, config)["groups"][group]
        wrong = rec["naive"][group]
        assert rel_err(wrong, exact) > 0.05, (name, config, group, wrong, exact)
        assert rel_err(wrong, factor(p) * exact) <= 1e-5, (name, config, group, wrong, factor(p) * exact)
        seen += 1
    assert seen, name


def pnorm_partial(tensors: Sequence[torch.Tensor], p: float) -> float:
    """sum |t|^p (max |t| for inf) in float64 over these local tensors."""
    flat = [t.detach().double().reshape(-1) for t in tensors if t.numel()]
    if not flat:
        return 0.0
    cat = torch.cat(flat).abs()
    return cat.max().item() if math.isinf(p) else cat.pow(p).sum().item()


def world_norm(partial: float, p: float, group: Any = None) -> float:
    """The norm from per-rank partials (sum, or max for inf) reduced over ``group``."""
    t = torch.tensor([partial], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if math.isinf(p) else dist.ReduceOp.SUM, group=group)
    return t.item() if math.isinf(p) else t.item() ** (1.0 / p)


def naive_own_mesh(named: Sequence[tuple[str, torch.Tensor]], p: float) -> float:
    """Each DTensor gradient counted over its OWN mesh only (replicas along its Replicate dimensions
    divided out), the partials summed over the world: a DTensor on a sub-mesh is counted once per
    rank of the dimensions the sub-mesh does not span."""
    partial = 0.0
    for _, grad in named:
        local = local_of(grad)
        copies = math.prod(grad.device_mesh.size(d) for d, pl in enumerate(grad.placements) if pl.is_replicate()) \
            if isinstance(grad, DTensor) else 1
        part = pnorm_partial([local], p)
        partial = max(partial, part) if math.isinf(p) else partial + part / copies
    return world_norm(partial, p)


# ------------------------------------------------------- hand-written tensor / expert parallelism
class CopyToGroup(torch.autograd.Function):
    """Megatron's ``f``: identity forward; backward sums the gradient over the group (each rank used
    the same input with its own shard)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ReduceFromGroup(torch.autograd.Function):
    """Megatron's ``g``: forward sums the partial outputs over the group; identity backward (every
    rank computes the same loss from the summed output)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None
