"""Benchmark cases: a backend (DDP, FSDP1, FSDP2, FSDP2 + TP, pipeline, DeepSpeed) wrapping the same model,
with one clipping variant.

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
from torch.distributed.tensor.debug import CommDebugMode

import distclip

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
        self.blocks: nn.ModuleList = nn.ModuleList(Block(dim) for _ in range(layers))

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
    "distclip-agc": "distclip row-wise AGC (policy kind agc): every row against its weights' row norm",
}
AGC_CLIP_FACTOR = 1e-3  # small enough that most rows clip


POLICY_SPECS = {  # the adaptive policies, for the ddp-policies rows
    "zclip": {"kind": "zclip", "warmup_steps": 2},
    "autoclip": {"kind": "autoclip", "quantile": 0.9, "history_length": 1000},
    "adagc": {"kind": "adagc", "warmup_steps": 2},
}


def clip_config(variant: str, hook: bool) -> dict[str, Any]:
    """``distclip[-hook][-groups|-pertensor][-<policy>|-spikes]``: the distclip config of a variant."""
    config: dict[str, Any] = {"max_norm": MAX_NORM, "comm_hook": hook, "nonfinite": "skip"}
    parts = variant.split("-")
    if "groups" in parts:
        config["per_layer"] = {"depth": 2, "match": ["blocks.*"]}
    if "pertensor" in parts:
        config["per_parameter"] = True
    policy = next((POLICY_SPECS[p] for p in parts if p in POLICY_SPECS), None)
    if policy is not None:
        config["policy"] = policy
    if "spikes" in parts:
        config["skip_spikes"] = {"window": 128, "sigma_factor": 6.0, "min_observations": 16}
    if parts[-1] == "agc":  # not "...-adagc"
        config["policy"] = {"kind": "agc", "clip_factor": AGC_CLIP_FACTOR}
    return config


@dataclass
class Case:
    backend: str
    variant: str
    model: Any
    optimizer: Any
    clip: Callable[[], Any] | None
    clip_in_step: bool = False  # the clip runs inside optimizer_step(), timed by in_step() wrappers
    step_clip_seconds: float = 0.0  # this step's in-step clip time, and the barrier time it excluded
    step_barrier_seconds: float = 0.0
    step_collectives: int = 0
    count_collectives_now: bool = False
    keep: list[Any] = field(default_factory=list)  # objects to release at teardown

    def forward_backward(self, x: torch.Tensor) -> None:
        self.model(x).pow(2).mean().backward()

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def take_in_step(self) -> tuple[float, float]:
        """(clip seconds, barrier seconds) of the step just run; resets both."""
        out = (self.step_clip_seconds, self.step_barrier_seconds)
        self.step_clip_seconds = self.step_barrier_seconds = 0.0
        return out

    def teardown(self) -> None:
        destroy = getattr(self.model, "destroy", None)  # DeepSpeed engines release their hooks and buffers
        if destroy is not None:
            destroy()
        self.model = self.optimizer = self.clip = None
        self.keep.clear()
        gc.collect()


def in_step(case: Case, fn: Callable[..., Any], barrier: bool = True) -> Callable[..., Any]:
    """Wrap a function the optimizer step calls to clip: its time (and collectives) count as the clip's.

    ``barrier``: first synchronise the ranks, untimed, as the runner does before explicit clips, so
    that the clip's collective does not absorb skew between ranks.
    """

    def run(*args: Any, **kwargs: Any) -> Any:
        arrived = time.perf_counter()
        if barrier:
            dist.barrier()
        start = time.perf_counter()
        try:
            if case.count_collectives_now:
                with CommDebugMode() as comm:
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)
        finally:
            case.step_clip_seconds += time.perf_counter() - start
            case.step_barrier_seconds += start - arrived
            if case.count_collectives_now:
                case.step_collectives += comm.get_total_counts()

    return run


def build_ddp(variant: str, make_model: Callable[[], BenchNet], device: torch.device) -> Case:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model().to(device), device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    case = Case("ddp", variant, model, optimizer, None)
    if variant == "native":
        params = list(model.parameters())
        case.clip = lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM)  # exact: DDP grads are replicated
    elif variant == "distclip-hook-fold":
        clipper = distclip.GradClipper(model, clip_config(variant, hook=True))
        clipper.clip = in_step(case, clipper.clip)  # type: ignore[method-assign]  # the clip runs inside optimizer.step()
        case.keep.append(clipper.attach(optimizer, fold=True))
        case.clip_in_step = True
    elif variant.startswith("distclip"):
        case.clip = distclip.GradClipper(model, clip_config(variant, hook="hook" in variant)).clip
    return case


def build_fsdp1(variant: str, make_model: Callable[[], BenchNet], device: torch.device) -> Case:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    model = FSDP(make_model(), device_id=device, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    case = Case("fsdp1", variant, model, optimizer, None)
    if variant == "native":
        case.clip = lambda: model.clip_grad_norm_(MAX_NORM)
    elif variant.startswith("distclip"):
        case.clip = distclip.GradClipper(model, clip_config(variant, hook="hook" in variant)).clip
    return case


def build_fsdp2(variant: str, make_model: Callable[[], BenchNet], device: torch.device) -> Case:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model().to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    case = Case("fsdp2", variant, model, optimizer, None)
    if variant == "native":
        params = list(model.parameters())
        # the full norm (a DTensor here: torch annotates clip_grad_norm_'s result as a Tensor)
        case.clip = lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM).full_tensor()  # type: ignore[attr-defined]
    elif variant.startswith("distclip"):
        case.clip = distclip.GradClipper(model, clip_config(variant, hook="hook" in variant)).clip
    return case


SHARDED_VARIANTS = ["none", "native", "distclip", "distclip-groups", "distclip-hook", "distclip-hook-groups",
                    "distclip-agc"]
ND_VARIANTS = [v for v in SHARDED_VARIANTS if v != "distclip-agc"]
TP = PP = 2  # the tensor- and pipeline-parallel sizes of the N-D rows (the rest of the world is dp)


def nd_mesh(device: torch.device, names: tuple[str, str]) -> Any:
    """The (dp, tp) mesh with tp = TP, or the (pp, dp) mesh with pp = PP, over the world."""
    from torch.distributed.device_mesh import init_device_mesh

    if world() % 2:
        raise SystemExit(f"the {names} benchmark needs an even number of ranks, got {world()}")
    shape = (world() // TP, TP) if names == ("dp", "tp") else (PP, world() // PP)
    return init_device_mesh(device.type, shape, mesh_dim_names=names)


def build_fsdp2_tp(variant: str, make_model: Callable[[], BenchNet], device: torch.device) -> Case:
    """torchtitan-style 2-D: each block's LayerNorm SequenceParallel (over the batch dimension) and its
    Linear ColwiseParallel over tp=2, then fully_shard over dp (world / 2). Every parameter is a
    DTensor on the (dp, tp) mesh, so torch's own clip works on it (the native row)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, SequenceParallel, parallelize_module

    mesh = nd_mesh(device, ("dp", "tp"))
    model = make_model().to(device)
    for block in model.blocks:
        parallelize_module(block, mesh["tp"], {
            "norm": SequenceParallel(sequence_dim=0),
            "linear": ColwiseParallel(input_layouts=Shard(0), output_layouts=Shard(0)),
        })
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    case = Case("fsdp2-tp", variant, model, optimizer, None)
    if variant == "native":
        params = list(model.parameters())
        case.clip = lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM).full_tensor()  # type: ignore[attr-defined]
    elif variant.startswith("distclip"):
        case.clip = distclip.GradClipper(model, clip_config(variant, hook="hook" in variant)).clip
    return case


