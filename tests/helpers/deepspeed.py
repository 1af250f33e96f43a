"""DeepSpeed test helpers shared by the test modules: engine configs, teardown, gathered parameters, counts."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor.debug import CommDebugMode

MICRO = 4  # train_micro_batch_size_per_gpu of the test engines


def ds_config(stage: int, **extra: Any) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": MICRO, "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, **extra}


def close(engine) -> None:
    engine.destroy()  # no gc.collect() here: it costs about 1 s per engine with DeepSpeed's heap


def full_params(engine) -> dict[str, torch.Tensor]:
    named = list(engine.module.named_parameters())
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().double().clone() for n, p in named}
    return {n: p.detach().double().clone() for n, p in named}


def count_clip_collectives(clipper) -> list[int]:
    """c10d collectives issued inside each clip (norm, reduction, coefficients), one entry per clip."""
    counts: list[int] = []
    run = clipper.clip

    def counted(*args, **kwargs):
        with CommDebugMode() as comm:
            report = run(*args, **kwargs)
        counts.append(comm.get_total_counts())
        return report

    clipper.clip = counted
    return counts


def error_of(fn) -> str | None:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the test inspects type and message
        return f"{type(err).__name__}: {err}"
    return None


def precision(prec: str, **fp16_args: Any) -> dict[str, Any]:
    if prec == "bf16":
        return {"bf16": {"enabled": True}}
    # DeepSpeed's CPU accelerator refuses fp16 unless the CPU has native fp16 (AVX512-FP16/AMX): this
    # shim lifts only that capability check; the fp16 ZeRO path (loss scaling, overflow, unscale) runs as is.
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True
    return {"fp16": {"enabled": True, "initial_scale_power": 8, "hysteresis": 1, **fp16_args}}
