"""distclip demo: a character-level LSTM trained with DDP on Python's own standard-library source.

    distclip demo                                     # from any install: starts 2 ranks itself
    python -m distclip.demo --config zclip --steps 100
    torchrun --nproc_per_node 2 launch/train_char_lstm.py --config configs/demo.yaml   # a checkout

Under torchrun (``RANK`` set) it trains; started plainly it starts itself under torchrun with
``--nproc`` ranks (default 2, a free port on this machine). ``--config`` takes a YAML file, a
preset name (default ``demo``, shipped with distclip) or inline YAML.

Runs on CPU (gloo) or GPU (NCCL); no download (the text ships with Python). Plain SGD at a high
learning rate, where clipping decides between training and diverging (compare with
``--config no_clip``). Rank 0 prints the loss, the exact global gradient norm, each
clip group's norm and the coefficient applied to it (every ``--log-every`` steps, and a live
progress line in between on a terminal), and the clipper writes every step's clip metrics to
``--jsonl`` (default ``runs/demo.jsonl``) for ``distclip plot`` / ``distclip suggest``. The demo
needs nothing beyond torch and distclip (the progress line is plain text, no tqdm/rich).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from distclip.relaunch import torchrun_command


class CharLSTM(nn.Module):
    def __init__(self, vocab: int = 256, embed: int = 64, hidden: int = 128, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out)


def stdlib_text(max_bytes: int) -> torch.Tensor:
    """Python standard-library sources as bytes, in a fixed order (identical on every rank)."""
    root = Path(os.__file__).parent
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def sample(text: torch.Tensor, batch: int, seq: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, text.numel() - seq - 1, (batch,), generator=generator)
    window = torch.stack([text[s : s + seq + 1] for s in starts.tolist()])
    return window[:, :-1], window[:, 1:]


class LiveLine:
    """A one-line progress display redrawn in place on a terminal (stderr); silent otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.start = time.perf_counter()
        self.clipped = 0

    def update(self, step: int, loss: torch.Tensor, report: distclip.ClipReport) -> None:
        if not self.enabled:
            return
        metrics = report.to_metrics()  # one host read; this line is rank 0's and a terminal's only
        self.clipped += any(v == 1.0 for k, v in metrics.items() if k.startswith("clipped/"))
        done = step / self.total
        bar = "#" * int(24 * done) + "." * (24 - int(24 * done))
        rate = step / max(time.perf_counter() - self.start, 1e-9)
        sys.stderr.write(f"\r  [{bar}] {step}/{self.total}  loss {loss.item():6.3f}  norm {metrics['grad_norm']:8.3g}  "
                         f"clipped {self.clipped / step:4.0%}  {rate:5.1f} steps/s ")
        sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="demo",
                   help="distclip config: a YAML file, a preset name (distclip.presets.names()) or inline YAML "
                        "(default: the preset demo)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=20.0)
    p.add_argument("--batch", type=int, default=16, help="sequences per rank")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--log-every", type=int, default=25, help="log every N steps (and the first 8)")
    p.add_argument("--text-bytes", type=int, default=1_000_000)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="model dtype (float64: tests compare the launched run with a float64 reference to rounding)")
    p.add_argument("--json", action="store_true",
                   help="also print, on every rank and step, a JSON line with the world size and the exact norms")
    p.add_argument("--jsonl", default="runs/demo.jsonl",
                   help="clip log written by rank 0 every step (distclip.JSONLSink); '' for none")
    p.add_argument("--nproc", type=int, default=2,
                   help="ranks to start when not already launched by torchrun (default 2)")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Train when launched by torchrun (``RANK`` set); otherwise check the arguments and start ``--nproc`` ranks."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser(prog).parse_args(argv)
    if "RANK" in os.environ:
        return train(args)
    name = prog or "distclip demo"
    problem = _check(args)
    if problem:
        print(f"{name}: {problem}", file=sys.stderr)
        return 2
    command = torchrun_command("distclip.demo", args.nproc, argv)
    try:
        code = subprocess.call(command)
    except KeyboardInterrupt:  # the ranks got the same SIGINT (same process group)
        return 130
    if code != 0:
        print(f"{name}: the training ranks failed (exit status {code}); their output is above", file=sys.stderr)
        return 1
    return 0


