"""What a bad step costs: a good clip against an attributed non-finite one, and the attribution alone.

    python launch/bench_bad_steps.py [--layers 24] [--width 256] [--reps 15] [--world 2]

On ``--world`` gloo ranks (``distclip.testing.run_ranks``), for DDP and FSDP2: a model of ``--layers``
Linear layers, its gradients saved once and restored before every clip; the bad clips get a NaN in
one element that rank 1 holds (and counts). Per kind, the median over ``--reps`` clips (after 3
warm-up clips) and the c10d collectives each clip issued (``CommDebugMode``); then the attribution
on its own (``clipper._attribute``, the bad step's extra all-gather included). One line per layout.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from distclip.testing import run_ranks


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def bench(layout: str, layers: int, width: int, reps: int) -> dict:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    if layout == "fsdp2":
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        target = model
    else:
        target = DDP(model)
        model = target.module
    clipper = distclip.GradClipper(target, {"max_norm": 1.0, "comm_hook": False})
    target(torch.randn(8, width)).square().mean().backward()
    params = list(model.parameters())
    saved = [p.grad.detach().clone() for p in params]
    poisoned = params[layers]  # a weight in the second half: rank 1 holds (and counts) its last element

    def restore(bad: bool) -> None:
        for p, g in zip(params, saved):
            p.grad = g.clone()
        if bad and dist.get_rank() == 1:
            with torch.no_grad():
                local(poisoned.grad).view(-1)[-1] = math.nan

    out: dict = {}
    for kind in ("good", "bad"):
        times, collectives, report = [], 0, None
        for i in range(reps + 3):
            restore(kind == "bad")
            dist.barrier()
            start = time.perf_counter()
            with CommDebugMode() as comm:
                report = clipper.clip()
            if i >= 3:
                times.append(time.perf_counter() - start)
            collectives = comm.get_total_counts()
        out[kind] = (statistics.median(times) * 1e3, collectives, report.nonfinite_params, report.nonfinite_ranks)
    times = []
    for _ in range(reps):
        restore(True)
        dist.barrier()
        start = time.perf_counter()
        clipper._attribute()
        times.append(time.perf_counter() - start)
    out["alone"] = statistics.median(times) * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    for layout in ("ddp", "fsdp2"):
        r = run_ranks(bench, args.world, layout, args.layers, args.width, args.reps, timeout=900)[0]
        print(f"{layout}: {2 * args.layers} params ({args.layers} x Linear {args.width}) | good clip {r['good'][0]:.2f} ms, "
              f"{r['good'][1]} collective(s) | bad clip {r['bad'][0]:.2f} ms, {r['bad'][1]} collectives, found "
              f"{r['bad'][2]} on ranks {r['bad'][3]} | the attribution alone {r['alone']:.2f} ms")


if __name__ == "__main__":
    main()
