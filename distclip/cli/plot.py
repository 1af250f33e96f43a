"""``distclip plot LOG.jsonl -o OUT.png``: what clipping did over a run, one row per clip group.

Each row: the group's pre-clip norm over the clips, its threshold (dashed), the clips that scaled
it down (dots), skipped steps (grey bands) and non-finite norms (red lines); on the right axis the
running clip rate. A log scale is used where a row's norms span more than two decades. Needs
matplotlib (``pip install 'distclip[plot]'``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Sequence

from ..core.errors import MissingExtraError, require_extra
from .clip_log import ClipLog, ClipLogError, read_clip_log
from .output import fail

USAGE = "distclip plot LOG.jsonl [-o OUT.png] [--title TEXT]"
DECADES_FOR_LOG = 2.0  # a row switches to a log scale when its norms span more than this many decades


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distclip plot", description=__doc__.split("\n\n")[1].strip())
    p.add_argument("log", help="a clip log (JSONL written by log: {jsonl: PATH} or distclip.JSONLSink)")
    p.add_argument("-o", "--output", help="the PNG to write (default: LOG with the suffix .png)")
    p.add_argument("--title", help="figure title (default: the log's path)")
    return p


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(list(argv))
    try:
        log = read_clip_log(args.log)
        plt = require_extra("matplotlib.pyplot", "plot", "distclip plot")
    except (ClipLogError, MissingExtraError) as err:
        return fail("plot", err)
    output = Path(args.output) if args.output else Path(args.log).with_suffix(".png")
    output.parent.mkdir(parents=True, exist_ok=True)
    figure = draw(log, plt, args.title or args.log)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    print(f"distclip plot: {len(log.records)} clips of {len(log.groups)} groups -> {output}")
    return 0


def draw(log: ClipLog, plt: Any, title: str) -> Any:
    """The figure: one row per group (norm, threshold, clip events, skips; clip rate on the right axis)."""
    plt.switch_backend("Agg")  # files only: no display needed
    groups = log.groups
    figure, axes = plt.subplots(len(groups), 1, figsize=(10, 2.4 * len(groups) + 0.6), sharex=True, squeeze=False)
    steps = log.steps
    skipped = [s for s, flag in zip(steps, log.series("skipped")) if flag == 1]
    legend: dict[str, Any] = {}
    for ax, group in zip(axes[:, 0], groups):
        norms = log.series(f"grad_norm/{group}")
        thresholds = log.series(f"clip_threshold/{group}")
        clipped = log.series(f"clipped/{group}")
        nonfinite = [s for s, flag in zip(steps, log.series(f"nonfinite/{group}")) if flag == 1]
        for s in skipped:
            ax.axvspan(s - 0.5, s + 0.5, color="0.85", lw=0)
        for s in nonfinite:
            ax.axvline(s, color="tab:red", lw=1.2, alpha=0.8)
        ax.plot(steps, norms, color="tab:blue", lw=1.0, label="pre-clip norm")
        if any(math.isfinite(t) for t in thresholds):
            ax.plot(steps, [t if math.isfinite(t) else math.nan for t in thresholds], color="black", lw=1.0,
                    ls="--", label="threshold")
        hits = [(s, n) for s, n, c in zip(steps, norms, clipped) if c == 1 and math.isfinite(n)]
        if hits:
            ax.scatter([s for s, _ in hits], [n for _, n in hits], s=9, color="tab:orange", zorder=3, label="clipped")
        positive = [n for n in norms if math.isfinite(n) and n > 0]
        if positive and math.log10(max(positive) / min(positive)) > DECADES_FOR_LOG:
            ax.set_yscale("log")
        ax.set_ylabel("norm")
        rate = log.series(f"clip_rate/{group}")
        final = next((r for r in reversed(rate) if math.isfinite(r)), math.nan)
        threshold = next((t for t in reversed(thresholds) if not math.isnan(t)), math.nan)
        ax.set_title(f"{group}: threshold {threshold:.4g}, clipped on {final:.0%} of clips"
                     + (f", {len(nonfinite)} non-finite" if nonfinite else ""), fontsize=10, loc="left")
        right = ax.twinx()
        right.plot(steps, rate, color="tab:green", lw=1.0, alpha=0.8, label="clip rate (running)")
        right.set_ylim(-0.02, 1.02)
        right.set_ylabel("clip rate", color="tab:green")
        right.tick_params(axis="y", colors="tab:green")
        for handles, labels in (ax.get_legend_handles_labels(), right.get_legend_handles_labels()):
            legend.update({label: handle for handle, label in zip(handles, labels) if label not in legend})
    axes[-1, 0].set_xlabel("clip (optimizer step)" + (f"; grey bands: {len(skipped)} skipped steps" if skipped else ""))
    figure.suptitle(title, fontsize=11, x=0.01, ha="left")
    figure.legend(list(legend.values()), list(legend), loc="upper right", ncol=len(legend), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.3 / figure.get_figheight()))
    return figure
