"""launch/nd_example.py under torchrun on 4 CPU ranks: distclip's total equals torchtitan's recipe, one collective."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import REPO

ROOT = REPO
pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize("layout", ["2d", "3d"])
def test_nd_example_matches_torchtitan_recipe(layout):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           "launch/nd_example.py", "--layout", layout, "--steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = re.findall(r"distclip total ([\d.]+) \((\d+) collective, (\w+)\);  torchtitan recipe ([\d.]+)", proc.stdout)
    assert len(steps) == 2, proc.stdout
    for ours, collectives, source, theirs in steps:
        assert ours == theirs and collectives == "1" and source == "comm_hook", (ours, theirs, collectives, source)
    assert "layers.3" in proc.stdout  # per-layer groups of both stages on rank 0
