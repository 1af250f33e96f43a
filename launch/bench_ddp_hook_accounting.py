"""Per-step cost of the DDP comm hook's accounting: fixed blocks (now) against per-bucket slices (before).

Before, the hook measured each bucket as it was reduced (each rank a 1/world slice of the bucket,
summed bucket by bucket): cheap, but the bits depended on DDP's buckets, which it rebuilds after
the first iteration. Now each rank counts its slice of fixed blocks of parameters, measured once a
block's parameters are reduced, and sums the pieces in parameter order
(:mod:`distclip.adapters.blocks`). Four DDP models with the same weights take their steps in turn:

* ``per_bucket``: the previous hook, reproduced below (its code as it was in distclip);
* ``per_block``: ``GradClipper(model, {"comm_hook": True})``, the hook as it is now;
* ``post_backward``: ``comm_hook: false`` (what ``auto`` picks on CPU);
* ``torch``: DDP's own reduction, then ``torch.nn.utils.clip_grad_norm_``.

    torchrun --nproc_per_node 2 launch/bench_ddp_hook_accounting.py --blocks 10   # ~10M parameters
"""

from __future__ import annotations

import argparse
import statistics
import time
from itertools import accumulate

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from distclip.adapters.counting import LocalPiece, counted_segments
from distclip.adapters.hooks import ReductionHook
from distclip.core.norms import local_partials

MAX_NORM = 1e-3  # low enough that every variant clips


class PerBucketHook(ReductionHook):
    """distclip's previous DDP hook: this rank's slice of each reduced bucket, summed bucket by bucket."""

    def __init__(self, adapter):
        super().__init__(adapter.layout)
        self.adapter = adapter
        self._index_of = {id(p): i for i, p in enumerate(adapter.params)}
        self._plans: dict = {}
        self._num_buckets = None

    def on_new_backward(self) -> None:
        self._num_buckets = None

    def reduce_and_measure(self, _state, bucket):
        self.begin()
        index = bucket.index()
        slices, groups = self._plan(index, bucket.parameters())
        if bucket.is_last():
            self._num_buckets = index + 1
        device = self.adapter.collective_device([bucket.buffer()])

        def measure(fut):
            value = fut.value()
            flat = (value[0] if isinstance(value, list) else value).view(-1)
            self.record(index, local_partials([flat[a:b] for a, b in slices], groups, self.layout, device))
            return value[0] if isinstance(value, list) else value

        return default_hooks.allreduce_hook(self.adapter.ddp.process_group, bucket).then(measure)

    def _plan(self, index, params):
        key = tuple(id(p) for p in params)
        cached = self._plans.get(index)
        if cached is None or cached[0] != key:
            offsets = [0, *accumulate(p.numel() for p in params)]
            indices = [self._index_of[id(p)] for p in params]
            pieces = [LocalPiece(0, offsets[k], p.numel(), i, self.adapter.pieces[i].replicas)
                      for k, (p, i) in enumerate(zip(params, indices))]
            segments = counted_segments(pieces)
            cached = self._plans[index] = (key, [(lo, hi) for _, lo, hi, _ in segments],
                                           [self.adapter.group_of[i] for *_, i in segments])
        return cached[1], cached[2]

    def gradients(self):
        return [p.grad for p in self.adapter.params]

    def complete(self) -> bool:
        return self._num_buckets is not None and len(self.measured) == self._num_buckets


def build(blocks: int, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, width)) for _ in range(blocks)]
    return torch.nn.Sequential(*layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=10, help="LayerNorm + Linear blocks (~1M parameters each)")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0)
    parser.add_argument("--steps", type=int, default=20, help="measured steps (median reported)")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    x = torch.randn(16, args.width)
    variants: dict[str, tuple[DDP, distclip.GradClipper | None]] = {}
    for name in ("per_bucket", "per_block", "post_backward", "torch"):
        model = DDP(build(args.blocks, args.width), bucket_cap_mb=args.bucket_cap_mb)
        clipper = None
        if name != "torch":
            clipper = distclip.GradClipper(model, {"max_norm": MAX_NORM, "comm_hook": name == "per_block"})
        if name == "per_bucket":
            clipper.adapter.hook = PerBucketHook(clipper.adapter)
            model.register_comm_hook(None, clipper.adapter.hook.reduce_and_measure)
        variants[name] = (model, clipper)

    times: dict[str, dict[str, list[float]]] = {k: {"backward": [], "clip": []} for k in variants}
    norms: dict[str, float] = {}
    sources: dict[str, str] = {}
    for step in range(args.warmup + args.steps):
        for name, (model, clipper) in variants.items():  # in turns, so drift hits all alike
            model.zero_grad(set_to_none=False)
            dist.barrier()
            start = time.perf_counter()
            model(x).pow(2).mean().backward()
            dist.barrier()
            mid = time.perf_counter()
            if clipper is None:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
            else:
                report = clipper.clip()
                norm, sources[name] = report.total_norm, report.source
            dist.barrier()
            if step >= args.warmup:
                times[name]["backward"].append(mid - start)
                times[name]["clip"].append(time.perf_counter() - mid)
            norms[name] = norm.item()

    if dist.get_rank() == 0:
        params = sum(p.numel() for p in variants["torch"][0].parameters()) / 1e6
        blocks = len(variants["per_block"][1].adapter.blocks.blocks)
        print(f"{params:.1f}M parameters in {len(list(variants['torch'][0].parameters()))} tensors, "
              f"{dist.get_world_size()} ranks ({dist.get_backend()}), bucket_cap_mb {args.bucket_cap_mb} "
              f"({blocks} blocks), {torch.get_num_threads()} thread(s), median of {args.steps} steps")
        for name, t in times.items():
            backward, clip = (statistics.median(t[k]) * 1e3 for k in ("backward", "clip"))
            print(f"{name:14s} fwd+bwd {backward:7.2f} ms  clip {clip:6.2f} ms  total {backward + clip:7.2f} ms  "
                  f"norm {norms[name]:.9g}  {sources.get(name, 'torch')}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
