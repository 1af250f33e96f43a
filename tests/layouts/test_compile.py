"""torch.compile (CPU inductor) on 2 gloo ranks: per-block compiled models, compiled optimizer steps, graph breaks.

One launch checks everything (compiled code is reused across the fresh models of one process):

* **per-block compile, torchtitan's way** (``block.compile(fullgraph=True)`` on each block, then DDP or
  ``fully_shard``): for p = 2, inf, 1.5, uniform and per group, the norms distclip computes inside
  the reduction (DDP comm hook / FSDP2 all-reduce hook, ``comm_hook: true``) and after backward
  (``comm_hook: false``) equal the float64 norms of the very gradients the compiled model produced
  (1e-6), the two paths agree bitwise, the clipped gradients are those gradients times the reference
  coefficient, and the same holds for the eager model (bitwise equal norms where the gradients are
  bitwise equal). ``fullgraph=True`` makes any graph break inside a block an error.
* **compiled optimizer step** (``torch.compile(opt.step)``) with ``clipper.attach(opt)``: the pre-step
  hook runs every step; with ``AdamW(fused=True)`` the coefficient is folded into ``grad_scale`` and
  the parameters equal the eager run's bitwise; with foreach AdamW they equal bitwise a run whose clip
  is called eagerly before the same compiled step (the compiled foreach update itself rounds unlike
  eager's, with or without distclip); distclip adds no recompilation.
* **graph breaks** distclip adds to a user's compiled region: none in a model's forward with the
  hooks installed, none in a compiled ``opt.step`` with ``attach``, none around ``dist.all_reduce`` or
  GradScaler's unscale kernel (which distclip wraps process-wide); exactly one where the user calls
  ``clipper.clip()`` between tensor operations inside the region (the clip runs eagerly there).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from distclip.testing import run_ranks
from tests.helpers.checks import (
    assert_grad_close,
    assert_same_on_all_ranks,
    launch_once,
)
from tests.helpers.fsdp_helpers import GROUPS
from tests.helpers.models import batch, loss_fn, make_model
from tests.helpers.reference import reference_clip, rel_err

pytestmark = pytest.mark.multiprocess

WORLD = 2
CONFIGS = [{"max_norm": 0.1, "norm_type": p, "groups": GROUPS if grouped else []}
           for p in (2.0, math.inf, 1.5) for grouped in (False, True)]
STEPS = 3  # steps 0, 1: the hooked clipper (1: after DDP rebuilt its buckets); step 2: the post-backward one
HOOK_STATUS = {"ddp": "comm_hook", "fsdp2": "all_reduce_hook"}
OPT_STEPS = 3
_MESH: list[Any] = []


# ------------------------------------------------------------------ per-block compiled models
def build(layout: str, compiled: bool) -> tuple[nn.Module, nn.Module]:
    """(module holding the parameters, what is called and clipped); compiled blocks before wrapping, as
    torchtitan's apply_compile runs before its data parallelism."""
    model = make_model()
    if compiled:
        for block in model.blocks:
            block.compile(fullgraph=True)  # a graph break inside a block is an error
    if layout == "ddp":
        return model, DDP(model)
    if not _MESH:
        _MESH.append(init_device_mesh("cpu", (WORLD,)))
    for block in model.blocks:
        fully_shard(block, mesh=_MESH[0])
    fully_shard(model, mesh=_MESH[0])
    return model, model


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().double().clone()
            for n, p in model.named_parameters()}


def numbers(report: distclip.ClipReport) -> dict[str, Any]:
    return {"total": report.total_norm.item(), "groups": {k: v.item() for k, v in report.group_norms.items()},
            "coefs": {k: v.item() for k, v in report.coefs.items()}, "source": report.source}


def train(layout: str, compiled: bool, config: dict) -> list[dict[str, Any]]:
    """STEPS steps of forward/backward, clip, SGD; per step the pre-clip and clipped gradients and both paths' norms."""
    rank = dist.get_rank()
    model, target = build(layout, compiled)
    hooked = distclip.GradClipper(target, {**config, "comm_hook": True})
    post = distclip.GradClipper(target, {**config, "comm_hook": False})
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    records = []
    for step in range(STEPS):
        loss_fn(target, *batch(step, rank)).backward()
        pre = full_grads(model)
        measured = post.measure()  # the post-backward path on the very same gradients
        report = (hooked if step < 2 else post).clip()
        assert_same_on_all_ranks(report.total_norm, *report.group_norms.values())
        records.append({**numbers(report), "measured": numbers(measured), "pre": pre, "clipped": full_grads(model),
                        "hook_status": hooked.adapter.hook_status})
        opt.step()
        opt.zero_grad()
    return records


