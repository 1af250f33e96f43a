"""Clip time with many small FSDP2 parameters: distclip against torch.nn.utils.clip_grad_norm_.

    torchrun --nproc_per_node 2 launch/bench_fsdp2_many_params.py --params 500 2000 --torch-up-to 2000 [--per-module]

torch's clip stacks one DTensor norm per parameter (quadratic in their number: pytorch #169445);
distclip takes local foreach norms and one all-reduce. Prints, per size, the median wall time of
each and the relative difference of the two norms (rank 0).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import distclip


class Small(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(8, 16))
        self.scale = scale

    def forward(self) -> torch.Tensor:
        return (self.weight * self.scale).sum()


class ManySmall(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.layers = nn.ModuleList(Small(i % 7 + 1) for i in range(n))

    def forward(self) -> torch.Tensor:
        return sum(layer() for layer in self.layers)


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--torch-up-to", type=int, default=2000, help="skip torch's clip above this many parameters")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-module", action="store_true", help="fully_shard every small layer (one FSDP group each)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for n in args.params:
        torch.manual_seed(0)
        model = ManySmall(n)
        if args.per_module:
            for layer in model.layers:
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model().backward()
        clipper = distclip.GradClipper(model, {"max_norm": 1e9, "comm_hook": False})
        ours_s, ours = timed(lambda: clipper.clip().total_norm, args.repeats)
        line = f"{n:6d} params | distclip {ours_s * 1e3:9.1f} ms"
        if n <= args.torch_up_to:
            def torch_clip() -> torch.Tensor:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
                return norm.full_tensor() if isinstance(norm, DTensor) else norm

            theirs_s, theirs = timed(torch_clip, args.repeats)
            line += f" | torch {theirs_s * 1e3:9.1f} ms | norms differ by {abs(ours.item() - theirs.item()) / theirs.item():.1e}"
        if dist.get_rank() == 0:
            print(line, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