class PipelineStageNet(nn.Module):
    """Consecutive blocks of a BenchNet under their full names (``blocks.N``)."""

    def __init__(self, model: BenchNet, first: int, last: int):
        super().__init__()
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in range(first, last)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks.values():
            x = block(x)
        return x


class PipelineCase(Case):
    """pp=2: stage 0's output goes to stage 1 (same dp coordinate) by send/recv, its gradient back."""

    stage: int = 0
    peer: int = 0

    def forward_backward(self, x: torch.Tensor) -> None:
        if self.stage == 0:
            out = self.model(x)
            dist.send(out.detach().contiguous(), self.peer)
            grad = torch.empty_like(out)
            dist.recv(grad, self.peer)
            out.backward(grad)
        else:
            activation = torch.empty_like(x)
            dist.recv(activation, self.peer)
            activation.requires_grad_()
            self.model(activation).pow(2).mean().backward()
            assert activation.grad is not None  # a leaf that requires grad, after backward
            dist.send(activation.grad.contiguous(), self.peer)


def build_pipeline(variant: str, make_model: Callable[[], BenchNet], device: torch.device) -> Case:
    """pp=2 x dp (world / 2): half the blocks per stage, DDP over dp when dp > 1. The native row is
    torchtitan's recipe: torch's get_total_norm of the stage's gradients, all_reduce of norm^p over pp,
    clip_grads_with_norm_."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    mesh = nd_mesh(device, ("pp", "dp"))
    pp_rank, dp_rank = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    full = make_model()
    half = len(full.blocks) // PP
    stage: nn.Module = PipelineStageNet(full, pp_rank * half, len(full.blocks) if pp_rank else half).to(device)
    if mesh["dp"].size() > 1:
        stage = DDP(stage, device_ids=[device.index] if device.type == "cuda" else None,
                    process_group=mesh["dp"].get_group())
    optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-4, fused=True)
    case = PipelineCase("pipeline", variant, stage, optimizer, None)
    case.stage = pp_rank
    case.peer = int(mesh.mesh[1 - pp_rank, dp_rank])
    pp_group = mesh["pp"].get_group()
    if variant == "native":
        params = list(stage.parameters())

        def native() -> torch.Tensor:
            total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], 2.0)
            total = total ** 2
            dist.all_reduce(total, group=pp_group)
            total = total ** 0.5
            torch.nn.utils.clip_grads_with_norm_(params, MAX_NORM, total)
            return total

        case.clip = native
    elif variant.startswith("distclip"):
        case.clip = distclip.GradClipper(stage, clip_config(variant, hook="hook" in variant),
                                         pipeline_group=mesh["pp"]).clip
    return case


class DeepSpeedCase(Case):
    """DeepSpeed steps (and clips) inside ``engine.step()``: the clip is timed by wrapping the
    optimizer's norm and clip functions, the same ones for DeepSpeed's clipping and distclip's."""

    def forward_backward(self, x: torch.Tensor) -> None:
        self.model.backward(self.model(x).pow(2).mean())

    def optimizer_step(self) -> None:
        self.model.step()


