"""Shared by the FSDP1 and FSDP2 tests: a model with uneven shapes, the float64 reference, the per-step
record (norms, naive norms, collectives, gathered clipped gradients), and CPU shims."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor.debug import CommDebugMode

from tests.helpers.checks import assert_grad_close, assert_same_on_all_ranks
from tests.helpers.models import DIM, TinyNet, batch, loss_fn
from tests.helpers.reference import reference_clip, reference_run, rel_err

NORM_TYPES = [1.0, 2.0, 3.5, math.inf]
# >= 3 groups by ORIGINAL names; "tiny" (2 elements) is smaller than the world size on 4 ranks
# and lives on one rank only under FSDP1 FULL_SHARD on 2.
GROUPS = [
    {"name": "embed", "match": ["embed.*"], "max_norm": 0.02},
    {"name": "attn", "match": ["blocks.*.attn.*"], "max_norm": 0.01},
    {"name": "tiny", "match": ["tiny"], "max_norm": 0.05},
]
STEPS = 2
LR = 0.5
CONFIGS = [{"max_norm": 0.1, "norm_type": p, "groups": GROUPS if grouped else []}
           for p in NORM_TYPES for grouped in (False, True)]
NAIVE_CONFIG = CONFIGS[2]  # p = 2, uniform
LONG_CONFIG = CONFIGS[3]  # p = 2, per group: two steps (the hook path on a second iteration)


class UnevenNet(TinyNet):
    """TinyNet plus a 7-wide bottleneck (``odd.*``): first dimensions no world size of 2 or 4 divides."""

    def __init__(self, blocks: int = 2) -> None:
        super().__init__(blocks)
        self.odd = nn.Sequential(nn.Linear(DIM, 7), nn.Tanh(), nn.Linear(7, DIM))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        x = x + self.odd(x)
        return self.head(x * self.tiny.sum())


def make_net(dtype: torch.dtype = torch.float32) -> UnevenNet:
    torch.manual_seed(0)
    return UnevenNet().to(dtype)


def reference_steps(config: dict, world: int, steps: int = STEPS, lr: float = LR) -> list[dict[str, Any]]:
    """``steps`` of clip + SGD in one float64 process on all ranks' batches concatenated."""
    return reference_run(config, world, steps, lr, make_model=make_net)


def reference_norm(config: dict, world: int) -> float:
    return reference_steps(config, world, steps=1)[0]["total"]


def local_pnorm_sum(tensors: list[torch.Tensor], p: float) -> float:
    """sum |g|^p (max |g| for inf) over this rank's local tensors, float64."""
    flat = [t.detach().double().reshape(-1) for t in tensors if t is not None and t.numel()]
    if not flat:
        return 0.0
    cat = torch.cat(flat).abs()
    return cat.max().item() if math.isinf(p) else cat.pow(p).sum().item()


def naive_norms(local_grads: list[torch.Tensor], p: float) -> dict[str, float]:
    """The two classic wrong answers: this rank's shards only, and every rank's local sum added up."""
    s = local_pnorm_sum(local_grads, p)
    t = torch.tensor([s], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if math.isinf(p) else dist.ReduceOp.SUM)
    root = (lambda v: v) if math.isinf(p) else (lambda v: v ** (1.0 / p))
    return {"local": root(s), "world_sum": root(t.item())}


