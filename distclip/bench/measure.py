"""Timing, memory and collective counting helpers for the benchmarks."""

from __future__ import annotations

import math
import re
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.distributed.tensor.debug import CommDebugMode


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall-clock laps, synchronising the device at each mark so GPU work is counted where it runs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list[float] = []

    def mark(self) -> None:
        synchronize(self.device)
        self.marks.append(time.perf_counter())

    def lap(self, i: int) -> float:
        return self.marks[i + 1] - self.marks[i]


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3 if values else math.nan


def count_collectives(fn: Callable[[], object]) -> int:
    """How many c10d collectives ``fn`` issues (DTensor's implicit ones included)."""
    with CommDebugMode() as comm:
        fn()
    return comm.get_total_counts()


@contextmanager
def peak_memory_added(device: torch.device) -> Iterator[list[int]]:
    """Bytes by which the peak memory rose while the block ran (CUDA allocator, or CPU peak RSS)."""
    out = [0]
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        synchronize(device)
        out[0] = max(0, torch.cuda.max_memory_allocated(device) - before)
        return
    status = Path("/proc/self/status")
    clear_refs = Path("/proc/self/clear_refs")
    if not (status.exists() and clear_refs.exists()):
        out[0] = -1
        yield out
        return
    clear_refs.write_text("5")  # Linux: reset the peak-RSS counter (VmHWM) to the current RSS
    before = _proc_kib(status.read_text(), "VmRSS")
    yield out
    out[0] = max(0, _proc_kib(status.read_text(), "VmHWM") - before) * 1024


def _proc_kib(text: str, key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def growth_exponent(sizes: list[int], times: list[float]) -> float:
    """Least-squares slope of log(time) against log(size): 1 is linear, 2 quadratic."""
    xs, ys = [math.log(s) for s in sizes], [math.log(max(t, 1e-9)) for t in times]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
