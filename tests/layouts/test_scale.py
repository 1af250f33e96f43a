"""distclip's set-up stays near-linear in parameters + ranks, and its per-clip payload O(slots), at thousands of ranks.

``python -m distclip.bench.scale`` plays one rank of a job of W ranks (torch's fake process group) and
builds a GradClipper over a model of P parameter tensors laid out as DDP, DTensor replication, FSDP2,
HSDP, TP x FSDP (a sub-mesh sliced per tensor), a torchtitan-style unflattened mesh, a pipeline and
declared tensors. Run here at two world sizes and two model sizes, in one subprocess (~10 s).

What a cost linear in P + W looks like on the 2 x 2 grid: the cost added by the larger model is the same
at both world sizes (no P x W term: a per-parameter table of ranks, an all-gather of per-parameter data,
a geometry per mesh object), and each direction alone grows at most linearly (no W^2, no P^2). The set-up
bytes and the Python memory are deterministic and checked tightly; the CPU time loosely (a shared machine).
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from typing import Any

import pytest

from distclip.core.reduce import GATHER_LIMIT
from tests.helpers import REPO

pytestmark = pytest.mark.multiprocess  # a subprocess, like the other launches

WORLDS = (16, 4096)
SIZES = (16, 512)
PAYLOAD_WORLDS = (8, 65536)
PAYLOAD_GROUPS = (1, 64)
LAYOUTS = ("ddp", "replicate", "fsdp2", "hsdp", "tp_fsdp", "titan", "pipeline", "declared")


@functools.cache
def results() -> dict[str, Any]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scale.json"
        cmd = [sys.executable, "-m", "distclip.bench.scale", "--worlds", ",".join(map(str, WORLDS)),
               "--params", ",".join(map(str, SIZES)), "--layouts", ",".join(LAYOUTS),
               "--payload-worlds", ",".join(map(str, PAYLOAD_WORLDS)),
               "--payload-groups", ",".join(map(str, PAYLOAD_GROUPS)), "--json", str(out)]
        proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads(out.read_text())


def grid(layout: str, key: str) -> dict[tuple[int, int], float]:
    rows = [r for r in results()["setup"] if r["layout"] == layout]
    assert {(r["world"], r["params"]) for r in rows} == {(w, p) for w in WORLDS for p in SIZES}, rows
    return {(r["world"], r["params"]): float(r[key]) for r in rows}


def interaction(g: dict[tuple[int, int], float]) -> float:
    """The cost added by the larger model at the larger world, less what it adds at the smaller world: a
    P x W term's share (0 when the cost is a(P) + b(W))."""
    (ws, wb), (ps, pb) = WORLDS, SIZES
    return (g[(wb, pb)] - g[(wb, ps)]) - (g[(ws, pb)] - g[(ws, ps)])


def slope(low: float, high: float, ratio: float) -> float:
    return math.log(max(high, 1e-9) / max(low, 1e-9)) / math.log(ratio)


def check_linear(layout: str, key: str, share: float, floor: float, max_slope: float) -> None:
    """No P x W term: the interaction within ``share`` of the largest cost (plus ``floor`` and, for noise in
    the world's own cost, ``share`` of the cost at the larger world and smaller model); neither direction
    alone steeper than ``max_slope``."""
    g = grid(layout, key)
    (ws, wb), (ps, pb) = WORLDS, SIZES
    extra = interaction(g)
    assert extra <= share * (g[(wb, pb)] + g[(wb, ps)]) + floor, (
        f"{layout} {key}: the larger model costs {extra:.1f} more at W={wb} than at W={ws} (a P x W term): {g}")
    along_w = slope(g[(ws, ps)], g[(wb, ps)], wb / ws)
    along_p = slope(g[(ws, ps)], g[(ws, pb)], pb / ps)
    assert along_w <= max_slope and along_p <= max_slope, (
        f"{layout} {key}: grows as W^{along_w:.2f} and P^{along_p:.2f} (more than linear): {g}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_setup_exchanges_carry_no_per_parameter_data_across_ranks(layout: str) -> None:
    """What a rank receives at set-up grows with W (a few int64 per rank) but not with W x P."""
    check_linear(layout, "setup_received_bytes", 0.0, 0.0, 1.05)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_setup_memory_is_linear_in_params_plus_world(layout: str) -> None:
    check_linear(layout, "setup_peak_kib", 0.15, 64.0, 1.15)
    check_linear(layout, "setup_kept_kib", 0.15, 64.0, 1.15)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_setup_time_is_linear_in_params_plus_world(layout: str) -> None:
    check_linear(layout, "setup_ms", 0.35, 3.0, 1.3)


def test_per_clip_payload_does_not_grow_with_the_world() -> None:
    """One all-reduce of the S slots whatever W; a layout mixing SUM and MAX slots all-gathers them while
    W x S stays small and takes two all-reduces (SUM, MAX with NaN flags) beyond, never O(W x S)."""
    rows = results()["payload"]
    assert {(r["world"], r["mixed_p"]) for r in rows} == {(w, m) for w in PAYLOAD_WORLDS for m in (False, True)}
    for r in rows:
        slots = r["slots"]
        if not r["mixed_p"]:
            assert r["collectives"] == ["all_reduce_sum"] and r["received_bytes"] == 8 * slots, r
        elif r["world"] * slots <= GATHER_LIMIT:
            assert r["collectives"] == ["all_gather"] and r["received_bytes"] == 8 * slots * r["world"], r
        else:
            assert r["collectives"] == ["all_reduce_sum", "all_reduce_max"], r
            assert r["received_bytes"] == 8 * slots + 16 * slots, r
        assert r["received_bytes"] <= max(8 * GATHER_LIMIT, 24 * slots), r
    big = [r for r in rows if r["world"] == max(PAYLOAD_WORLDS)]
    assert any(r["mixed_p"] and len(r["collectives"]) == 2 for r in big)  # the two-all-reduce path was exercised
