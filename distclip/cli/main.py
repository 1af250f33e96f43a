"""The ``distclip`` command (also ``python -m distclip``): ``launch``, ``check``, ``bench``, ``plot`` and
``suggest``; subcommands register in COMMANDS.

    distclip launch --config_file configs/accelerate_multi_cpu.yaml launch/train_accelerate.py --steps 3
    distclip check configs/accelerate_fsdp2.yaml
    distclip plot runs/demo.jsonl -o runs/demo.png
    distclip suggest runs/measure.jsonl --quantile 0.9 -o clip.yaml

Exit status: the training's own for ``launch``; 2 for a configuration refused before anything started.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable

from ..core.config import ConfigError

LAUNCH_HELP = """usage: distclip launch --config_file CONFIG.yaml [accelerate launch options] script.py [script args]

Runs `accelerate launch` with the Accelerate part of CONFIG.yaml (unchanged) and gives its
'distclip:' section to every rank through $DISTCLIP_CONFIG. The distclip section is validated
first, and configurations with which Accelerate would silently run fewer processes than asked are
refused, before any process starts. Every `accelerate launch` option is accepted and passed on
(e.g. --num_processes, --main_process_port). In the script: distclip.accelerate.enable(accelerator).
"""

CHECK_HELP = """usage: distclip check CONFIG.yaml [accelerate launch options]

Validates a combined Accelerate + distclip YAML as `distclip launch` would (distclip section, the
Accelerate part, the process count on this machine) and prints what would run; starts nothing.
"""


def _launch(argv: list[str]) -> int:
    from .launcher import LaunchError, plan_launch

    if not argv or argv[0] in ("-h", "--help"):
        print(LAUNCH_HELP, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    try:
        plan = plan_launch(argv)
    except (ConfigError, LaunchError) as err:
        print(f"distclip launch: {err}", file=sys.stderr)
        return 2
    print(f"distclip launch: {plan.summary}", file=sys.stderr, flush=True)
    try:
        return subprocess.call(plan.command, env=plan.env)
    except KeyboardInterrupt:  # the children got the same SIGINT (same process group)
        return 130
    finally:
        for path in plan.temp_files:
            try:
                os.unlink(path)
            except OSError:
                pass


def _check(argv: list[str]) -> int:
    from .launcher import LaunchError, plan_launch

    if not argv or argv[0] in ("-h", "--help"):
        print(CHECK_HELP, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    config, rest = argv[0], argv[1:]
    try:
        plan = plan_launch(["--config_file", config, *rest, "<script>"])
    except (ConfigError, LaunchError) as err:
        print(f"distclip check: {err}", file=sys.stderr)
        return 2
    for path in plan.temp_files:
        os.unlink(path)
    print(f"{config}: OK: {plan.summary}")
    return 0


def _bench(argv: list[str]) -> int:
    from ..bench.__main__ import main as bench_main

    return bench_main(argv)


def _plot(argv: list[str]) -> int:
    from .plot import main as plot_main

    return plot_main(argv)


def _suggest(argv: list[str]) -> int:
    from .suggest import main as suggest_main

    return suggest_main(argv)


# name -> (one-line help, handler taking the remaining argv and returning the exit status)
COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "launch": ("accelerate launch with a combined Accelerate + distclip YAML, checked first", _launch),
    "check": ("validate a combined YAML (distclip section, Accelerate part, process count)", _check),
    "bench": ("benchmark clipping against the native alternatives (python -m distclip.bench --help)", _bench),
    "plot": ("plot a clip log (JSONL): per-group norms, thresholds, clip events, clip rate (needs distclip[plot])",
             _plot),
    "suggest": ("per-group thresholds from a clip log of a run with max_norm: inf (YAML, JSON or an optuna space)",
                _suggest),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<8} {help_}" for name, (help_, _) in COMMANDS.items()]
        usage = "usage: distclip COMMAND [args]\n\ncommands:\n" + "\n".join(lines)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"distclip: unknown command {argv[0]!r}\n\n{usage}", file=sys.stderr)
            return 2
        print(usage, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    return COMMANDS[argv[0]][1](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
