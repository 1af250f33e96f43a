"""Every ``distclip`` subcommand: its ``--help``, its failures (one ``distclip <command>: ...`` line, status 2 when
refused before running, 1 when a run fails), ``--version`` and ``env``. In process: no ranks are started."""

from __future__ import annotations

import importlib.metadata
import json
import math
import sys
from pathlib import Path

import pytest
import tomllib
import torch

import distclip
from distclip.cli import COMMANDS
from distclip.cli.env import PACKAGES, within
from distclip.cli.main import main
from tests.helpers import REPO

ROOT = REPO
SUBCOMMANDS = ["launch", "check", "bench", "plot", "suggest", "demo", "env", "mpi"]


def run(argv: list[str]) -> int:
    """``distclip ARGV`` in this process; argparse's ``--help`` and usage errors exit, as they do from the shell."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)


def test_the_subcommands_are_the_ones_tested_here():
    assert sorted(COMMANDS) == sorted(SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_help(command, capsys):
    assert run([command, "--help"]) == 0
    out, err = capsys.readouterr()
    first = out.splitlines()[0]
    assert first.startswith("usage: ") and f"distclip {command}" in first, out[:300]
    assert len(out.splitlines()) > 3 and not err  # a description, not only the usage line


def test_top_level_help_and_version(capsys):
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n  {command} " in out for command in SUBCOMMANDS) and "distclip --version" in out
    assert run(["--version"]) == 0
    assert capsys.readouterr().out == f"distclip {distclip.__version__}\n"
    assert run([]) == 2 and "a command is required" in capsys.readouterr().err
    assert run(["nope"]) == 2 and capsys.readouterr().err.startswith("distclip: unknown command 'nope'")


def write_log(path: Path, steps: int = 20) -> None:
    """A small clip log as JSONLSink writes it (one group, measured norms, nothing clipped)."""
    records = [{"step": s, "grad_norm": 1.0 + s / 10, "skipped": 0.0, "grad_norm/default": 1.0 + s / 10,
                "clip_coef/default": 1.0, "clip_threshold/default": math.inf, "clipped/default": 0.0,
                "nonfinite/default": 0.0, "clip_rate/default": 0.0} for s in range(1, steps + 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def refusals(tmp: Path) -> list[tuple[list[str], int, str]]:
    """(argv, exit status, what the last stderr line says after 'distclip <command>: ')."""
    log = tmp / "clip.jsonl"
    write_log(log)
    blocker = tmp / "a-file"
    blocker.write_text("")
    return [
        (["launch"], 2, "error: missing --config_file"),
        (["launch", "train.py"], 2, "--config_file is required"),
        (["check"], 2, "error: missing CONFIG.yaml"),
        (["check", str(tmp / "missing.yaml")], 2, "does not exist"),
        (["bench", "--backends", "nope"], 2, "unknown backend 'nope'"),
        (["bench", "--bogus"], 2, "error: unrecognized arguments: --bogus"),
        (["plot"], 2, "error: the following arguments are required: log"),
        (["plot", str(tmp / "missing.jsonl")], 2, "no such file"),
        (["suggest", str(log), "--quantile", "2"], 2, "--quantile must be between 0 and 1"),
        (["suggest", str(log), "--config", "nope"], 2, "'nope' is neither an existing file nor a distclip preset"),
        (["suggest", str(log), "-o", str(blocker / "clip.yaml")], 1, "Not a directory"),  # fails while writing
        (["demo", "--config", "nope"], 2, "--config: distclip config='nope' is neither"),
        (["demo", "--nproc", "0"], 2, "--nproc must be at least 1"),
        (["env", "--bogus"], 2, "error: unrecognized arguments: --bogus"),
        (["mpi"], 2, "error: a script or -m module is required"),
    ]


def test_failures_are_one_line_with_the_command_and_a_consistent_status(tmp_path, capsys):
    for argv, status, message in refusals(tmp_path):
        assert run(argv) == status, argv
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"distclip {argv[0]}: "), (argv, last)
        assert message in last, (argv, last)
        assert "distclip: distclip" not in last and "Traceback" not in last


def test_plot_that_cannot_write_is_a_run_failure(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # without it, plot refuses first (status 2, the extra named)
    log = tmp_path / "clip.jsonl"
    write_log(log)
    (tmp_path / "a-file").write_text("")
    assert run(["plot", str(log), "-o", str(tmp_path / "a-file" / "plot.png")]) == 1
    assert capsys.readouterr().err.startswith("distclip plot: ")


def test_a_missing_extra_is_named(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "accelerate.commands.launch", None)  # as if Accelerate were not installed
    config = tmp_path / "c.yaml"
    config.write_text("distributed_type: MULTI_CPU\nnum_processes: 1\ndistclip: {max_norm: 1.0}\n")
    assert run(["check", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distclip check: distclip launch and check needs the 'accelerate' package") and \
        "pip install 'distclip[accelerate]'" in err
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", None)
    assert run(["mpi", "script.py"]) == 2
    assert "pip install 'distclip[mpi]'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- env
def test_env_reports_installed_versions_next_to_the_pyproject_ranges(capsys):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert run(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row for row in report["packages"]}
    assert list(rows) == list(PACKAGES)
    assert {"torch", "deepspeed", "accelerate", "transformers", "lightning", "torchtitan", "ai2-olmo-core", "torchft",
            "mpi4py"} <= set(rows)
    for name, row in rows.items():
        try:
            expected = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            expected = None
        assert row["installed"] == expected, name
    assert rows["torch"]["installed"] == torch.__version__
    torch_pin = next(r for r in project["dependencies"] if r.startswith("torch"))
    assert rows["torch"]["tested"] == torch_pin.removeprefix("torch") and rows["torch"]["within"] is True
    deepspeed_pin = project["optional-dependencies"]["deepspeed"][0]
    assert rows["deepspeed"]["tested"] == deepspeed_pin.removeprefix("deepspeed").split("#")[0].strip()
    assert rows["deepspeed"]["extra"] == "deepspeed" and rows["ai2-olmo-core"]["extra"] == "olmo-core"
    assert report["distclip"]["version"] == distclip.__version__
    assert report["python"]["requires"] == project["requires-python"]
    import torch.distributed as dist

    assert report["torch"]["backends"]["gloo"] == dist.is_gloo_available()
    assert report["torch"]["backends"]["nccl"] == dist.is_nccl_available()
    assert report["torch"]["backends"]["mpi"] == dist.is_mpi_available()
    assert report["torch"]["cuda_available"] == torch.cuda.is_available()


def test_env_text_marks_untested_and_missing_packages(monkeypatch, capsys):
    from distclip.cli import env

    versions = {"torch": "2.14.0", "deepspeed": None}
    real = env.installed_version
    monkeypatch.setattr(env, "installed_version", lambda name: versions[name] if name in versions else real(name))
    assert run(["env"]) == 0
    out = capsys.readouterr().out
    torch_line = next(line for line in out.splitlines() if line.startswith("torch "))
    assert torch_line.split()[:4] == ["torch", "2.14.0", ">=2.13,<2.14", "NOT"] and "TESTED" in torch_line
    deepspeed_line = next(line for line in out.splitlines() if line.startswith("deepspeed "))
    assert "not installed" in deepspeed_line and "distclip[deepspeed]" in deepspeed_line
    assert "torch.distributed backends: gloo " in out and "CUDA: " in out


@pytest.mark.parametrize("version,spec,expected", [
    ("2.13.0+cpu", ">=2.13,<2.14", True), ("2.13.1", ">=2.13,<2.14", True), ("2.14.0", ">=2.13,<2.14", False),
    ("2.12.9", ">=2.13,<2.14", False), ("0.3.0", "==0.3.0", True), ("0.3.1", "==0.3.0", False),
    ("0.19.8", ">=0.19.8,<0.20", True), ("0.20.0rc1", ">=0.19.8,<0.20", False), ("1.4", "~=1.2", True),
    ("2.0", "~=1.2", False), ("2.13.5", "==2.13.*", True), ("2.14", "!=2.14.*", False), ("5.24.0", "", True),
])
def test_version_ranges(version, spec, expected):
    assert within(version, spec) is expected


def test_env_text_on_a_cuda_machine():
    """The GPU lines (this machine has none: the report of one, as collect() builds it, formatted)."""
    from distclip.cli.env import format_report

    report = {"distclip": {"version": "0.1.0", "location": "/x"}, "mpirun": None,
              "python": {"version": "3.11.7", "implementation": "CPython", "executable": "/p", "requires": ">=3.10"},
              "platform": {"system": "Linux", "machine": "x86_64", "cpus": 16}, "packages": [],
              "torch": {"version": "2.13.0+cu128", "cuda_build": "12.8", "distributed": True, "cuda_available": True,
                        "backends": {"gloo": True, "nccl": True, "mpi": False}, "gpus": ["NVIDIA H100", "NVIDIA H100"],
                        "nccl_version": "2.27.5"}}
    text = format_report(report)
    assert "torch.distributed backends: gloo yes, nccl yes, mpi no" in text
    assert "CUDA: 2 GPUs (NVIDIA H100), torch built with CUDA 12.8, NCCL 2.27.5" in text
    assert "mpirun: not on PATH" in text
