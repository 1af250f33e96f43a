"""Helpers for the end-to-end launch tests: free ports, subprocess runs with timeouts, parsing, float64 references."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
from types import ModuleType
from typing import Any

import torch
import yaml

from tests.helpers import REPO
from tests.helpers.reference import reference_clip, rel_err

ROOT = REPO
TORCHRUN = f"{sys.executable} -m torch.distributed.run"
MPI_ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_in(low: int, high: int) -> int:
    """A free port in [low, high) (for scripts that derive their port, e.g. from SLURM_JOB_ID)."""
    for port in random.Random().sample(range(low, high), min(200, high - low)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")


def launch_env(**extra: str) -> dict[str, str]:
    """The environment for launched processes: this worktree's distclip, one thread per rank, no GPU."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISTCLIP_CONFIG", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TORCHRUN": TORCHRUN, "PYTHON": sys.executable,
                "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", **MPI_ROOT_ENV})
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def records(output: str) -> list[dict[str, Any]]:
    """The ``DISTCLIP {...}`` JSON lines the training scripts print with ``--json``."""
    decoder, found = json.JSONDecoder(), []
    for chunk in output.split("DISTCLIP ")[1:]:  # robust to lines of different ranks interleaved
        found.append(decoder.raw_decode(chunk)[0])
    return found


def load_script(relative: str) -> ModuleType:
    """A launch/ script as a module (for its model and data), without running it."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(f"_launched_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def yaml_section(relative: str, key: str | None = None) -> dict[str, Any]:
    data = yaml.safe_load((ROOT / relative).read_text())
    return data[key] if key else data


def check_records(found: list[dict[str, Any]], refs: list[dict[str, Any]], world: int, first_step: int = 0,
                  norm_key: str = "total_norm", rtol: float = 1e-6) -> None:
    """Every rank reported every step, in a world of the asked size, the same norms, equal to the reference."""
    steps = len(refs)
    assert sorted((r["rank"], r["step"]) for r in found) == sorted(
        (rank, first_step + s) for rank in range(world) for s in range(steps)), found
    assert {r["world_size"] for r in found} == {world}
    for s, ref in enumerate(refs):
        at_step = [r for r in found if r["step"] == first_step + s]
        assert len({json.dumps([r[norm_key], r["group_norms"]]) for r in at_step}) == 1, at_step  # bitwise, all ranks
        got = at_step[0]
        assert rel_err(got[norm_key], ref["total"]) <= rtol, (s, got[norm_key], ref["total"])
        for name, value in ref["groups"].items():
            assert rel_err(got["group_norms"][name], value) <= rtol or value < 1e-12, (s, name, got["group_norms"], value)


def single_threaded(fn):
    """Run a reference on one thread: on a busy 2-core machine, 2 torch threads are ~8x slower than one."""
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


@single_threaded
def char_lstm_reference(world: int, steps: int, config: dict[str, Any], lr: float, batch: int = 16, seq: int = 64,
                        text_bytes: int = 200_000) -> list[dict[str, Any]]:
    """launch/train_char_lstm.py in one float64 process on all ranks' batches (DDP averages equal-size means)."""
    demo = load_script("launch/train_char_lstm.py")
    text = demo.stdlib_text(text_bytes)
    train = text[: int(0.95 * text.numel())]
    generators = [torch.Generator().manual_seed(1 + rank) for rank in range(world)]
    torch.manual_seed(0)
    model = demo.CharLSTM().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    out = []
    for _ in range(steps):
        parts = [demo.sample(train, batch, seq, g) for g in generators]
        tokens, targets = torch.cat([t for t, _ in parts]), torch.cat([y for _, y in parts])
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten()).backward()
        out.append(_clip_and_step(model, optimizer, config))
    return out


@single_threaded
def accelerate_reference(world: int, steps: int, config: dict[str, Any], lr: float = 0.5, batch: int = 4,
                         loss_scale: float = 3.0) -> list[dict[str, Any]]:
    """launch/train_accelerate.py in one float64 process on all ranks' batches."""
    script = load_script("launch/train_accelerate.py")
    model = script.make_model(torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    out = []
    for step in range(steps):
        parts = [script.batch(step, rank, batch) for rank in range(world)]
        tokens, targets = torch.cat([t for t, _ in parts]), torch.cat([y for _, y in parts])
        optimizer.zero_grad()
        script.loss_fn(model, tokens, targets, loss_scale).backward()
        out.append(_clip_and_step(model, optimizer, config))
    return out


def _clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> dict[str, Any]:
    ref = reference_clip({n: p.grad for n, p in model.named_parameters()}, config)
    for n, p in model.named_parameters():
        p.grad.copy_(ref["clipped"][n])
    optimizer.step()
    return ref
