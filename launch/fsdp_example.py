"""distclip under FSDP1 or FSDP2 on CPU (gloo): per-group clipping by original parameter names.

    torchrun --nproc_per_node 2 launch/fsdp_example.py --fsdp 1 --strategy FULL_SHARD
    torchrun --nproc_per_node 2 launch/fsdp_example.py --fsdp 2
    torchrun --nproc_per_node 4 launch/fsdp_example.py --fsdp 2 --mesh 2 2          # HSDP
    torchrun --nproc_per_node 4 launch/fsdp_example.py --fsdp 1 --strategy HYBRID_SHARD

Prints, on rank 0, each step's exact global norm, per-group norms and coefficients, and whether
the norm was computed inside FSDP's reduction (comm_hook) or after backward.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import distclip

CONFIG = {
    "max_norm": 1.0,
    "groups": [
        {"name": "embed", "match": ["embed.*"], "max_norm": 0.05},
        {"name": "blocks", "match": ["blocks.*"], "max_norm": 0.5},
    ],
    "comm_hook": True,  # measured inside FSDP's reduction here on CPU too (auto does that with NCCL on CUDA only)
}


class Net(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 24, depth: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU()) for _ in range(depth))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def wrap(model: Net, args: argparse.Namespace) -> nn.Module:
    if args.fsdp == 2:
        from torch.distributed.fsdp import fully_shard

        shape = tuple(args.mesh or [dist.get_world_size()])
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard")[-len(shape):])

        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    hybrid = "HYBRID" in args.strategy
    return FSDP(model, sharding_strategy=ShardingStrategy[args.strategy], device_id=torch.device("cpu"),
                auto_wrap_policy=ModuleWrapPolicy({nn.Sequential}), use_orig_params=args.use_orig_params,
                device_mesh=init_device_mesh("cpu", (dist.get_world_size() // 2, 2)) if hybrid else None)  # (replicate, shard)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fsdp", type=int, choices=[1, 2], default=2)
    parser.add_argument("--strategy", default="FULL_SHARD", help="FSDP1 sharding strategy")
    parser.add_argument("--use-orig-params", action="store_true")
    parser.add_argument("--mesh", type=int, nargs="+", help="FSDP2 mesh shape, e.g. 2 2 for HSDP")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = wrap(Net(), args)
    clipper = distclip.GradClipper(model, CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    clipper.attach(optimizer)  # clip right before every optimizer.step()
    rank = dist.get_rank()
    for step in range(args.steps):
        g = torch.Generator().manual_seed(100 * step + rank)
        tokens = torch.randint(0, 50, (8, 12), generator=g)
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(1, dims=1).flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        report = clipper.last_report
        if rank == 0:
            print(f"step {step} loss {loss.item():.4f} | {report} | {report.source}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
