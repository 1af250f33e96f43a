"""Benchmark cases: a backend (DDP, FSDP1, FSDP2, DeepSpeed) wrapping the same model, with one clipping variant.

A case exposes ``forward_backward(batch)``, ``clip()`` (None when the clip runs inside the
optimizer step, as with DeepSpeed or ``attach``) and ``optimizer_step()``; clips inside the step
record their own duration in ``clip_times``. Every variant uses the same fused AdamW.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

import distclip

from .measure import count_collectives

MAX_NORM = 1e-3  # small enough that every variant really clips (the expensive case)


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(self.norm(x)))


class BenchNet(nn.Module):
    """``layers`` residual blocks (LayerNorm + Linear): 4 tensors per block, names blocks.N.*."""

    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def dim_for(params: int, layers: int) -> int:
    """Width giving about ``params`` parameters over ``layers`` blocks (d^2 + 4d each)."""
    return max(8, int(((4 + (16 + 4 * params / layers) ** 0.5) / 2) - 2))


VARIANTS = {
    "none": "no clipping",
    "native": "the backend's own clipping",
    "distclip": "distclip uniform",
    "distclip-groups": "distclip, one group per layer",
    "distclip-hook": "distclip uniform, norm inside the reduction",
    "distclip-hook-groups": "distclip per layer, norm inside the reduction",
    "distclip-hook-fold": "distclip uniform, norm inside the reduction, scale folded into the fused optimizer",
}


def clip_config(variant: str, hook: bool) -> dict[str, Any]:
    config: dict[str, Any] = {"max_norm": MAX_NORM, "comm_hook": hook, "nonfinite": "skip"}
    if variant.endswith("groups"):
        config["per_layer"] = {"depth": 2, "match": ["blocks.*"]}
    return config


@dataclass
class Case:
    backend: str
    variant: str
    model: Any
    optimizer: Any
    clip: Callable[[], Any] | None
    clip_in_step: bool = False
    clip_times: list[float] = field(default_factory=list)
    barrier_times: list[float] = field(default_factory=list)
    collectives_per_clip: Callable[[], int] | None = None  # for clips that run inside the step
    keep: list[Any] = field(default_factory=list)  # objects to release at teardown

    def forward_backward(self, x: torch.Tensor) -> None:
        self.model(x).pow(2).mean().backward()

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def teardown(self) -> None:
        self.model = self.optimizer = self.clip = None
        self.keep.clear()
        gc.collect()


def timed(case: "Case", fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``fn`` so that each call's duration lands in ``case.clip_times`` (clips run inside a step)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        arrived = time.perf_counter()
        dist.barrier()  # as for the other variants: the clip's collective must not absorb skew
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            case.clip_times.append(time.perf_counter() - start)
            case.barrier_times.append(start - arrived)

    return run


def build_ddp(variant: str, make_model: Callable[[], nn.Module], device: torch.device) -> Case:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model().to(device), device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    case = Case("ddp", variant, model, optimizer, None)
    if variant == "native":
        params = list(model.parameters())
        case.clip = lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM)  # exact: DDP grads are replicated
    elif variant == "distclip-hook-fold":
        clipper = distclip.GradClipper(model, clip_config(variant, hook=True))
        clipper._run = timed(case, clipper._run)  # the clip runs inside optimizer.step()
        case.keep.append(clipper.attach(optimizer, fold=True))
        case.clip_in_step = True
        case.collectives_per_clip = lambda: count_collectives(clipper.measure)
    elif variant.startswith("distclip"):
        case.clip = distclip.GradClipper(model, clip_config(variant, hook="hook" in variant)).clip
    return case


BACKENDS: dict[str, tuple[Callable[..., Case], list[str]]] = {
    "ddp": (build_ddp, ["none", "native", "distclip", "distclip-groups", "distclip-hook", "distclip-hook-groups",
                        "distclip-hook-fold"]),
}


def available_backends() -> list[str]:
    return list(BACKENDS)


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