def per_block_runs() -> dict[str, Any]:
    out: dict[str, Any] = {"runs": {}, "first_compile_s": {}}
    for layout in ("ddp", "fsdp2"):
        for index, config in enumerate(CONFIGS):
            for compiled in (False, True):
                start = time.perf_counter()
                out["runs"][layout, index, compiled] = train(layout, compiled, config)
                if compiled and index == 0:
                    out["first_compile_s"][layout] = time.perf_counter() - start
    return out


# ------------------------------------------------------------------ compiled optimizer step
def small_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))


class Compiles:
    """A torch.compile backend that counts the graphs it compiles (with inductor)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        return compile_fx(gm, example_inputs)


def optimizer_run(fused: bool, mode: str) -> dict[str, Any]:
    """OPT_STEPS steps of DDP + AdamW. ``mode``: ``eager`` (attach, eager step), ``compiled`` (attach,
    ``torch.compile(opt.step)``), ``clip_then_compiled`` (an eager ``clip()`` before the same compiled
    step, no attach) or ``unclipped`` (eager, no clip: the negative control)."""
    rank = dist.get_rank()
    model = small_model()
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, eps=1e-3, fused=fused, foreach=None if fused else True)
    clipper = distclip.GradClipper(ddp, {"max_norm": 0.05, "comm_hook": True})
    if mode in ("eager", "compiled"):
        clipper.attach(opt)
    seen_scale: list[Any] = []

    @torch.compiler.disable  # a spy after distclip's pre-hook: what the fused kernel will read
    def spy(optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        scale = getattr(optimizer, "grad_scale", None)
        seen_scale.append(None if scale is None else float(scale))

    opt.register_step_pre_hook(spy)
    backend = Compiles()
    step = torch.compile(opt.step, backend=backend) if mode in ("compiled", "clip_then_compiled") else opt.step
    reports = []
    for s in range(OPT_STEPS):
        g = torch.Generator().manual_seed(100 * s + rank)
        ddp(torch.randn(5, 8, generator=g)).pow(2).sum().backward()
        if mode == "clip_then_compiled":
            clipper.clip()
        step()
        if mode != "unclipped":
            reports.append(numbers(clipper.last_report))
        opt.zero_grad()
    return {"params": [p.detach().clone() for p in model.parameters()], "reports": reports, "grad_scale": seen_scale,
            "clips": clipper.steps, "graphs": backend.graphs, "grad_scale_left": hasattr(opt, "grad_scale")}


def optimizer_runs() -> dict[str, Any]:
    out: dict[str, Any] = {}
    # foreach first: in torch 2.13 a compiled foreach AdamW step fails to trace ("Expected scalars to be on CPU,
    # got meta") after a compiled fused AdamW step in the same process, with or without distclip, unless
    # torch._dynamo.reset() runs between them
    for fused in (False, True):
        for mode in ("eager", "compiled", "clip_then_compiled", "unclipped"):
            start = time.perf_counter()
            out[fused, mode] = optimizer_run(fused, mode)
            out[fused, mode]["seconds"] = time.perf_counter() - start
    return out


# ------------------------------------------------------------------ graph breaks
def explained(fn: Callable[[], Any]) -> dict[str, Any]:
    """Graphs and graph breaks dynamo makes of ``fn`` (traced only: ``explain`` runs no inductor)."""
    torch._dynamo.reset()
    result = torch._dynamo.explain(fn)()
    return {"graphs": result.graph_count, "breaks": result.graph_break_count,
            "reasons": [str(b.reason).splitlines()[0] for b in result.break_reasons]}


def graph_breaks() -> dict[str, Any]:
    rank = dist.get_rank()
    out: dict[str, Any] = {}
    tokens, _ = batch(0, rank)
    # a model's forward, as a whole-model compile traces it, with and without distclip's hooks
    for layout in ("ddp", "fsdp2"):
        for hooks in (False, True):
            model, target = build(layout, compiled=False)
            if hooks:
                clipper = distclip.GradClipper(target, {"max_norm": 0.1, "comm_hook": True})
                assert clipper.adapter.hook_status == HOOK_STATUS[layout]
            out["forward", layout, hooks] = explained(lambda target=target: target(tokens).sum())
    # a compiled foreach optimizer step, with and without attach
    for attach in (False, True):
        model = small_model()
        ddp = DDP(model)
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, foreach=True)
        clipper = distclip.GradClipper(ddp, {"max_norm": 0.05, "comm_hook": True})
        if attach:
            clipper.attach(opt)
        ddp(torch.randn(5, 8)).pow(2).sum().backward()
        out["step", attach] = explained(opt.step)
        out["step", attach]["clips"] = clipper.steps
    # clip() inside a user's compiled region, between tensor operations
    ddp(torch.randn(5, 8)).pow(2).sum().backward()
    probe = torch.ones(3)

    def region_with_clip() -> torch.Tensor:
        y = probe * 2
        clipper.clip()
        return y + 1

    out["region_with_clip"] = explained(region_with_clip)
    # the c10d collectives and GradScaler's unscale kernel distclip wraps (process-wide) inside a user's region
    found, inv = torch.zeros(1), torch.tensor(0.5)

    def region_with_wrapped_ops() -> torch.Tensor:
        t = probe * 2
        dist.all_reduce(t)
        grads = [t * 1, probe * 3]
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)
        return t + grads[0] + grads[1]

    out["wrapped_ops_are_distclips"] = [getattr(f, "_distclip_tracked", False) for f in (
        dist.all_reduce, torch._amp_foreach_non_finite_check_and_unscale_)]
    out["region_with_wrapped_ops"] = explained(region_with_wrapped_ops)
    return out


def compiled_write_after_backward() -> list[dict[str, Any]]:
    """A compiled region that writes into a gradient after backward (``dist.all_reduce`` of it, as for weights
    synchronised by hand): distclip's collective wrapper is transparent there, the version counter shows the
    write, so the hook's partials are discarded and the clip measures the gradients as they are now."""
    rank = dist.get_rank()
    model = small_model()
    ddp = DDP(model)
    clipper = distclip.GradClipper(ddp, {"max_norm": 0.05, "comm_hook": True})

    @torch.compile
    def resync(grad: torch.Tensor) -> None:
        dist.all_reduce(grad)
        grad.mul_(0.75)  # changes the gradient: a stale hook result would be visibly wrong

    out = []
    for step, write in enumerate((False, True, True)):
        g = torch.Generator().manual_seed(200 + 100 * step + rank)
        ddp(torch.randn(5, 8, generator=g)).pow(2).sum().backward()
        if write:
            resync(model[0].weight.grad)
        pre = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
        report = clipper.clip()
        out.append({**numbers(report), "pre": pre, "write": write,
                    "clipped": {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}})
        model.zero_grad()
    return out


