"""The README's demo: torchrun, 2 gloo ranks, the per-group config, real training output, its clip log and plot;
and the same demo from the package (``distclip demo``: the preset, its own 2 ranks, any folder), line for line."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from distclip.cli.main import main as distclip_main
from tests.helpers.launching import ROOT, launch_env

pytestmark = pytest.mark.multiprocess
STEPS = ["--steps", "6", "--text-bytes", "200000"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    jsonl = tmp_path_factory.mktemp("demo") / "demo.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "launch/train_char_lstm.py", "--config", "configs/demo.yaml", *STEPS, "--jsonl", str(jsonl)]
    # this checkout's distclip (not an installed one): the script's folder, not the repository, leads sys.path
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, jsonl


@pytest.fixture(scope="module")
def packaged_demo_run(tmp_path_factory):
    """``python -m distclip demo`` from a folder that is not the checkout: the preset 'demo', ranks started by itself."""
    folder = tmp_path_factory.mktemp("elsewhere")
    proc = subprocess.run([sys.executable, "-m", "distclip", "demo", *STEPS], cwd=folder, env=launch_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, folder / "runs" / "demo.jsonl"


def comparable(out: str, jsonl) -> list[str]:
    """The output without what differs between two runs of the same training: the clip log's path and the time."""
    out = out.replace(str(jsonl), "<log>").replace(str(jsonl.with_suffix(".png")), "<png>")
    return [re.sub(r"\(\d+\.\d s\)$", "(<time>)", line) for line in out.splitlines()]


def test_distclip_demo_from_the_package_prints_what_the_readme_command_prints(demo_run, packaged_demo_run):
    (script_out, script_log), (package_out, package_log) = demo_run, packaged_demo_run
    assert comparable(package_out, package_log.relative_to(package_log.parent.parent)) == comparable(script_out,
                                                                                                    script_log)
    assert [json.loads(line)["grad_norm"] for line in package_log.read_text().splitlines()[1:]] == [
        json.loads(line)["grad_norm"] for line in script_log.read_text().splitlines()[1:]]


def test_demo_runs_under_torchrun_and_prints_group_norms(demo_run):
    out, jsonl = demo_run
    assert "distclip demo: 2 ranks (gloo)" in out
    assert "groups: ['embed', 'lstm', 'default']" in out
    steps = re.findall(r"step +(\d+) \| loss +([\d.]+) \| norm +([\d.e+-]+) \| embed .* lstm .* default ", out)
    assert [int(s) for s, _, _ in steps] == [1, 2, 3, 4, 5, 6]
    assert all(float(norm) > 0 for _, _, norm in steps)
    assert re.search(r"clipped on \d+ of 6 steps, skipped 0; held-out bits per char: [\d.]+", out)
    assert f"distclip plot {jsonl} -o {jsonl.with_suffix('.png')}" in out


def test_demo_writes_its_clip_log_through_the_sink(demo_run):
    out, jsonl = demo_run
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    header, records = lines[0]["distclip"], lines[1:]
    assert [g["name"] for g in header["groups"]] == ["embed", "lstm", "default"]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    printed = {int(s): float(n) for s, n in re.findall(r"step +(\d+) \| loss +[\d.]+ \| norm +([\d.e+-]+)", out)}
    for record in records:  # the printed norm (4 significant digits) is the logged one
        assert f"{record['grad_norm']:.4g}" == f"{printed[record['step']]:.4g}"
    clipped = sum(any(r[f"clipped/{g}"] for g in ("embed", "lstm", "default")) for r in records)
    assert f"clipped on {clipped} of 6 steps" in out


def test_plot_of_the_demo_run_is_a_png(demo_run, tmp_path):
    pytest.importorskip("matplotlib")
    _, jsonl = demo_run
    assert distclip_main(["plot", str(jsonl), "-o", str(tmp_path / "demo.png")]) == 0
    image = (tmp_path / "demo.png").read_bytes()
    assert image.startswith(b"\x89PNG\r\n\x1a\n") and len(image) > 10_000
