"""What logging every clip costs the demo: the demo's training step with and without a JSONL sink.

    torchrun --nproc_per_node 2 launch/bench_clip_logging.py [--blocks 20] [--block-steps 10]

The demo's model, data and optimizer (distclip.demo), one clipper attached to the
optimizer. The two variants take their blocks of steps in turn, in A B B A order (position
effects cancel), so drift and other load on the machine hit both alike; the figure is the median,
over adjacent pairs, of the ratio of their block times. Also timed on its own: one write
(``ClipReport.to_metrics`` + the JSON line), on rank 0, the only rank that writes; on a busy
machine that is the steadier figure. Prints one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from distclip.core.sinks import MetricsLog


def load_demo():
    import distclip.demo

    return distclip.demo


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--blocks", type=int, default=20, help="blocks per variant")
    parser.add_argument("--block-steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    demo = load_demo()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(0)
    model = DDP(demo.CharLSTM())
    optimizer = torch.optim.SGD(model.parameters(), lr=20.0)
    clipper = distclip.GradClipper(model, args.config)
    clipper.attach(optimizer)
    folder = tempfile.mkdtemp(prefix="distclip-bench-")
    quiet = clipper.log  # no sinks
    logging = MetricsLog(clipper.adapter.reduce_group, info=clipper.log_info)
    logging.add(distclip.JSONLSink(os.path.join(folder, "bench.jsonl")))  # every clip, rank 0
    text = demo.stdlib_text(200_000)
    generator = torch.Generator().manual_seed(1 + rank)

    def step() -> None:
        tokens, targets = demo.sample(text, 16, 64, generator)
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    times: dict[str, list[float]] = {"off": [], "jsonl_every_step": []}
    for block in range(2 * args.blocks):
        name = "off" if block % 4 in (0, 3) else "jsonl_every_step"  # A B B A  A B B A ...
        clipper.log = quiet if name == "off" else logging
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.block_steps):
            step()
        times[name].append((time.perf_counter() - start) / args.block_steps)
    clipper.log = quiet
    logging.close()
    per_write = None
    if rank == 0:  # one write on its own: to_metrics (one host read) + a JSON line, flushed
        sink = MetricsLog(None, info=clipper.log_info)
        sink.add(distclip.JSONLSink(os.path.join(folder, "writes.jsonl")))
        report = clipper.last_report
        start = time.perf_counter()
        for i in range(1, 2001):
            sink.observe(report, i)
        per_write = (time.perf_counter() - start) / 2000
        sink.close()
    off, on = statistics.median(times["off"]), statistics.median(times["jsonl_every_step"])
    paired = statistics.median(b / a for a, b in zip(times["off"], times["jsonl_every_step"]))
    if rank == 0:
        print(json.dumps({
            "world": world, "threads_per_rank": torch.get_num_threads(), "blocks": args.blocks,
            "block_steps": args.block_steps, "step_ms_off": round(1e3 * off, 3), "step_ms_jsonl": round(1e3 * on, 3),
            "overhead_pct_paired": round(100 * (paired - 1), 2), "overhead_pct_medians": round(100 * (on / off - 1), 2),
            "write_us": round(1e6 * per_write, 1), "write_pct_of_step": round(100 * per_write / off, 3),
            "groups": len(clipper.group_names)}))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