def _check(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments (before any rank starts), or None."""
    for option in ("nproc", "steps", "batch", "seq", "log_every"):
        if getattr(args, option) < 1:
            return f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}"
    if args.text_bytes < 20 * (args.seq + 2):  # the held-out 5% must hold a sequence and its target
        return f"--text-bytes must be at least {20 * (args.seq + 2)} for --seq {args.seq}, got {args.text_bytes}"
    try:
        distclip.load_config(args.config)
    except distclip.ConfigError as err:
        return f"--config: {err}"
    return None


def train(args: argparse.Namespace) -> int:
    """One rank of the demo (under torchrun)."""
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    torch.manual_seed(0)  # same initial weights on every rank
    model = DDP(CharLSTM().to(device, getattr(torch, args.dtype)), device_ids=[device.index] if use_cuda else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    clipper = distclip.GradClipper(model, args.config)
    clipper.attach(optimizer)  # exact clip right before every optimizer.step()
    if args.jsonl:
        clipper.add_sink(distclip.JSONLSink(args.jsonl))  # ClipReport.to_metrics() of every clip, from rank 0

    text = stdlib_text(args.text_bytes)
    split = int(0.95 * text.numel())
    train, held_out = text[:split], text[split:]
    generator = torch.Generator().manual_seed(1 + rank)  # different data on every rank
    if rank == 0:
        print(f"distclip demo: {world} ranks ({dist.get_backend()}), {sum(p.numel() for p in model.parameters()):,} "
              f"params, {train.numel():,} training bytes of Python stdlib source")
        print(f"config: {clipper.config.to_dict()}")
        print(f"groups: {clipper.group_names}")

    start = time.perf_counter()
    clipped_steps: int | torch.Tensor = 0  # becomes a device tensor: read once, at the end
    skipped_steps = 0
    live = LiveLine(args.steps, enabled=rank == 0 and sys.stderr.isatty())
    for step in range(1, args.steps + 1):
        tokens, targets = (t.to(device) for t in sample(train, args.batch, args.seq, generator))
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        report = clipper.last_report
        assert report is not None  # attach clipped right before the step
        if args.json:
            record = {"rank": rank, "local_rank": int(os.environ.get("LOCAL_RANK", 0)), "step": step,
                      "world_size": world, "backend": str(dist.get_backend()),
                      **report.to_floats(), "source": report.source}
            sys.stdout.write(f"DISTCLIP {json.dumps(record)}\n")  # one write: ranks share the stream
            sys.stdout.flush()
        if report.skipped:
            skipped_steps += 1
        else:  # a threshold scaled some group down (no host sync: summed on the device)
            clipped_steps = clipped_steps + (torch.stack(list(report.coefs.values())) < 1.0).any().long()
        live.update(step, loss, report)
        if step % args.log_every == 0 or step <= 8:
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)  # logging only: the clip itself issued one collective
            if rank == 0:
                live.clear()
                groups = "  ".join(f"{name} {norm.item():.3g} x{report.coefs[name].item():.3f}"
                                   for name, norm in report.group_norms.items())
                print(f"step {step:4d} | loss {mean_loss.item() / world:7.4f} | norm {report.total_norm.item():10.4g} "
                      f"| {groups}" + ("  SKIPPED (non-finite)" if report.skipped else ""), flush=True)

    model.eval()
    with torch.no_grad():
        tokens, targets = (t.to(device) for t in sample(held_out, 64, args.seq, torch.Generator().manual_seed(99)))
        bpc = nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten()).item() / math.log(2)
    clipper.close()
    if rank == 0:
        live.clear()
        print(f"clipped on {int(clipped_steps)} of {args.steps} steps, skipped {skipped_steps}; "
              f"held-out bits per char: {bpc:.3f}  ({time.perf_counter() - start:.1f} s)")
        if args.jsonl:
            png = str(Path(args.jsonl).with_suffix(".png"))
            print(f"clip log: {args.jsonl} ({args.steps} clips); see it with: distclip plot {args.jsonl} -o {png}"
                  "  (needs pip install 'distclip[plot]')")
    del model
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m distclip.demo"))