def sync_grads(params: list[torch.Tensor]) -> None:
    """Average gradients FSDP does not manage (the user's job, as with FSDP's own clip)."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(dist.get_world_size())


def train_and_record(
    config: dict,
    build: Callable[[], tuple[Any, Any, list[torch.Tensor]]],
    local_grads: Callable[[Any], list[torch.Tensor]],
    full_grads: Callable[[Any], dict[str, torch.Tensor]],
    steps: int = 1,
    naive: bool = False,
    **clip_options: Any,
) -> list[dict[str, Any]]:
    """``steps`` of forward/backward, clip (collectives counted), SGD. ``build`` gives (model, clipper target, unmanaged).

    Per step it records the clip report, the same norms from a second clipper forced onto the
    post-backward path (on the very same gradients), the full gradients after clipping and, at
    step 0, before clipping (gathered from the ranks), and optionally the naive norms.
    """
    import distclip

    rank = dist.get_rank()
    model, target, unmanaged = build()
    clipper = distclip.GradClipper(target, {"comm_hook": True, **config, **clip_options})  # the hook, where it exists
    post_backward = distclip.GradClipper(target, {**config, **clip_options, "comm_hook": False})
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    p = float(config["norm_type"])
    records = []
    for step in range(steps):
        loss_fn(model, *batch(step, rank)).backward()
        sync_grads(unmanaged)
        wrong = naive_norms(local_grads(model), p) if naive else None
        pre_clip = full_grads(model) if step == 0 else None
        measured = post_backward.measure()
        with CommDebugMode() as comm:
            report = clipper.clip()
        assert type(report.total_norm) is torch.Tensor and report.total_norm.dtype == torch.float32
        assert_same_on_all_ranks(report.total_norm, *report.group_norms.values())
        records.append({
            "total": report.total_norm.item(),
            "groups": {k: v.item() for k, v in report.group_norms.items()},
            "coefs": {k: v.item() for k, v in report.coefs.items()},
            "source": report.source,
            "post_backward": (measured.source, measured.total_norm.item(), {k: v.item() for k, v in measured.group_norms.items()}),
            "collectives": comm.get_total_counts(),
            "naive": wrong,
            "grads": full_grads(model),
            "pre_clip": pre_clip,
        })
        opt.step()
        opt.zero_grad()
    return records


def run_configs(build: Callable[[], tuple[Any, Any, list[torch.Tensor]]], local_grads: Callable, full_grads: Callable) -> list[list[dict]]:
    """Every config of CONFIGS on a fresh model (two steps for one of them, naive norms for p = 2 uniform)."""
    return [train_and_record(c, build, local_grads, full_grads, steps=2 if c is LONG_CONFIG else 1, naive=c is NAIVE_CONFIG)
            for c in CONFIGS]


def check_runs(name: str, runs: list[list[dict]], world: int, source: str, naive: str | None,
               tol: float = 1e-6, later_tol: float | None = 1e-5) -> None:
    """Everything :func:`run_configs` recorded: reference, paths, clipping happened, negative control."""
    for config, records in zip(CONFIGS, runs):
        check_records(records, config, world, tol=tol, later_tol=later_tol)
        assert [r["source"] for r in records] == [source] * len(records), (name, config)
        for r in records:  # the post-backward path on the same gradients gives the same norms
            post_source, post_total, post_groups = r["post_backward"]
            assert post_source == "post_backward"
            assert rel_err(post_total, r["total"]) <= 1e-6, (name, config, post_total, r["total"])
            for group, value in r["groups"].items():
                assert rel_err(post_groups[group], value) <= 1e-6 or value == 0, (name, config, group)
    assert any(c < 1.0 for records in runs for r in records for c in r["coefs"].values())  # clipping happened
    if naive is not None:  # negative control: the classic wrong answer for this layout is far off
        ref = reference_norm(NAIVE_CONFIG, world)
        wrong = runs[CONFIGS.index(NAIVE_CONFIG)][0]["naive"][naive]
        assert rel_err(wrong, ref) > 0.05, (name, naive, wrong, ref)


def check_records(records: list[dict], config: dict, world: int, tol: float = 1e-6, later_tol: float | None = 1e-5) -> None:
    """Exactness at every step, agreement with the float64 single-process reference.

    * every step: the clip issued exactly one collective; where the gradients were gathered before
      clipping (step 0), the norms equal the float64 norms of the very gradients the ranks hold to
      1e-6 and the clipped gradients equal those scaled by the reference coefficients;
    * step 0 (same weights, same data): norms within ``tol`` of the reference, clipped gradients too;
    * later steps: the ranks' weights followed an fp32 (or bf16) trajectory, the reference an fp64
      one: within ``later_tol`` (None: not compared).
    """
    refs = reference_steps(config, world, steps=len(records))
    for step, (rec, ref) in enumerate(zip(records, refs)):
        assert rec["collectives"] == 1, (config, step, rec["collectives"])
        assert set(rec["grads"]) == set(ref["clipped"]), sorted(set(rec["grads"]) ^ set(ref["clipped"]))
        if rec["pre_clip"] is not None:
            _compare(rec, reference_clip(rec["pre_clip"], config), config, step, 1e-6, grad_rtol=1e-6)
        limit = tol if step == 0 else later_tol
        if limit is not None:
            _compare(rec, ref, config, step, limit, grad_rtol=max(limit, 1e-5))


def _compare(rec: dict, ref: dict, config: dict, step: int, rtol: float, grad_rtol: float) -> None:
    assert rel_err(rec["total"], ref["total"]) <= rtol, (config, step, rec["total"], ref["total"])
    for name, value in ref["groups"].items():
        assert rel_err(rec["groups"][name], value) <= rtol or abs(value) < 1e-12, (config, step, name, rec["groups"][name], value)
    for name, grad in ref["clipped"].items():
        assert_grad_close(rec["grads"][name], grad, grad_rtol)


def assemble(pieces: list[list[tuple[str, int, torch.Tensor, tuple[int, ...]]]]) -> dict[str, torch.Tensor]:
    """Full tensors from (name, flat start, values, full shape) pieces gathered from every rank.

    Replicas send the same piece: each element written twice must agree (checks the replicas too).
    """
    full: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for rank_pieces in pieces:
        for name, start, values, shape in rank_pieces:
            if name not in full:
                shapes[name] = tuple(shape)
                numel = math.prod(shape)
                full[name] = torch.zeros(numel, dtype=torch.float64)
                seen[name] = torch.zeros(numel, dtype=torch.bool)
            end = start + values.numel()
            again = seen[name][start:end]
            if again.any():
                assert torch.equal(full[name][start:end][again], values.double()[again]), f"replicas of {name} differ"
            full[name][start:end] = values.double()
            seen[name][start:end] = True
    for name, mask in seen.items():
        assert mask.all(), f"{name}: elements held by no rank"
    return {name: t.view(shapes[name]) for name, t in full.items()}


def all_pieces(local: list[tuple[str, int, torch.Tensor, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [(n, s, v.detach().cpu().clone(), shape) for n, s, v, shape in local])
    return assemble(gathered)


def enable_cpu_offload_shims() -> None:
    """FSDP1 CPU offload on a machine without an accelerator: it pins memory and syncs a stream.

    Both are no-ops for CPU tensors, but torch 2.13 raises ("Cannot access accelerator device",
    "'Stream' object has no attribute 'synchronize'"). The offload path itself (a separate CPU
    gradient buffer, ``_cpu_grad``, that FSDP copies into) runs unchanged.
    """
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    if not hasattr(torch.cpu.Stream, "synchronize"):
        torch.cpu.Stream.synchronize = lambda self: None  # type: ignore[attr-defined]
