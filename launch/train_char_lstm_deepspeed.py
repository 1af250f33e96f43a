"""distclip DeepSpeed demo: the char-LSTM of the demo (``distclip.demo``), trained by a DeepSpeed ZeRO engine.

    torchrun --nproc_per_node 2 launch/train_char_lstm_deepspeed.py --ds-config configs/deepspeed_zero2.json

The distclip settings come from the ``distclip`` section of the DeepSpeed JSON; ``--stage`` and
``--bf16`` override the JSON's ZeRO stage and precision. distclip clips inside ``engine.step()``
(DeepSpeed's own ``gradient_clipping`` is off); rank 0 prints the loss, distclip's exact norm,
``engine.get_global_grad_norm()`` and each clip group's norm and coefficient.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import distclip
import distclip.deepspeed

from distclip.demo import CharLSTM, sample, stdlib_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ds-config", default="configs/deepspeed_zero2.json", help="DeepSpeed JSON (with a distclip section)")
    parser.add_argument("--stage", type=int, choices=[0, 1, 2, 3], help="override zero_optimization.stage")
    parser.add_argument("--bf16", action="store_true", help="bf16 training (ZeRO 1-3)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=20.0)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=25, help="log every N steps (and the first 8)")
    parser.add_argument("--text-bytes", type=int, default=1_000_000)
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before importing deepspeed: no accelerator probe
    import deepspeed

    ds_config = json.loads(Path(args.ds_config).read_text())
    if args.stage is not None:
        ds_config["zero_optimization"] = {**ds_config.get("zero_optimization", {}), "stage": args.stage}
    if args.bf16:
        ds_config["bf16"] = {"enabled": True}
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    torch.manual_seed(0)  # same initial weights on every rank
    model = CharLSTM()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    clipper = distclip.deepspeed.attach(engine)  # config: the JSON's "distclip" section
    device = engine.device

    text = stdlib_text(args.text_bytes)
    split = int(0.95 * text.numel())
    train, held_out = text[:split], text[split:]
    generator = torch.Generator().manual_seed(1 + rank)  # different data on every rank
    batch = engine.train_micro_batch_size_per_gpu()
    if rank == 0:
        print(f"distclip DeepSpeed demo: {world} ranks ({dist.get_backend()}), ZeRO stage "
              f"{engine.zero_optimization_stage()}, {type(engine.optimizer).__name__}, "
              f"{'bf16' if engine.bfloat16_enabled() else 'fp32'}, {sum(p.numel() for p in model.parameters()):,} params")
        print(f"config (from the DeepSpeed JSON): {clipper.config.to_dict()}")
        print(f"groups: {clipper.group_names}; DeepSpeed gradient_clipping now {engine.gradient_clipping()}")

    start = time.perf_counter()
    clipped_steps = 0
    for step in range(1, args.steps + 1):
        tokens, targets = (t.to(device) for t in sample(train, batch, args.seq, generator))
        logits = engine(tokens)
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        engine.backward(loss)
        engine.step()  # distclip: exact norm, one collective, per-group coefficients, inside here
        report = clipper.last_report
        clipped_steps += int(min(c.item() for c in report.coefs.values()) < 1.0)
        if step % args.log_every == 0 or step <= 8:
            mean_loss = loss.detach().float().clone()
            dist.all_reduce(mean_loss)  # logging only
            if rank == 0:
                groups = "  ".join(f"{name} {norm.item():.3g} x{report.coefs[name].item():.3f}"
                                   for name, norm in report.group_norms.items())
                print(f"step {step:4d} | loss {mean_loss.item() / world:7.4f} | norm {report.total_norm.item():10.4g} "
                      f"| get_global_grad_norm {float(engine.get_global_grad_norm()):10.4g} | {groups}"
                      + ("  SKIPPED (non-finite)" if report.skipped else ""), flush=True)

    engine.eval()
    with torch.no_grad():
        tokens, targets = (t.to(device) for t in sample(held_out, 64, args.seq, torch.Generator().manual_seed(99)))
        bpc = nn.functional.cross_entropy(engine(tokens).float().flatten(0, 1), targets.flatten()).item() / math.log(2)
    if rank == 0:
        print(f"clipped on {clipped_steps} of {args.steps} steps, skipped {engine.skipped_steps}; "
              f"held-out bits per char: {bpc:.3f}  ({time.perf_counter() - start:.1f} s)")
    engine.destroy()
    del engine
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
