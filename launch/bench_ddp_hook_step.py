"""Whole-step cost of DDP's norm hook: forward + backward + clip, with and without a comm hook.

The clip-time tables of ``distclip bench`` cannot show it: with the hook the norm is paid
inside backward. Four models with the same weights take their steps in turn:

* ``nohook``: DDP's built-in C++ reduction, then ``torch.nn.utils.clip_grad_norm_``;
* ``torch_py_hook``: torch's own ``default_hooks.allreduce_hook`` registered, then torch's clip;
* ``distclip_hook``: ``GradClipper(model, config)`` with ``comm_hook: true`` (the hook, forced on CPU);
* ``distclip_post``: the same with ``comm_hook: false`` (what the default, ``auto``, picks on CPU).

    torchrun --nproc_per_node 2 launch/bench_ddp_hook_step.py --blocks 48   # ~48M parameters
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip

MAX_NORM = 1e-3  # low enough that every variant clips


def build(blocks: int, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, width)) for _ in range(blocks)]
    return torch.nn.Sequential(*layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=48, help="LayerNorm + Linear blocks (~1M parameters each)")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20, help="measured steps (median reported)")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    x = torch.randn(16, args.width)
    variants: dict[str, tuple[DDP, distclip.GradClipper | None]] = {}
    variants["nohook"] = (DDP(build(args.blocks, args.width)), None)
    hooked = DDP(build(args.blocks, args.width))
    hooked.register_comm_hook(dist.group.WORLD, default_hooks.allreduce_hook)
    variants["torch_py_hook"] = (hooked, None)
    for name, hook in (("distclip_hook", True), ("distclip_post", False)):
        model = DDP(build(args.blocks, args.width))
        variants[name] = (model, distclip.GradClipper(model, {"max_norm": MAX_NORM, "comm_hook": hook}))

    times: dict[str, dict[str, list[float]]] = {k: {"backward": [], "clip": []} for k in variants}
    for step in range(args.warmup + args.steps):
        for name, (model, clipper) in variants.items():  # in turns, so drift hits all alike
            model.zero_grad(set_to_none=False)
            dist.barrier()
            start = time.perf_counter()
            model(x).pow(2).mean().backward()
            dist.barrier()
            mid = time.perf_counter()
            if clipper is None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
            else:
                clipper.clip()
            dist.barrier()
            if step >= args.warmup:
                times[name]["backward"].append(mid - start)
                times[name]["clip"].append(time.perf_counter() - mid)

    if dist.get_rank() == 0:
        params = sum(p.numel() for p in variants["nohook"][0].parameters()) / 1e6
        print(f"{params:.1f}M parameters, {dist.get_world_size()} ranks ({dist.get_backend()}), "
              f"median of {args.steps} steps")
        for name, t in times.items():
            backward, clip = (statistics.median(t[k]) * 1e3 for k in ("backward", "clip"))
            print(f"{name:14s} fwd+bwd {backward:7.2f} ms  clip {clip:6.2f} ms  total {backward + clip:7.2f} ms")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
