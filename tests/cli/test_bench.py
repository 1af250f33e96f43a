"""The benchmark runs end to end at a tiny size (it is not a timed test: numbers are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

ROOT = REPO
pytestmark = pytest.mark.multiprocess


def test_bench_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "distclip.bench", "--backends", "ddp,deepspeed-zero2", "--params", "200K",
           "--layers", "4", "--steps", "2",
           "--warmup", "1", "--scaling", "50,200", "--bandwidth-mb", "4", "--kernels", "0.001", "--targets", "0.001",
           "--targets-repeats", "2", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== ddp:" in proc.stdout and "vs native" in proc.stdout
    results = json.loads(out.read_text())
    assert results["machine"]["world_size"] == 2
    ddp = next(b for b in results["backends"] if b["backend"] == "ddp")
    rows = {r["variant"]: r for r in ddp["rows"]}
    assert {"none", "native", "distclip", "distclip-groups", "distclip-hook"} <= set(rows)
    assert rows["distclip"]["collectives"] == 1 and rows["distclip-groups"]["collectives"] == 1
    assert rows["native"]["collectives"] == 0  # torch's clip on replicated DDP grads is local
    assert rows["distclip"]["clip_vs_native"] > 0 and rows["distclip-groups"]["groups_vs_uniform"] > 0
    zero2 = {r["variant"]: r for r in next(b for b in results["backends"] if b["backend"] == "deepspeed-zero2")["rows"]}
    assert zero2["distclip"]["collectives"] == 1 and zero2["distclip-groups"]["collectives"] == 1
    assert zero2["distclip"]["clip_ms"] > 0 and zero2["native"]["clip_ms"] > 0
    assert set(results["scaling"]["series"]) >= {"torch clip_grad_norm_ (plain)", "distclip (plain)"}
    assert results["bandwidth"]["norm"]["GBps"] > 0
    kernels = results["kernels"]
    assert {(r["case"], r["p"]) for r in kernels} >= {("1 x 50K fp32", 1.0), ("24 x 2K fp32", 3.5)}
    assert all(r["ratio"] > 0 and r["distclip_err"] <= 1e-6 for r in kernels)
    assert "local norm kernels" in proc.stdout
    # the speed targets: the four figures in one run, each against torch in the same run, and a docs table
    assert "speed targets" in proc.stdout
    targets = results["targets"]
    cases = {(r["target"].split(" ")[0], r["case"]) for r in targets["rows"]}
    for dtype in ("fp32", "bf16"):
        for p in ("1", "2", "inf"):
            assert ("exact", f"9 x 1K + 9 x 1K {dtype}, p={p}") in cases  # 9 x 1M at --targets 1
    assert any(t == "clip_grad_norm_" and "ranks (gloo)" in c for t, c in cases)
    assert sum(t == "per-clip" and c.startswith("48 tensors") for t, c in cases) == 2
    assert any(t == "one" and c.startswith("20 tensors") for t, c in cases)
    for row in targets["rows"]:
        assert row["distclip"] > 0 and row["native"] > 0 and row["compare"] in ("ratio", "added"), row
        assert isinstance(row["met"], bool) and row["goal"]
        if row["target"].startswith("exact"):
            assert row["max_rel_err"] <= 1e-6, row  # exactness holds at any size; speed is not asserted
    docs = json.loads((tmp_path / "targets.json").read_text())  # beside --json, as the docs' table reads it
    assert docs["rows"] == targets["rows"] and docs["machine"] and docs["date"] and "load" in docs["note"]


def test_bench_nd_rows(tmp_path):
    """The FSDP2 + TP (dp x tp=2) and pipeline (pp=2) rows run, and distclip clips in one collective."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "distclip.bench", "--backends", "fsdp2-tp,pipeline", "--params", "200K",
           "--layers", "4", "--steps", "2", "--warmup", "1", "--scaling", "", "--bandwidth-mb", "0", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== fsdp2-tp:" in proc.stdout and "== pipeline:" in proc.stdout and "ms/M" in proc.stdout
    results = json.loads(out.read_text())
    for backend in ("fsdp2-tp", "pipeline"):
        rows = {r["variant"]: r for r in next(b for b in results["backends"] if b["backend"] == backend)["rows"]}
        assert {"none", "native", "distclip", "distclip-groups"} <= set(rows)
        assert rows["distclip"]["collectives"] == 1 and rows["distclip-groups"]["collectives"] == 1, backend
        assert rows["native"]["clip_ms"] > 0 and rows["distclip"]["clip_ms_per_M"] > 0, backend


@pytest.mark.parametrize("variant, kind", [
    ("distclip-hook-pertensor-adagc", "adagc"), ("distclip-hook-groups-zclip", "zclip"),
    ("distclip-hook-groups-autoclip", "autoclip"), ("distclip-agc", "agc"), ("distclip-hook-groups", "fixed"),
])
def test_bench_variant_runs_the_policy_its_name_says(variant, kind):
    """A row's name is what it measures: '-adagc' is AdaGC, not AGC (a suffix test mixed them up)."""
    from distclip.bench.cases import clip_config
    from distclip.core.config import ClipConfig

    config = ClipConfig.model_validate(clip_config(variant, hook=True))
    assert config.policy.kind == kind


def _timed_with_uneven_ranks() -> tuple[float, int]:
    """Rank 0's calls take 0.6 s, rank 1's nothing: each alone would stop after a different number of calls."""
    import time

    import torch.distributed as dist

    from distclip.bench.suites import _timed

    calls = []

    def fn() -> None:
        calls.append(1)
        time.sleep(0.6 if dist.get_rank() == 0 else 0.0)

    best = _timed(fn)
    return best, len(calls)


def test_timed_stops_after_the_same_call_on_every_rank():
    """A rank deciding from its own timings called barrier() once more than its peer: a hang (seen in CI-like
    runs on a loaded machine). run_ranks's timeout turns a hang into a failure."""
    from distclip.testing import run_ranks

    (best0, calls0), (best1, calls1) = run_ranks(_timed_with_uneven_ranks, 2, timeout=60, collective_timeout=20)
    assert calls0 == calls1 == 2  # 0.6 s each: over a second after two
    assert best0 == best1 >= 0.6
