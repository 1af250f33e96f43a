"""The ``distclip`` command (also ``python -m distclip``); subcommands register in COMMANDS.

    distclip demo                                  # the demo, 2 CPU ranks, from any installation
    distclip launch --config_file configs/accelerate_multi_cpu.yaml launch/train_accelerate.py --steps 3
    distclip check configs/accelerate_fsdp2.yaml
    distclip plot runs/demo.jsonl -o runs/demo.png
    distclip suggest runs/measure.jsonl --quantile 0.9 -o clip.yaml
    distclip env                                   # versions and backends, for a bug report
    distclip --version

Every subcommand reports a failure as ``distclip <command>: <message>`` on stderr, with exit status
2 when it refused before anything ran (usage, config, missing package) and 1 when something failed
while running (:mod:`distclip.cli.output`); ``launch`` returns the training's own status.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable

from .._version import __version__
from ..errors import ClipLogError, ConfigError, LaunchError, MissingExtraError, SuggestError, UsageError
from .output import FAILED, INTERRUPTED, USAGE, fail

LAUNCH_USAGE = "usage: distclip launch --config_file CONFIG.yaml [accelerate launch options] script.py [script args]"
LAUNCH_HELP = f"""{LAUNCH_USAGE}

Runs `accelerate launch` with the Accelerate part of CONFIG.yaml and gives its 'distclip:' section
to every rank through $DISTCLIP_CONFIG. The distclip section is validated first, and
configurations with which Accelerate would silently run fewer processes than asked are refused,
before any process starts. File paths in CONFIG.yaml (mpirun_hostfile, deepspeed_config_file,
deepspeed_hostfile) are relative to CONFIG.yaml's folder. Every `accelerate launch` option is
accepted and passed on (e.g. --num_processes, --main_process_port). In the script:
distclip.accelerate.enable(accelerator). Needs Accelerate: pip install 'distclip[accelerate]'.
"""

CHECK_USAGE = "usage: distclip check CONFIG.yaml [accelerate launch options]"
CHECK_HELP = f"""{CHECK_USAGE}

Validates a combined Accelerate + distclip YAML as `distclip launch` would (distclip section, the
Accelerate part, the files it names, the process count on this machine) and prints what would
run; starts nothing. Works from any folder: paths in CONFIG.yaml are relative to its folder.
"""

# Errors that mean "refused before anything ran": reported in one line, exit status 2.
REFUSALS = (ConfigError, LaunchError, ClipLogError, SuggestError, MissingExtraError, UsageError)
# Commands that run training code in this process: its errors keep their tracebacks (they report their own refusals).
RUNS_TRAINING = ("demo", "mpi")


def _hand_written_help(argv: list[str], command: str, usage: str, text: str, needed: str) -> int | None:
    """``--help`` (status 0), or no arguments (the usage and an error line, status 2), for launch and check."""
    if argv and argv[0] in ("-h", "--help"):
        print(text)
        return 0
    if not argv:
        print(usage, file=sys.stderr)
        return fail(command, f"error: missing {needed} (distclip {command} --help)")
    return None


def _launch(argv: list[str]) -> int:
    from .launcher import plan_launch

    early = _hand_written_help(argv, "launch", LAUNCH_USAGE, LAUNCH_HELP, "--config_file CONFIG.yaml and a script")
    if early is not None:
        return early
    plan = plan_launch(argv)
    print(f"distclip launch: {plan.summary}", file=sys.stderr, flush=True)
    try:
        return subprocess.call(plan.command, env=plan.env)
    except KeyboardInterrupt:  # the children got the same SIGINT (same process group)
        return INTERRUPTED
    finally:
        for path in plan.temp_files:
            try:
                os.unlink(path)
            except OSError:
                pass


def _check(argv: list[str]) -> int:
    from .launcher import plan_launch

    early = _hand_written_help(argv, "check", CHECK_USAGE, CHECK_HELP, "CONFIG.yaml")
    if early is not None:
        return early
    config, rest = argv[0], argv[1:]
    plan = plan_launch(["--config_file", config, *rest, "<script>"])
    for path in plan.temp_files:
        os.unlink(path)
    print(f"{config}: OK: {plan.summary}")
    return 0


def _bench(argv: list[str]) -> int:
    from ..core.errors import require_extra

    require_extra("numpy", "bench", "distclip bench")  # torch's CommDebugMode, which counts collectives, needs it
    from ..bench.__main__ import main as bench_main

    return bench_main(argv)


def _plot(argv: list[str]) -> int:
    from .plot import main as plot_main

    return plot_main(argv)


def _suggest(argv: list[str]) -> int:
    from .suggest import main as suggest_main

    return suggest_main(argv)


def _demo(argv: list[str]) -> int:
    from ..demo import main as demo_main

    return demo_main(argv, prog="distclip demo")


def _env(argv: list[str]) -> int:
    from .env import main as env_main

    return env_main(argv)


def _mpi(argv: list[str]) -> int:
    from .mpi import main as mpi_main

    return mpi_main(argv, prog="distclip mpi")


# name -> (one-line help, handler taking the remaining argv and returning the exit status)
COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "demo": ("train the demo (char-LSTM, DDP, per-group clipping) on 2 local ranks; --help for options", _demo),
    "launch": ("accelerate launch with a combined Accelerate + distclip YAML, checked first", _launch),
    "check": ("validate a combined YAML (distclip section, Accelerate part, process count)", _check),
    "bench": ("benchmark clipping against the native alternatives (needs distclip[bench])", _bench),
    "plot": ("plot a clip log (JSONL): per-group norms, thresholds, clip events, clip rate (needs distclip[plot])",
             _plot),
    "suggest": ("per-group thresholds from a clip log of a run with max_norm: inf (YAML, JSON or an optuna space)",
                _suggest),
    "mpi": ("under mpirun, run a torchrun-style script: mpirun -np N distclip mpi train.py (needs distclip[mpi])",
            _mpi),
    "env": ("installed versions next to the tested ones, torch.distributed backends, CUDA: for bug reports", _env),
}


def usage() -> str:
    lines = [f"  {name:<8} {help_}" for name, (help_, _) in COMMANDS.items()]
    return ("usage: distclip COMMAND [args]   (distclip COMMAND --help for its options)\n"
            "       distclip --version\n\ncommands:\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--version":
        print(f"distclip {__version__}")
        return 0
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        problem = f"unknown command {argv[0]!r}" if argv else "a command is required"
        print(f"distclip: {problem}\n\n{usage()}", file=sys.stderr)
        return USAGE
    command = argv[0]
    if command in RUNS_TRAINING:
        return COMMANDS[command][1](argv[1:])
    try:
        return COMMANDS[command][1](argv[1:])
    except REFUSALS as err:
        return fail(command, err, USAGE)
    except OSError as err:  # a file that cannot be written, a program that cannot start
        return fail(command, err, FAILED)
    except KeyboardInterrupt:
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
