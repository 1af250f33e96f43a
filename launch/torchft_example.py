"""One torchft replica group training with distclip (docs/guides/torchft.md runs it).

Start a Lighthouse, then one torchrun job per replica group (each may have several ranks)::

    torchft_lighthouse --min_replicas 2 --join_timeout_ms 1000 &
    REPLICA_GROUP_ID=0 torchrun --nproc_per_node 1 --master_port 29600 launch/torchft_example.py
    REPLICA_GROUP_ID=1 torchrun --nproc_per_node 1 --master_port 29601 launch/torchft_example.py

``--fsdp`` shards the model with ``fully_shard`` over the group's ranks (run it with ``--nproc_per_node 2``)
and averages over the replica groups in FSDP's all-reduce hook, as torchtitan's torchft trainer does.
Each rank prints one line per step: the participants, distclip's norms and coefficients.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import torchft
from torchft.process_group import ManagedProcessGroup

import distclip
import distclip.integrations.torchft

CONFIG = {"max_norm": 0.5, "norm_type": 2.0,
          "groups": [{"name": "embed", "match": ["embed.*"], "max_norm": 0.1}]}


def build(args: argparse.Namespace, manager: torchft.Manager) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights in every replica group
    model = nn.Sequential()
    model.add_module("embed", nn.Linear(32, 64))
    model.add_module("act", nn.GELU())
    model.add_module("head", nn.Linear(64, 8))
    if not args.fsdp:
        return torchft.DistributedDataParallel(manager, model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp_shard",))
    for layer in (model.embed, model.head):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    replicate = ManagedProcessGroup(manager)

    def average_over_replica_groups(output: torch.Tensor) -> None:
        dist.all_reduce(output, group=replicate, op=dist.ReduceOp.AVG)

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_all_reduce_hook(average_over_replica_groups)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compare", action="store_true", help="also print torch's norm of the averaged gradients")
    parser.add_argument("--min-replicas", type=int, default=2, help="replica groups a step needs (torchft's min_replica_size)")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to wait after each step (to watch a replica leave)")
    args = parser.parse_args()
    replica_group = int(os.environ.get("REPLICA_GROUP_ID", "0"))
    if args.fsdp:
        dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    manager = torchft.Manager(
        pg=torchft.ProcessGroupGloo(timeout=timedelta(seconds=10)), min_replica_size=args.min_replicas,
        load_state_dict=lambda s: (model.load_state_dict(s["model"]), inner.load_state_dict(s["optim"])),
        state_dict=lambda: {"model": model.state_dict(), "optim": inner.state_dict()},
        replica_id=f"example_{replica_group}", timeout=timedelta(seconds=10), init_sync=not args.fsdp)
    model = build(args, manager)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer = torchft.Optimizer(manager, inner)  # torchft's OptimizerWrapper

    clipper = distclip.GradClipper(model, CONFIG, comm_hook=False)
    distclip.integrations.torchft.attach(clipper, optimizer)  # clips after should_commit(), heals with the model

    rank = dist.get_rank() if dist.is_initialized() else 0
    data = torch.Generator().manual_seed(1000 * replica_group + rank)
    while manager.current_step() < args.steps:
        optimizer.zero_grad()
        x = torch.randn(16, 32, generator=data)
        y = torch.randint(0, 8, (16,), generator=data)
        nn.functional.cross_entropy(model(x), y).backward()
        if args.compare:  # torch's own norm of the same (averaged) gradients, before the clip
            torch_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
            torch_norm = torch_norm.full_tensor() if hasattr(torch_norm, "full_tensor") else torch_norm
        step = manager.current_step()
        optimizer.step()  # steps (and clips) only if torchft commits the step
        if manager.current_step() == step:
            print(f"replica_group={replica_group} rank={rank} step {step + 1} not committed: not clipped, not stepped",
                  flush=True)
            continue
        report = clipper.last_report
        groups = " ".join(f"{g}={report.group_norms[g].item():.6f}(x{report.coefs[g].item():.4f})" for g in report.group_norms)
        print(f"replica_group={replica_group} rank={rank} step={manager.current_step()} "
              f"participants={manager.num_participants()} total_norm={report.total_norm.item():.9f} {groups}"
              + (f" torch={torch_norm.item():.9f}" if args.compare else ""), flush=True)
        time.sleep(args.sleep)
    manager.shutdown(wait=False)
    if args.fsdp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