def build_deepspeed(stage: int) -> Callable[[str, Callable[[], BenchNet], torch.device], Case]:
    def build(variant: str, make_model: Callable[[], BenchNet], device: torch.device) -> Case:
        import deepspeed

        from distclip.integrations.deepspeed import attach  # = distclip.deepspeed.attach (mypy sees this path)

        model = make_model()
        config = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": stage},
                  "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
                  "gradient_clipping": MAX_NORM if variant == "native" else 0.0}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        case = DeepSpeedCase(f"deepspeed-zero{stage}", variant, engine, engine.optimizer, None, clip_in_step=True)
        if variant.startswith("distclip"):
            attach(engine, clip_config(variant, hook=False))
        inner = engine.optimizer
        norm_fn = "_get_norm_groups" if stage == 3 else "scaled_global_norm"
        setattr(inner, norm_fn, in_step(case, getattr(inner, norm_fn)))
        inner.unscale_and_clip_grads = in_step(case, inner.unscale_and_clip_grads, barrier=False)
        case.keep.append(engine)
        return case

    return build


DEEPSPEED_VARIANTS = ["none", "native", "distclip", "distclip-groups", "distclip-agc"]

BACKENDS: dict[str, tuple[Callable[..., Case], list[str]]] = {
    "ddp": (build_ddp, ["none", "native", "distclip", "distclip-groups", "distclip-hook", "distclip-hook-groups",
                        "distclip-hook-fold", "distclip-agc"]),
    # the adaptive policies against the fixed one, same model and groups (25 per layer, or one per tensor)
    "ddp-policies": (build_ddp, ["none", "native", "distclip-hook-groups", "distclip-hook-groups-zclip",
                                 "distclip-hook-groups-autoclip", "distclip-hook-groups-spikes",
                                 "distclip-hook-pertensor", "distclip-hook-pertensor-adagc"]),
    "fsdp1": (build_fsdp1, SHARDED_VARIANTS),
    "fsdp2": (build_fsdp2, SHARDED_VARIANTS),
    "fsdp2-tp": (build_fsdp2_tp, ND_VARIANTS),  # agc refuses tensor-parallel shards and pipelines
    "pipeline": (build_pipeline, ND_VARIANTS),
    "deepspeed-zero1": (build_deepspeed(1), DEEPSPEED_VARIANTS),
    "deepspeed-zero2": (build_deepspeed(2), DEEPSPEED_VARIANTS),
    "deepspeed-zero3": (build_deepspeed(3), DEEPSPEED_VARIANTS),
}


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
