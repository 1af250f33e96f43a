"""``python -m distclip.bench``: what exact, per-group clipping costs next to the native alternatives.

Run under torchrun (``torchrun --nproc_per_node 2 -m distclip.bench``), or plainly: it then
starts itself under torchrun with ``--nproc`` ranks. CUDA/NCCL when a GPU is present, else CPU/gloo.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

try:
    import numpy  # noqa: F401  (torch's CommDebugMode, which counts the collectives, imports it)
except ImportError:
    print("distclip bench: needs numpy (torch's CommDebugMode imports it): pip install 'distclip[bench]'",
          file=sys.stderr)
    raise SystemExit(2) from None

from ..relaunch import torchrun_command
from .cases import BACKENDS, VARIANTS
from .suites import bench_backend, bench_bandwidth, bench_kernels, bench_scaling
from .table import print_backend_table, print_bandwidth, print_kernels, print_scaling, print_targets
from .targets import bench_targets


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000, "G": 1_000_000_000}.get(text[-1], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def default_backends() -> list[str]:
    """Every backend, without the DeepSpeed ones when DeepSpeed is not installed (pip install 'distclip[deepspeed]')."""
    import importlib.util

    has_deepspeed = importlib.util.find_spec("deepspeed") is not None
    return [b for b in BACKENDS if has_deepspeed or not b.startswith("deepspeed")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="distclip bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=",".join(default_backends()),
                        help=f"comma-separated, from {list(BACKENDS)} "
                             "(default: all; DeepSpeed rows when it is installed)")
    parser.add_argument("--params", default="10M", help="model size(s), comma-separated (e.g. 10M,50M)")
    parser.add_argument("--layers", type=int, default=24, help="blocks in the model (= groups per layer)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="measured steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--scaling", default="1000,5000,20000", help="tensor counts for the scaling suite ('' to skip)")
    parser.add_argument("--scaling-budget", type=float, default=60.0,
                        help="seconds: skip a baseline whose projected time exceeds this")
    parser.add_argument("--bandwidth-mb", type=float, default=256,
                        help="gradient megabytes for the bandwidth suite (0 to skip)")
    parser.add_argument("--kernels", type=float, default=1.0,
                        help="size of the norm-kernel suite (1: 50M fp32, 16M bf16, 24 x 2M fp32; 0 to skip)")
    parser.add_argument("--targets", type=float, default=1.0,
                        help="size of the speed-targets suite (1: kernels on 9 x 1M + 9 x 1K, clip_grad_norm_ on "
                             "DDP at 10M parameters, 48 tiny tensors, 20k small tensors; 0 to skip)")
    parser.add_argument("--targets-repeats", type=int, default=15, help="turns per figure of the speed-targets suite")
    parser.add_argument("--targets-json", default=None,
                        help="where to write the speed-targets table for the docs "
                             "(default: targets.json beside --json)")
    parser.add_argument("--json", default="bench-results/bench.json", help="where to write the results")
    parser.add_argument("--nproc", type=int, default=2, help="ranks to start when not launched by torchrun")
    return parser.parse_args(argv)


def relaunch_under_torchrun(args: argparse.Namespace, argv: list[str]) -> int:
    return subprocess.call(torchrun_command("distclip.bench", args.nproc, argv))


def init_distributed() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return torch.device("cuda", local)
    dist.init_process_group("gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return torch.device("cpu")


def machine() -> dict[str, object]:
    info: dict[str, object] = {
        "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(), "world_size": dist.get_world_size(),
        "backend": dist.get_backend(), "threads_per_rank": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def quiet() -> None:
    """Keep the tables readable: library deprecation warnings and DeepSpeed's info logs off."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def save(results: dict[str, object], path: str) -> None:
    """Write the results so far (a long run keeps what it measured if stopped)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))


def save_targets(targets: dict[str, Any], info: dict[str, Any], path: str) -> None:
    """The speed-targets table as the docs' ``{distclip-bench}`` directive reads it: machine, date, note, flat rows."""
    import datetime

    load = targets.get("load_1min") or []
    described = (f"{info.get('processor')}, {info.get('cpu_count')} CPUs, {info.get('world_size')} ranks "
                 f"({info.get('backend')}), {info.get('threads_per_rank')} thread(s) per rank, "
                 f"torch {info.get('torch')}"
                 + (f", {info['gpu']}" if info.get("gpu") else ""))
    save({"machine": described, "date": datetime.date.today().isoformat(),
          "note": "1-minute load average " + " -> ".join(f"{x:.2f}" for x in load) if load else "",
          "rows": targets["rows"]}, path)
    print(f"speed targets written to {path}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    unknown = [b for b in args.backends.split(",") if b and b not in BACKENDS]
    if unknown:
        print(f"distclip bench: unknown backend {unknown[0]!r}; choose from {list(BACKENDS)}", file=sys.stderr)
        return 2
    if "RANK" not in os.environ:
        return relaunch_under_torchrun(args, argv)
    quiet()
    device = init_distributed()
    rank = dist.get_rank()
    results: dict[str, Any] = {"machine": machine(), "args": vars(args), "backends": [], "scaling": None,
                              "bandwidth": None, "kernels": None, "targets": None}
    for backend in [b for b in args.backends.split(",") if b]:
        if backend not in BACKENDS:
            raise SystemExit(f"unknown backend {backend!r}; choose from {list(BACKENDS)}")
        for size in [parse_size(s) for s in args.params.split(",")]:
            rows = bench_backend(backend, size, args, device)
            results["backends"].append({"backend": backend, "params": size, "rows": rows})
            if rank == 0:
                print_backend_table(backend, size, rows, results["machine"])
                save(results, args.json)
    if args.scaling:
        results["scaling"] = bench_scaling([int(s) for s in args.scaling.split(",")], args, device)
        if rank == 0:
            print_scaling(results["scaling"])
    if args.bandwidth_mb > 0:
        results["bandwidth"] = bench_bandwidth(args.bandwidth_mb, device)
        if rank == 0:
            print_bandwidth(results["bandwidth"])
    if args.kernels > 0:
        results["kernels"] = bench_kernels(args.kernels, device)
        if rank == 0:
            print_kernels(results["kernels"], results["machine"])
    if args.targets > 0:
        results["targets"] = bench_targets(args.targets, args.targets_repeats, device)
        if rank == 0:
            print_targets(results["targets"], results["machine"])
            targets_json = args.targets_json or str(Path(args.json).with_name("targets.json"))
            save_targets(results["targets"], results["machine"], targets_json)
    if rank == 0:
        save(results, args.json)
        print(f"\nresults written to {args.json}  (variants: {VARIANTS})")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
