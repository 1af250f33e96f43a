"""``distclip launch``: one YAML for Accelerate and distclip, checked before any process starts.

``accelerate launch`` refuses a top-level ``distclip:`` key (and silently drops one nested under
``fsdp_config``/``deepspeed_config``), so ``distclip launch --config_file X.yaml script.py [args]``:

1. reads X.yaml and validates its ``distclip:`` section FIRST (a bad key fails here, named);
2. writes the rest to a temporary file, unchanged except for the files it names (``mpirun_hostfile``,
   ``deepspeed_config_file``, ``deepspeed_hostfile``): relative to X.yaml's folder, made absolute,
   so that a config works from any folder; and validates it as Accelerate would;
3. refuses configurations with which Accelerate would silently run fewer processes than asked
   (each alone, or only one) on this machine;
4. runs ``accelerate launch`` with that file and every other argument as given, and the distclip
   section in ``$DISTCLIP_CONFIG`` (inline YAML; a temporary file's path when very long) for every
   rank, where ``GradClipper``, ``distclip.accelerate.enable`` and ``distclip.hf_trainer.enable`` read
   it; what it writes is first read back through ``ClipConfig.from_env`` and must give the same config.

A plain ``accelerate launch`` user sets ``DISTCLIP_CONFIG`` (a path, a preset name or inline YAML) instead.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..core.config import ENV_VAR, ClipConfig, read_yaml_file
from ..core.errors import require_extra
from ..errors import ConfigError, LaunchError

SECTION = "distclip"
NESTED_SECTIONS = ("fsdp_config", "deepspeed_config", "mpirun_config", "megatron_lm_config", "fp8_config",
                   "dynamo_config", "parallelism_config")
GPU_TYPES = ("MULTI_GPU", "FSDP", "MEGATRON_LM")
# Accelerate settings that name files (section, key): relative to the config file's folder (resolve_paths).
PATH_SETTINGS = (("mpirun_config", "mpirun_hostfile"), ("deepspeed_config", "deepspeed_config_file"),
                 ("deepspeed_config", "deepspeed_hostfile"))
# Longer sections go to $DISTCLIP_CONFIG as a file path: Linux refuses an environment string over 128 KiB.
INLINE_ENV_LIMIT = 32 * 1024


@dataclass
class SplitConfig:
    """A combined YAML split in two: the Accelerate part (unchanged) and the validated distclip section."""

    path: str
    accelerate: dict[str, Any]
    section: Any = None  # the distclip section as written (None: absent)
    clip: ClipConfig | None = None


@dataclass
class LaunchPlan:
    command: list[str]
    env: dict[str, str]
    summary: str
    temp_files: list[str] = field(default_factory=list)


def split_config(path: str | os.PathLike) -> SplitConfig:
    """Read a combined YAML and validate its ``distclip:`` section (raises :class:`ConfigError` naming the key)."""
    path = os.fsdecode(path)
    if not os.path.isfile(path):  # never raises (a name too long, a NUL byte): those do not exist either
        raise LaunchError(f"config file {path!r} does not exist")
    data = read_yaml_file(path, what="config file")  # ConfigError for non-UTF-8 text, bad YAML, unreadable
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of Accelerate settings with a '{SECTION}:' section")
    accelerate_part = {k: v for k, v in data.items() if k != SECTION}
    for key in NESTED_SECTIONS:
        nested = accelerate_part.get(key)
        if isinstance(nested, Mapping) and SECTION in nested:
            raise ConfigError(
                f"{path}: '{SECTION}:' is nested under '{key}:', where Accelerate silently drops it; "
                f"move it to the top level of the file"
            )
    if SECTION not in data:
        return SplitConfig(path, resolve_paths(accelerate_part, path))
    section = data[SECTION]
    clip = ClipConfig.from_dict(section if section is not None else {}, source=f"{path}, section '{SECTION}:'")
    return SplitConfig(path, resolve_paths(accelerate_part, path), section if section is not None else {}, clip)


def resolve_paths(accelerate_part: Mapping[str, Any], config_path: str) -> dict[str, Any]:
    """The Accelerate settings with the files they name made absolute, relative ones against the config's folder.

    Accelerate itself reads them from the working directory; relative to the YAML, a config works
    from any folder (``distclip check /abs/path/configs/accelerate_multi_cpu.yaml``). Raises
    :class:`LaunchError` for a named file that does not exist.
    """
    folder = os.path.dirname(os.path.abspath(config_path))
    out = dict(accelerate_part)
    for section, key in PATH_SETTINGS:
        nested = out.get(section)
        value = nested.get(key) if isinstance(nested, Mapping) else None
        if not isinstance(value, str) or value.strip().lower() in ("", "none"):
            continue
        expanded = os.path.expanduser(value)
        resolved = os.path.normpath(os.path.join(folder, expanded))  # an absolute value stays as it is
        if not os.path.isfile(resolved):
            raise LaunchError(f"{config_path}: {section}.{key} {value!r} does not exist (a relative path is relative "
                              f"to the config file's folder, {folder}: it names {resolved})")
        out[section] = {**(nested or {}), key: resolved}
    return out


def plan_launch(argv: list[str]) -> LaunchPlan:
    """Validate everything and build the ``accelerate launch`` command; raise before anything starts."""
    early = _config_file_argument(argv)
    if early is not None:
        split_config(early)  # fail fast on the distclip section, before even importing Accelerate
    require_extra("accelerate.commands.launch", "accelerate", "distclip launch and check")
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    args = parser.parse_args(argv)  # accelerate's own options, exactly as `accelerate launch` reads them
    config_path = args.config_file
    if config_path is None:
        raise LaunchError(
            "--config_file is required: an Accelerate YAML with a 'distclip:' section (see configs/). "
            "Without one, run `accelerate launch` and set DISTCLIP_CONFIG"
        )
    split = split_config(config_path)  # the file's distclip section first: a bad key fails here
    accelerate_file = _write_temp_yaml(split.accelerate)
    try:
        try:
            cluster = load_config_from_file(accelerate_file)
        except (ValueError, TypeError) as err:
            raise LaunchError(f"{config_path}: the Accelerate part is invalid: {err}") from None
        summary = check_process_count(cluster, args, config_path)
    except BaseException:
        os.unlink(accelerate_file)
        raise
    env = dict(os.environ)
    temp_files = [accelerate_file]
    if split.section is not None:
        try:
            env[ENV_VAR] = _section_for_env(split.section, temp_files)
            check_env_round_trip(env, split.clip, config_path)
        except BaseException:
            for path in temp_files:
                os.unlink(path)
            raise
    command = [sys.executable, "-m", "accelerate.commands.launch",
               *_replace_config_file(argv, config_path, accelerate_file)]
    groups = "uniform" if split.clip is None or not (split.clip.groups or split.clip.per_layer) else "per-group"
    where = f"distclip config from '{SECTION}:' ({groups})" if split.section is not None else (
        f"no '{SECTION}:' section: ranks read ${ENV_VAR}"
        + (" (set)" if ENV_VAR in os.environ else " (unset: defaults)"))
    return LaunchPlan(command, env, f"{summary}; {where}", temp_files)


def check_env_round_trip(env: Mapping[str, str], expected: ClipConfig | None, source: str = "config") -> None:
    """Raise :class:`LaunchError` unless ``env`` gives every rank, through ``ClipConfig.from_env``, ``expected``."""
    try:
        received = ClipConfig.from_env(environ=env)
    except ConfigError as err:
        raise LaunchError(
            f"{source}: the '{SECTION}:' section written to ${ENV_VAR} does not load back: {err}") from None
    if expected is None or received is None or received.fingerprint() != expected.fingerprint():
        raise LaunchError(
            f"{source}: the '{SECTION}:' section written to ${ENV_VAR} loads back as {received!r}, not as "
            f"{expected!r}; please report this as a distclip bug (a plain `accelerate launch` with "
            f"DISTCLIP_CONFIG=<path of a YAML file> avoids it)"
        )


def check_process_count(cluster: Any, args: argparse.Namespace, source: str = "config") -> str:
    """Raise :class:`LaunchError` where Accelerate would silently start fewer cooperating processes than asked.

    Mirrors ``accelerate.commands.launch.launch_command``: the launcher is chosen from the flags
    and the config's ``distributed_type``; returns a one-line summary of what will run.
    """
    distributed_type = str(getattr(cluster.distributed_type, "value", cluster.distributed_type))
    if args.use_deepspeed:
        distributed_type = "DEEPSPEED"
    elif args.use_fsdp:
        distributed_type = "FSDP"
    elif args.multi_gpu:
        distributed_type = "MULTI_GPU"
    num_processes = args.num_processes if args.num_processes is not None else cluster.num_processes
    num_machines = args.num_machines if args.num_machines is not None else cluster.num_machines
    num_machines = max(1, int(num_machines or 1))
    if num_processes is None or num_processes < 1:
        raise LaunchError(f"{source}: set num_processes (in the file or with --num_processes)")
    local = num_processes // num_machines
    use_cpu = bool(args.cpu or getattr(cluster, "use_cpu", False))
    hostfile = args.mpirun_hostfile or (cluster.mpirun_config or {}).get("mpirun_hostfile")
    asked = f"{num_processes} processes" + (f" on {num_machines} machines" if num_machines > 1 else "")

    if distributed_type == "DEEPSPEED" and not args.cpu:
        return f"{asked}, DeepSpeed (torchrun-style launcher; on CPU the script must use the gloo backend)"
    if distributed_type in GPU_TYPES and not args.cpu:
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise LaunchError(
                f"{source}: distributed_type {distributed_type} with {asked}, but this machine has no CUDA GPU: "
                f"Accelerate would run every process alone (DistributedType.NO, world size 1), with no "
                f"gradient synchronisation, silently. On CPU use distributed_type MULTI_CPU (configs/"
                f"accelerate_multi_cpu.yaml); Accelerate does not support FSDP on CPU"
            )
        note = f" (only {gpus} GPUs here: processes will share them)" if gpus < local else ""
        return f"{asked}, {distributed_type} on {min(gpus, local)} local GPUs{note}"
    # Accelerate's simple launcher: one process, or mpirun with a hostfile
    if num_processes == 1:
        return f"1 process ({distributed_type})"
    if not hostfile:
        raise LaunchError(
            f"{source}: {asked} with distributed_type {distributed_type}, but no mpirun hostfile: Accelerate "
            f"would start ONE process, silently. Add 'mpirun_config: {{mpirun_hostfile: <file>}}' and "
            f"'use_cpu: true' (see configs/accelerate_multi_cpu.yaml), or run "
            f"`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node {local} script.py` with DISTCLIP_CONFIG set"
        )
    if not use_cpu:
        raise LaunchError(
            f"{source}: {asked} through mpirun needs 'use_cpu: true' (or --cpu): without it Accelerate runs "
            f"every process alone (DistributedType.NO, world size 1), silently"
        )
    if not Path(hostfile).is_file():  # --mpirun_hostfile (the file's own was checked by resolve_paths)
        raise LaunchError(f"{source}: mpirun_hostfile {hostfile!r} does not exist (on the command line, a relative "
                          f"path is relative to the current directory, {os.getcwd()})")
    if not (shutil.which("mpirun") or shutil.which("mpiexec")):
        raise LaunchError(f"{source}: {asked} on CPU need mpirun (Open MPI, Intel MPI or MVAPICH) on PATH")
    if hasattr(os, "geteuid") and os.geteuid() == 0 and not os.environ.get("OMPI_ALLOW_RUN_AS_ROOT"):
        if b"Open MPI" in _mpirun_version():
            raise LaunchError(
                f"{source}: Open MPI refuses to run as root: export OMPI_ALLOW_RUN_AS_ROOT=1 "
                "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 (containers), or run as another user"
            )
    return f"{asked}, MULTI_CPU through mpirun (hostfile {hostfile})"


# --------------------------------------------------------------------- helpers
def _mpirun_version() -> bytes:
    import subprocess

    try:
        return subprocess.run([shutil.which("mpirun") or "mpiexec", "--version"], capture_output=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return b""


def _write_temp_yaml(data: Mapping[str, Any], prefix: str = "distclip-accelerate-") -> str:
    handle, name = tempfile.mkstemp(prefix=prefix, suffix=".yaml")
    with os.fdopen(handle, "w") as f:
        yaml.safe_dump(dict(data), f, sort_keys=False)
    return name


def _section_for_env(section: Any, temp_files: list[str]) -> str:
    """The ``$DISTCLIP_CONFIG`` value for ``section``: inline YAML, or (when long) the path of a file holding it."""
    inline = yaml.safe_dump(section, default_flow_style=True, width=1 << 30).strip()
    if len(inline.encode("utf-8", "surrogateescape")) <= INLINE_ENV_LIMIT:
        return inline
    path = _write_temp_yaml(section, prefix="distclip-section-")
    temp_files.append(path)
    return path


_CONFIG_OPTIONS = ("--config_file", "--config-file")


def _config_file_argument(argv: list[str]) -> str | None:
    """A quick look for the ``--config_file`` value (Accelerate's parser then reads the arguments for real)."""
    for i, token in enumerate(argv):
        option, sep, value = token.partition("=")
        if _is_config_option(option):
            return value if sep else (argv[i + 1] if i + 1 < len(argv) else None)
        if token.endswith(".py"):
            return None  # the training script: what follows is its own arguments
    return None


def _is_config_option(option: str) -> bool:
    """``--config_file``, ``--config-file`` or an abbreviation of them (argparse accepts those)."""
    return len(option) >= len("--config") and any(full.startswith(option) for full in _CONFIG_OPTIONS)


def _replace_config_file(argv: list[str], value: str, path: str) -> list[str]:
    """``argv`` with the ``--config_file value`` argument pointing to ``path``; everything else as given."""
    out = list(argv)
    for i, token in enumerate(out):
        option, sep, inline = token.partition("=")
        if not _is_config_option(option):
            continue
        if sep and inline == value:
            out[i] = f"{option}={path}"
            return out
        if not sep and i + 1 < len(out) and out[i + 1] == value:
            out[i + 1] = path
            return out
    raise LaunchError(f"could not find the --config_file {value!r} argument in {argv}")