# ------------------------------------------------------------------ the launch
def rank_main() -> dict[str, Any]:
    import torch._inductor.config as inductor_config

    # compile in this process: a pool of compile workers costs more to start than these few kernels take
    inductor_config.compile_threads = 1
    result = {"per_block": per_block_runs(), "optimizer": optimizer_runs(), "graph_breaks": graph_breaks(),
              "compiled_write": compiled_write_after_backward()}
    return result if dist.get_rank() == 0 else {}


@launch_once
def launched() -> dict[str, Any]:
    start = time.perf_counter()
    result = run_ranks(rank_main, WORLD, timeout=420, collective_timeout=300)[0]
    result["launch_s"] = time.perf_counter() - start
    return result


# ------------------------------------------------------------------ checks
def check_exact(rec: dict[str, Any], config: dict, where: Any) -> None:
    """Norms within 1e-6 of the float64 norms of the very gradients this model produced; clipped likewise."""
    ref = reference_clip(rec["pre"], config)
    assert rel_err(rec["total"], ref["total"]) <= 1e-6, (where, rec["total"], ref["total"])
    for name, value in ref["groups"].items():
        assert rel_err(rec["groups"][name], value) <= 1e-6 or value == 0, (where, name, rec["groups"][name], value)
    for name, grad in ref["clipped"].items():
        assert_grad_close(rec["clipped"][name], grad, 1e-6)


