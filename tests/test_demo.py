"""The README's demo: torchrun, 2 gloo ranks, the per-group config, real training output."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.multiprocess


def test_demo_runs_under_torchrun_and_prints_group_norms():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "launch/train_char_lstm.py", "--config", "configs/demo.yaml", "--steps", "6", "--text-bytes", "200000"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "distclip demo: 2 ranks (gloo)" in out
    assert "groups: ['embed', 'lstm', 'default']" in out
    steps = re.findall(r"step +(\d+) \| loss +([\d.]+) \| norm +([\d.e+-]+) \| embed .* lstm .* default ", out)
    assert [int(s) for s, _, _ in steps] == [1, 2, 3, 4, 5, 6]
    assert all(float(norm) > 0 for _, _, norm in steps)
    assert re.search(r"clipped on \d+ of 6 steps, skipped 0; held-out bits per char: [\d.]+", out)
