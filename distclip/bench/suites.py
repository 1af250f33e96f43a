"""The benchmark suites: per-backend step/clip cost, scaling in the number of tensors, bandwidth, norm kernels."""

from __future__ import annotations

import argparse
import math
import statistics
import time
from functools import partial
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

import distclip
from distclip.core.kernels import power_sums

from ..compat.pytorch import foreach_copy_, foreach_norm
from .cases import BACKENDS, MAX_NORM, BenchNet, dim_for
from .measure import Stopwatch, count_collectives, growth_exponent, median_ms, peak_memory_added


def _max_over_ranks(value: float) -> float:
    """The slowest rank decides a synchronous step."""
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def bench_backend(backend: str, params: int, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Median clip and step time, collectives per clip and peak memory added, for every variant."""
    build, variants = BACKENDS[backend]
    dim = dim_for(params, args.layers)

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return BenchNet(dim, args.layers)

    x = torch.randn(args.batch, dim, generator=torch.Generator().manual_seed(dist.get_rank())).to(device)
    # All variants live side by side and take their steps in turn, so that the machine's drift
    # (other load, memory bandwidth, frequency) hits every variant alike: ratios are like for like.
    cases = [build(variant, make_model, device) for variant in variants]
    clip_times: dict[str, list[float]] = {v: [] for v in variants}
    step_times: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(args.warmup + args.steps):
        for case in cases:
            clip_s, step_s = _one_step(case, x, device)
            if i >= args.warmup:
                clip_times[case.variant].append(clip_s)
                step_times[case.variant].append(step_s)
    rows = []
    for case in cases:
        rows.append({
            "variant": case.variant,
            "clip_ms": _max_over_ranks(median_ms(clip_times[case.variant])) if case.variant != "none" else 0.0,
            "step_ms": _max_over_ranks(median_ms(step_times[case.variant])),
            **_collectives_and_memory(case, x, device),
            "num_params": sum(p.numel() for p in make_model().parameters()),
        })
        case.teardown()
    _add_ratios(rows)
    return rows


def _one_step(case: Any, x: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """One training step: (clip seconds, step seconds without the untimed barriers)."""
    watch = Stopwatch(device)
    watch.mark()
    case.forward_backward(x)
    watch.mark()
    dist.barrier()  # untimed: the clip's collective must not absorb skew between ranks
    watch.mark()
    if case.clip is not None:
        case.clip()
    watch.mark()
    case.optimizer_step()
    watch.mark()
    in_step_clip, in_step_barrier = case.take_in_step()
    clip_s = in_step_clip if case.clip_in_step else watch.lap(2)
    return clip_s, watch.lap(0) + watch.lap(2) + watch.lap(3) - in_step_barrier


def _collectives_and_memory(case: Any, x: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """One more step, untimed: collectives per clip, and peak memory of the clip and of the step."""
    case.forward_backward(x)
    collectives = None
    with peak_memory_added(device) as clip_memory:
        if case.clip is not None:
            collectives = count_collectives(case.clip)
    case.count_collectives_now = True
    with peak_memory_added(device) as step_memory:
        case.optimizer_step()
    case.count_collectives_now = False
    if case.clip_in_step:
        collectives = case.step_collectives
    return {
        "collectives": collectives,
        "clip_peak_bytes": int(_max_over_ranks(float(clip_memory[0]))),
        "step_peak_bytes": int(_max_over_ranks(float(step_memory[0]))),
        "clip_in_step": case.clip_in_step,
    }


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    by = {r["variant"]: r for r in rows}
    native, none = by.get("native"), by.get("none")
    for row in rows:
        row["clip_ms_per_M"] = row["clip_ms"] / (row["num_params"] / 1e6)  # the per-element cost, any layout
        # memory the clip adds: its own peak, or (inside the step) the step's peak above no clipping's
        in_step = row["step_peak_bytes"] - (none["step_peak_bytes"] if none else 0)
        row["peak_mem_added_bytes"] = max(0, in_step) if row["clip_in_step"] else row["clip_peak_bytes"]
        if native and row["variant"].startswith("distclip") and native["clip_ms"] > 0:
            row["clip_vs_native"] = row["clip_ms"] / native["clip_ms"]
        if none and none["step_ms"] > 0:
            row["step_overhead_pct"] = 100.0 * (row["step_ms"] / none["step_ms"] - 1.0)
            row["clip_pct_of_step"] = 100.0 * row["clip_ms"] / none["step_ms"]
    for grouped in ("distclip-groups", "distclip-hook-groups", "distclip-agc"):
        uniform = by.get(grouped.removesuffix("-groups").removesuffix("-agc"))
        if grouped in by and uniform and uniform["clip_ms"] > 0:  # per layer, or unit-wise, vs uniform
            by[grouped]["groups_vs_uniform"] = by[grouped]["clip_ms"] / uniform["clip_ms"]
    for row in rows:  # an adaptive policy against the fixed one on the same groups
        fixed = by.get(row["variant"].rsplit("-", 1)[0])
        if row["variant"].split("-")[-1] in ("zclip", "autoclip", "adagc", "spikes") and fixed and fixed["clip_ms"] > 0:
            row["policy_vs_fixed"] = row["clip_ms"] / fixed["clip_ms"]


# ----------------------------------------------------------------- scaling
def _timed(fn: Callable[[], Any]) -> float:
    """Best of 3 (of 1 when a call takes over a second), the slowest rank's time of each call.

    Every rank sees the same (slowest) times, so they all stop after the same call: a rank deciding
    from its own timings alone could stop while another calls ``fn`` again and waits in its collective.
    """
    times: list[float] = []
    while len(times) < 3 and sum(times) < 1.0:
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(_max_over_ranks(time.perf_counter() - start))
    return min(times)


def _small_params(n: int, device: torch.device) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(8, 16, generator=gen).to(device)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(8, 16, generator=gen).to(device)
    return params


def _fsdp2_model(n: int, device: torch.device) -> nn.Module | None:
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return None
    module = ManySmall(_small_params(n, device))
    fully_shard(module, mesh=init_device_mesh(device.type, (dist.get_world_size(),)))
    module(torch.ones(8, 16, device=device)).backward()  # FSDP2's own unshard / reduce-scatter
    return module


class ManySmall(nn.Module):
    """Many small (LoRA-like) parameters, all used in the forward."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum((p * x).sum() for p in self.params)


def bench_scaling(sizes: list[int], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Clip time against the number of small (8x16) tensors: distclip vs torch, plain and FSDP2."""
    series: dict[str, dict[int, float | None]] = {}
    budget = args.scaling_budget

    def run(name: str, n: int, fn: Callable[[], Any]) -> None:
        done = sorted((k, v) for k, v in series.setdefault(name, {}).items() if v is not None)
        if done:  # project from the largest finished size with the growth seen so far (at least quadratic)
            exponent = 2.0
            if len(done) > 1:
                exponent = max(exponent, growth_exponent([k for k, _ in done[-2:]], [v for _, v in done[-2:]]))
            last, seconds = done[-1]
            if seconds * (n / last) ** exponent > budget:
                series[name][n] = None
                return
        series[name][n] = _timed(fn)

    for n in sizes:
        params = _small_params(n, device)
        # partial binds this iteration's values (a lambda would read the loop variables when called)
        run("torch clip_grad_norm_ (plain)", n, partial(torch.nn.utils.clip_grad_norm_, params, MAX_NORM))
        clipper = distclip.GradClipper(params, max_norm=MAX_NORM, check_consistency=False)
        run("distclip (plain)", n, clipper.clip)
        module = _fsdp2_model(n, device)
        if module is not None:
            run("torch clip_grad_norm_ (FSDP2)", n, partial(_torch_clip_module, module))
            fsdp2 = distclip.GradClipper(module, max_norm=MAX_NORM)
            if fsdp2.adapter.kind != "plain":  # an FSDP2 adapter is available
                run("distclip (FSDP2)", n, fsdp2.clip)
    out: dict[str, Any] = {"sizes": sizes, "series": {}}
    for name, times in series.items():
        measured = [(n, t) for n, t in times.items() if t is not None]
        out["series"][name] = {
            "seconds": {str(n): t for n, t in times.items()},
            "growth_exponent": (growth_exponent([n for n, _ in measured], [t for _, t in measured])
                                if len(measured) > 1 else math.nan),
        }
    return out


# --------------------------------------------------------------- bandwidth
def bench_bandwidth(megabytes: float, device: torch.device) -> dict[str, Any]:
    """Norm and norm+scale throughput on one large gradient set, against a plain copy of the same bytes."""
    numel = int(megabytes * 1e6 / 4)
    pieces = 16
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.empty(numel // pieces, device=device)) for _ in range(pieces)]
    grads = [torch.randn(numel // pieces, generator=gen).to(device) for _ in params]
    for p, g in zip(params, grads):
        p.grad = g
    copies = [torch.empty_like(g) for g in grads]
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    measure = distclip.GradClipper(params, max_norm=math.inf, nonfinite="ignore", check_consistency=False)
    # nonfinite='ignore' multiplies every gradient whatever the coefficient (here exactly 1.0):
    # the full read-modify-write of scaling is timed without changing the values.
    clip = distclip.GradClipper(params, max_norm=math.inf, nonfinite="ignore", check_consistency=False)

    def seconds(fn: Callable[[], Any]) -> float:
        fn()
        best = math.inf
        for _ in range(5):
            watch = Stopwatch(device)
            watch.mark()
            fn()
            watch.mark()
            best = min(best, watch.lap(0))
        return _max_over_ranks(best)

    copy_s = seconds(lambda: foreach_copy_(copies, grads))
    norm_s = seconds(measure.measure)
    clip_s = seconds(clip.clip)
    return {
        "gradient_bytes": nbytes,
        "copy": {"seconds": copy_s, "traffic_bytes": 2 * nbytes, "GBps": 2 * nbytes / copy_s / 1e9},
        "norm": {"seconds": norm_s, "traffic_bytes": nbytes, "GBps": nbytes / norm_s / 1e9},
        "norm_and_scale": {"seconds": clip_s, "traffic_bytes": 3 * nbytes, "GBps": 3 * nbytes / clip_s / 1e9},
    }


# ----------------------------------------------------------------- kernels
KERNEL_CASES = [(1, 50_000_000, "fp32"), (1, 16_000_000, "bf16"), (24, 2_000_000, "fp32")]  # tensors, elements, dtype
KERNEL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KERNEL_PS = (1.0, 2.0, 3.5)


def bench_kernels(scale: float, device: torch.device, repeats: int = 7) -> list[dict[str, Any]]:
    """torch's fp32 foreach norm against distclip's power_sums on the same tensors, timed in turns.

    Both give per tensor sum |t|^p (torch's norms raised to p in float64); each is compared with
    float64 on the same values (the worst tensor's relative error). ``scale`` shrinks the cases.
    """
    gen = torch.Generator().manual_seed(0)
    rows = []
    for count, numel, dtype in KERNEL_CASES:
        n = max(1, int(numel * scale))
        name = f"{count} x {_count(n)} {dtype}"
        tensors = [torch.randn(n, generator=gen).to(device=device, dtype=KERNEL_DTYPES[dtype]) for _ in range(count)]
        for p in KERNEL_PS:
            exact = [t.double().abs_().pow_(p).sum() for t in tensors]  # the float64 reference
            kernels = {"torch": partial(_torch_power_sums, tensors, p),  # this iteration's tensors and p
                       "distclip": partial(power_sums, tensors, p)}
            times: dict[str, list[float]] = {k: [] for k in kernels}
            errors = {k: _worst_rel_err(fn(), exact) for k, fn in kernels.items()}  # also a warm-up
            for r in range(repeats):
                for k in (list(kernels) if r % 2 == 0 else list(kernels)[::-1]):  # alternate who goes first
                    watch = Stopwatch(device)
                    watch.mark()
                    kernels[k]()
                    watch.mark()
                    times[k].append(watch.lap(0))
            torch_s, ours_s = _max_over_ranks(min(times["torch"])), _max_over_ranks(min(times["distclip"]))
            rows.append({"case": name, "p": p, "torch_ms": 1e3 * torch_s, "distclip_ms": 1e3 * ours_s,
                         "ratio": ours_s / torch_s,
                         "median_pair_ratio": _max_over_ranks(statistics.median(
                             o / t for o, t in zip(times["distclip"], times["torch"]))),
                         "torch_err": errors["torch"], "distclip_err": errors["distclip"]})
        del tensors, kernels  # the partials hold the tensors too: free both before the next case
    return rows


def _torch_clip_module(module: nn.Module) -> torch.Tensor:
    return torch.nn.utils.clip_grad_norm_(module.parameters(), MAX_NORM)  # a fresh generator per call


def _torch_power_sums(tensors: list[torch.Tensor], p: float) -> torch.Tensor:
    """torch's fp32 foreach norms raised to p, in float64: per tensor sum |t|^p."""
    return torch.stack(foreach_norm(tensors, p, dtype=torch.float32)).double().pow(p)


def _worst_rel_err(got: torch.Tensor, exact: list[torch.Tensor]) -> float:
    want = torch.stack(exact).to(got.device)
    return ((got - want).abs() / want.abs()).max().item()


def _count(n: int) -> str:
    """50000000 -> '50M', 20000 -> '20K'."""
    for unit, size in (("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:g}{unit}"
    return str(n)