@pytest.mark.parametrize("layout", ["ddp", "fsdp2"])
def test_per_block_compiled_model_is_exact_with_the_hook_on_and_off(layout: str) -> None:
    runs = launched()["per_block"]["runs"]
    clipped = False
    for index, config in enumerate(CONFIGS):
        for compiled in (False, True):
            records = runs[layout, index, compiled]
            for step, rec in enumerate(records):
                where = (layout, config["norm_type"], bool(config["groups"]), "compiled" if compiled else "eager", step)
                assert rec["hook_status"] == HOOK_STATUS[layout], where
                # steps 0, 1: the norm came from inside the reduction; step 2: comm_hook false
                assert rec["source"] == ("comm_hook" if step < 2 else "post_backward"), where
                assert rec["measured"]["source"] == "post_backward", where
                check_exact(rec, config, where)
                # the two paths on the same gradients: bitwise the same norms
                assert rec["measured"]["total"] == rec["total"], where
                assert rec["measured"]["groups"] == rec["groups"], where
                clipped |= any(c < 1.0 for c in rec["coefs"].values())
        # compiled vs eager on the same weights and data (step 0): bitwise where the gradients are
        eager, compiled = runs[layout, index, False][0], runs[layout, index, True][0]
        if all(torch.equal(eager["pre"][n], compiled["pre"][n]) for n in eager["pre"]):
            assert eager["total"] == compiled["total"] and eager["groups"] == compiled["groups"], (layout, config)
        else:  # inductor's kernels round differently: each is exact for its own gradients (above), and close
            assert rel_err(compiled["total"], eager["total"]) <= 1e-5, (layout, config, compiled["total"], eager["total"])
    assert clipped


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_compiled_optimizer_step_with_attach(fused: bool) -> None:
    runs = launched()["optimizer"]
    eager, compiled, reference, unclipped = (runs[fused, m] for m in ("eager", "compiled", "clip_then_compiled",
                                                                     "unclipped"))
    assert compiled["clips"] == OPT_STEPS  # the step pre-hook ran on every compiled step
    assert [r["source"] for r in compiled["reports"]] == ["comm_hook"] * OPT_STEPS
    assert all(r["coefs"]["default"] < 1.0 for r in compiled["reports"])  # the clip mattered
    assert not compiled["grad_scale_left"]
    if fused:  # the coefficient went into grad_scale: 1 / coef, seen by the step, under compile as in eager
        for run in (eager, compiled):
            assert run["grad_scale"] == [pytest.approx(1.0 / r["coefs"]["default"], rel=1e-6) for r in run["reports"]]
        expected = eager
    else:  # no fold: the clip scaled the gradients before the compiled step
        assert compiled["grad_scale"] == [None] * OPT_STEPS
        expected = reference
    assert [r["total"] for r in compiled["reports"]] == [r["total"] for r in expected["reports"]]
    for got, want, free in zip(compiled["params"], expected["params"], unclipped["params"]):
        assert torch.equal(got, want), (got - want).abs().max()
    assert any(not torch.equal(got, free) for got, free in zip(compiled["params"], unclipped["params"]))
    assert compiled["graphs"] == reference["graphs"]  # attach adds no recompilation


def test_graph_breaks_distclip_adds() -> None:
    breaks = launched()["graph_breaks"]
    for layout in ("ddp", "fsdp2"):  # the hooks live in the backward reduction, not in the traced forward
        without, with_hooks = breaks["forward", layout, False], breaks["forward", layout, True]
        assert (with_hooks["graphs"], with_hooks["breaks"]) == (without["graphs"], without["breaks"]), layout
    without, attached = breaks["step", False], breaks["step", True]
    assert attached["clips"] == 1 and without["clips"] == 0  # explain ran the step, and the pre-hook with it
    assert (attached["graphs"], attached["breaks"]) == (without["graphs"], without["breaks"]) == (1, 0)
    region = breaks["region_with_clip"]  # the one documented break: the clip runs eagerly
    assert (region["graphs"], region["breaks"]) == (2, 1), region
    assert "torch.compiler.disable" in region["reasons"][0], region
    assert breaks["wrapped_ops_are_distclips"] == [True, True]
    assert (breaks["region_with_wrapped_ops"]["graphs"], breaks["region_with_wrapped_ops"]["breaks"]) == (1, 0)


def test_a_compiled_write_into_a_gradient_invalidates_the_hook() -> None:
    records = launched()["compiled_write"]
    assert [r["source"] for r in records] == ["comm_hook", "post_backward", "post_backward"]
    config = {"max_norm": 0.05, "norm_type": 2.0, "groups": []}
    for step, rec in enumerate(records):
        check_exact(rec, config, ("compiled write", step))
