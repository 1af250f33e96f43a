"""On a CUDA machine: a DDP step with distclip under ``torch.cuda.set_sync_debug_mode("error")``.

    torchrun --nproc_per_node 1 launch/cuda_sync_check.py          # or more GPUs

With ``nonfinite: ignore`` (torch semantics) the clip must not synchronise the host with the device
at all, inside the DDP comm hook or in the clip: any synchronising call raises here. (The other
nonfinite modes make exactly one documented sync per clip, to decide on the reduced norm.) CI has
no GPU; ``tests/core/test_host_sync.py`` checks the same on CPU by counting calls.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip


def main() -> int:
    if not torch.cuda.is_available():
        print("cuda_sync_check: no CUDA device here; nothing to check")
        return 0
    dist.init_process_group("nccl")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    model = DDP(nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 256)).to(device), device_ids=[device.index])
    config = {"max_norm": 0.1, "nonfinite": "ignore", "groups": [{"name": "first", "match": ["0.*"]}]}
    clipper = distclip.GradClipper(model, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    clipper.attach(optimizer, fold=False)
    x = torch.randn(32, 256, device=device)
    for step in range(5):
        if step == 3:  # warm-up done: plans and device constants are cached
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.set_sync_debug_mode("default")
    report = clipper.last_report
    if dist.get_rank() == 0:
        print(f"cuda_sync_check: OK, 2 steps without a host sync; last report {report} (source {report.source})")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
