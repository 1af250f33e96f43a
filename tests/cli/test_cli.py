"""``distclip launch`` / ``distclip check`` without launching: splitting, validation, the process-count guard."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from distclip import ClipConfig, ConfigError
from distclip.cli import main
from distclip.cli.launcher import (
    LaunchError,
    _replace_config_file,
    plan_launch,
    split_config,
)
from tests.helpers import REPO

import accelerate  # noqa: E402,F401  (a dev dependency: missing, the tests fail)
ROOT = REPO
ACCELERATE_CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("accelerate_*.yaml"))
MULTI_CPU = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_CPU", "num_processes": 2,
             "num_machines": 1, "machine_rank": 0, "mixed_precision": "no", "use_cpu": True,
             "mpirun_config": {"mpirun_hostfile": str(ROOT / "configs/hostfile.localhost")},
             "distclip": {"max_norm": 0.5, "groups": [{"name": "embed", "match": ["*embed*"], "max_norm": 0.1}]}}


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the tests name the shipped YAMLs as the README does: configs/...
    monkeypatch.setenv("OMPI_ALLOW_RUN_AS_ROOT", "1")
    monkeypatch.setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")


def write(tmp_path: Path, data: dict, name: str = "combined.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def plan(config: str, *extra: str):
    result = plan_launch(["--config_file", config, *extra, "train.py", "--lr", "1"])
    for path in result.temp_files:
        os.unlink(path)
    return result


def test_all_shipped_accelerate_configs_have_the_sections_and_that_accelerate_accepts():
    from accelerate.commands.config.config_args import ClusterConfig

    assert {"accelerate_multi_cpu.yaml", "accelerate_multi_gpu.yaml", "accelerate_fsdp1.yaml", "accelerate_fsdp2.yaml",
            "accelerate_deepspeed_zero1.yaml", "accelerate_deepspeed_zero2.yaml", "accelerate_deepspeed_zero3.yaml"} <= {
        Path(c).name for c in ACCELERATE_CONFIGS}
    for config in ACCELERATE_CONFIGS:
        split = split_config(config)
        assert isinstance(split.clip, ClipConfig), config
        assert "distclip" not in split.accelerate
        ClusterConfig(**ClusterConfig.process_config(dict(split.accelerate)))  # Accelerate's own key check
    assert split_config("configs/accelerate_fsdp2.yaml").accelerate["fsdp_config"]["fsdp_version"] == 2


def test_the_launch_passes_the_accelerate_part_unchanged_and_the_distclip_part_to_every_rank(tmp_path, monkeypatch):
    data = {**MULTI_CPU, "distclip": {"max_norm": math.inf, "norm_type": "inf", "nonfinite": "ignore"}}
    config = write(tmp_path, data)
    result = plan_launch(["--config_file", config, "--main_process_port", "1234", "train.py", "--config_file", "x"])
    try:
        accelerate_file = result.temp_files[0]
        assert yaml.safe_load(Path(accelerate_file).read_text()) == {k: v for k, v in data.items() if k != "distclip"}
        assert result.command[-7:] == ["--config_file", accelerate_file, "--main_process_port", "1234", "train.py",
                                       "--config_file", "x"]  # the script's own --config_file is left alone
    finally:
        os.unlink(accelerate_file)
    monkeypatch.setenv("DISTCLIP_CONFIG", result.env["DISTCLIP_CONFIG"])
    received = ClipConfig.from_env()
    assert received == ClipConfig.from_dict(data["distclip"]) and math.isinf(received.max_norm)


@pytest.mark.parametrize("argv,expected", [
    (["--config_file=a.yaml", "s.py"], ["--config_file=T", "s.py"]),
    (["--config-file", "a.yaml", "s.py"], ["--config-file", "T", "s.py"]),
    (["--config", "a.yaml", "--cpu", "s.py", "--config", "a.yaml"], ["--config", "T", "--cpu", "s.py", "--config", "a.yaml"]),
])
def test_config_file_argument_is_replaced_in_any_spelling(argv, expected):
    assert _replace_config_file(argv, "a.yaml", "T") == expected


@pytest.mark.parametrize("change,message", [
    ({"mpirun_config": {}}, "would start ONE process"),
    ({"use_cpu": False}, "every process alone"),
    ({"distributed_type": "NO", "mpirun_config": {}}, "would start ONE process"),
    ({"mpirun_config": {"mpirun_hostfile": "no/such/hostfile"}}, "does not exist"),
])
def test_configs_that_would_silently_run_fewer_processes_are_refused(tmp_path, change, message):
    config = write(tmp_path, {**MULTI_CPU, **change})
    with pytest.raises(LaunchError, match=message):
        plan(config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is about machines without CUDA GPUs")
@pytest.mark.parametrize("config", ["configs/accelerate_multi_gpu.yaml", "configs/accelerate_fsdp1.yaml",
                                    "configs/accelerate_fsdp2.yaml"])
def test_gpu_configs_are_refused_on_a_machine_without_gpus(config):
    with pytest.raises(LaunchError, match="no CUDA GPU: Accelerate would run every process alone"):
        plan(config)


def test_single_process_and_deepspeed_configs_pass(tmp_path):
    assert plan(write(tmp_path, {**MULTI_CPU, "mpirun_config": {}}), "--num_processes", "1").summary.startswith("1 process")
    assert "MULTI_CPU through mpirun" in plan("configs/accelerate_multi_cpu.yaml").summary
    assert "DeepSpeed" in plan("configs/accelerate_deepspeed_zero3.yaml").summary


def test_root_without_open_mpi_permission_is_refused(monkeypatch):
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("runs as root only")
    monkeypatch.delenv("OMPI_ALLOW_RUN_AS_ROOT")
    with pytest.raises(LaunchError, match="OMPI_ALLOW_RUN_AS_ROOT=1"):
        plan("configs/accelerate_multi_cpu.yaml")


@pytest.mark.parametrize("section,message", [
    ({"max_norm": 1.0, "nonfinit": "skip"}, "nonfinit: unknown key"),
    ({"groups": [{"name": "e", "match": ["*"], "max_norm": -1}]}, r"groups\[0\].max_norm = -1"),
])
def test_bad_distclip_section_names_the_key_and_starts_nothing(tmp_path, capsys, section, message):
    marker = tmp_path / "started"
    script = tmp_path / "train.py"
    script.write_text(f"open({str(marker)!r}, 'w')\n")
    config = write(tmp_path, {**MULTI_CPU, "distclip": section})
    assert main(["launch", "--config_file", config, str(script)]) == 2
    err = capsys.readouterr().err
    assert "section 'distclip:'" in err and re.search(message, err), err
    assert not marker.exists()


def test_distclip_nested_where_accelerate_drops_it_is_an_error(tmp_path):
    data = {**MULTI_CPU, "deepspeed_config": {"zero_stage": 2, "distclip": {"max_norm": 1.0}}}
    data.pop("distclip")
    with pytest.raises(ConfigError, match="nested under 'deepspeed_config:'.*move it to the top level"):
        split_config(write(tmp_path, data))


def test_cli_commands(capsys, tmp_path):
    assert main(["check", "configs/accelerate_multi_cpu.yaml"]) == 0
    assert "OK: 2 processes, MULTI_CPU through mpirun" in capsys.readouterr().out
    assert main(["launch", "train.py"]) == 2
    assert "--config_file is required" in capsys.readouterr().err
    assert main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "launch" in capsys.readouterr().out


def test_files_named_in_a_config_are_relative_to_its_folder_so_it_works_from_anywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # not the repository: configs/hostfile.localhost is not here
    shipped = ROOT / "configs" / "accelerate_multi_cpu.yaml"
    assert yaml.safe_load(shipped.read_text())["mpirun_config"]["mpirun_hostfile"] == "hostfile.localhost"
    assert main(["check", str(shipped)]) == 0
    assert f"(hostfile {ROOT / 'configs' / 'hostfile.localhost'})" in capsys.readouterr().out
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "hosts").write_text("localhost slots=2\n")
    (folder / "ds.json").write_text('{"train_micro_batch_size_per_gpu": 1}')
    data = {**MULTI_CPU, "mpirun_config": {"mpirun_hostfile": "hosts"}}
    result = plan_launch(["--config_file", write(folder, data), "train.py"])
    try:
        written = yaml.safe_load(Path(result.temp_files[0]).read_text())
    finally:
        for path in result.temp_files:
            os.unlink(path)
    assert written["mpirun_config"]["mpirun_hostfile"] == str(folder / "hosts")  # absolute: Accelerate reads the cwd
    assert {k: v for k, v in written.items() if k != "mpirun_config"} == {
        k: v for k, v in data.items() if k not in ("mpirun_config", "distclip")}  # the rest unchanged
    deepspeed = {"distributed_type": "DEEPSPEED", "num_processes": 2, "deepspeed_config": {
        "deepspeed_config_file": "ds.json", "offload_optimizer_device": "none"}, "distclip": {"max_norm": 1.0}}
    split = split_config(write(folder, deepspeed, "ds.yaml"))
    assert split.accelerate["deepspeed_config"] == {"deepspeed_config_file": str(folder / "ds.json"),
                                                    "offload_optimizer_device": "none"}
    with pytest.raises(LaunchError, match=re.escape(f"mpirun_config.mpirun_hostfile 'configs/hostfile.localhost' does "
                                                    f"not exist (a relative path is relative to the config file's "
                                                    f"folder, {folder}: it names {folder}/configs/hostfile.localhost)")):
        split_config(write(folder, {**MULTI_CPU, "mpirun_config": {"mpirun_hostfile": "configs/hostfile.localhost"}}))
