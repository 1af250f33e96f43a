"""``distclip suggest LOG.jsonl``: per-group thresholds from a run that only measured (``max_norm: inf``).

The rule: skip the first ``--warmup`` logged clips (default: the first 10%, where early-training
spikes live), and the clips that were skipped or had a non-finite norm; each group's threshold is
the ``--quantile`` Q (default 0.9, linear interpolation) of its remaining pre-clip norms, rounded
to 3 significant digits. On the measured norms, a group is then clipped on ``1 - Q`` of its steps
after warm-up (the table shows what each threshold would have clipped, over all logged clips and
after warm-up). Clipping changes the trajectory, though, and usually keeps norms higher than in
the unclipped run, so a run with the suggestion clips MORE often than asked: on the demo (lr 1,
Q 0.9) 8-13% of 60 steps, but 15-28% of 300. Suggesting again from the log of that run (its
pre-clip norms are those of a clipped trajectory) refines it: one more round gave 8-15%.

Output: the distclip config of the logged run (from the log's header, or ``--config``) with the
thresholds filled in, as YAML (``ClipConfig.from_yaml`` loads it as is) or JSON; or, with
``--format optuna``, a JSON search space of per-group thresholds for a tuner::

    space = json.load(open("space.json"))
    config = space["config"]
    for p in space["params"]:               # one log-uniform range per group around its suggestion
        value = trial.suggest_float(p["name"], p["low"], p["high"], log=p["log"])
        distclip.cli.suggest.set_at(config, p["path"], value)
    clipper = distclip.GradClipper(model, config)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from typing import Any, Sequence

import yaml

from ..core.config import DEFAULT_GROUP, ClipConfig, load_config
from ..errors import ClipLogError, ConfigError, SuggestError
from .clip_log import ClipLog, read_clip_log
from .output import fail

WARMUP_FRACTION = 0.1
MIN_NORMS = 5  # fewer usable norms than this per group is not a basis for a threshold
SIGNIFICANT = 3


__all__ = ["main", "suggest", "quantile", "search_space", "set_at", "with_thresholds", "SuggestError"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distclip suggest", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("log", help="clip log of a run with max_norm: inf (JSONL written by log: {jsonl: PATH})")
    p.add_argument("--quantile", "-q", type=float, default=0.9,
                   help="quantile of each group's norms (default 0.9: clips about 10%% of steps)")
    p.add_argument("--warmup", type=int, default=None,
                   # %% is argparse's percent sign
                   help=f"logged clips to skip at the start (default: the first {WARMUP_FRACTION:.0%}%)")
    p.add_argument("-o", "--output", help="write the config here (default: stdout, the table then goes to stderr)")
    p.add_argument("--format", choices=["yaml", "json", "optuna"], default="yaml")
    p.add_argument("--config",
                   help="the run's distclip config (a YAML file or a preset name), if the log has no header")
    p.add_argument("--range", type=float, default=4.0, dest="spread",
                   help="optuna: each range is [suggested / RANGE, suggested * RANGE] (default 4)")
    return p


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(list(argv))
    try:
        if not 0.0 < args.quantile < 1.0:
            raise SuggestError(f"--quantile must be between 0 and 1 (exclusive), got {args.quantile}")
        if args.spread <= 1.0:
            raise SuggestError(f"--range must be > 1, got {args.spread}")
        log = read_clip_log(args.log)
        base = load_config(args.config).to_dict() if args.config else None
        result = suggest(log, args.quantile, args.warmup, base)
    except (ClipLogError, SuggestError, ConfigError) as err:
        return fail("suggest", err)
    if args.format == "optuna":
        text = json.dumps(search_space(result, args.spread), indent=2) + "\n"
    elif args.format == "json":
        text = json.dumps(result["config"], indent=2) + "\n"
    else:
        text = result["comment"] + yaml.safe_dump(result["config"], sort_keys=False)
    table = format_table(result)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as file:
            file.write(text)
        print(table)
        print(f"distclip suggest: wrote {args.format} to {args.output}")
    else:
        print(table, file=sys.stderr)
        sys.stdout.write(text)
    return 0


# ------------------------------------------------------------------ the rule
def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default ``linear`` method)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def round_significant(value: float, digits: int = SIGNIFICANT) -> float:
    if value <= 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(value)))


def suggest(log: ClipLog, q: float, warmup: int | None = None, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Thresholds per group, what they would have clipped, and the config that carries them."""
    n = len(log.records)
    warmup = int(WARMUP_FRACTION * n) if warmup is None else warmup
    if warmup < 0 or warmup >= n:
        raise SuggestError(f"--warmup {warmup} leaves no clips of the {n} logged; pass a smaller --warmup")
    skipped = log.series("skipped")
    rows: list[dict[str, Any]] = []
    measured_only = {g["name"] for g in (log.header or {}).get("groups") or []
                     if "max_norm" in g and g["max_norm"] is None}
    for group in log.groups:
        if group in measured_only:  # max_norm: null: measured on purpose, never clipped; the config keeps it so
            continue
        norms = log.series(f"grad_norm/{group}")
        bad = log.series(f"nonfinite/{group}")
        usable = [v for i, v in enumerate(norms)
                  if i >= warmup and skipped[i] != 1 and bad[i] != 1 and math.isfinite(v)]
        if len(usable) < MIN_NORMS:
            raise SuggestError(f"group {group!r} has {len(usable)} usable norms after the first {warmup} clips "
                               f"(at least {MIN_NORMS} needed): log a longer run or pass a smaller --warmup")
        threshold = round_significant(quantile(usable, q))
        finite_all = [v for v in norms if math.isfinite(v)]
        rows.append({
            "group": group, "used": len(usable), "median": quantile(usable, 0.5), "max": max(usable),
            "threshold": threshold,
            "rate_all": sum(v + 1e-6 > threshold for v in finite_all) / max(len(finite_all), 1),
            "rate_after_warmup": sum(v + 1e-6 > threshold for v in usable) / len(usable),
            "clipped_in_log": sum(c == 1 for c in log.series(f"clipped/{group}")),
        })
    config, paths = with_thresholds(log, base, {r["group"]: r["threshold"] for r in rows})
    comment = (f"# distclip suggest: each threshold is the {q:g} quantile of the group's pre-clip norm over clips "
               f"{log.steps[warmup]}..{log.steps[-1]} of {log.path}\n# (the first {warmup} logged clips skipped as "
               f"warm-up); expected to clip about {1 - q:.0%} of steps per group.\n")
    return {"rows": rows, "config": config, "paths": paths, "quantile": q, "warmup": warmup, "log": log.path,
            "clips": n, "comment": comment}


def with_thresholds(log: ClipLog, base: dict[str, Any] | None,
                    thresholds: dict[str, float]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """The logged run's config with each group's ``max_norm`` set, and where each one sits in it.

    Groups made by ``per_layer`` / ``per_parameter`` become explicit groups matching exactly their
    parameters (listed in the log's header), so that each gets its own threshold.
    """
    header_groups = (log.header or {}).get("groups") or []
    config = copy.deepcopy(base if base is not None else (log.header or {}).get("config"))
    if config is None:
        if list(thresholds) != [DEFAULT_GROUP]:
            raise SuggestError(f"{log.path} has no header with the run's config, and its groups {list(thresholds)} "
                               "need their match patterns: pass the run's config with --config CONFIG.yaml")
        config = {}
    config.pop("log", None)  # the measuring run's log file: not the next run's
    groups = config.setdefault("groups", [])
    explicit = {g["name"]: i for i, g in enumerate(groups)}
    origin = {g["name"]: g for g in header_groups}
    per_layer_policy = (config.get("per_layer") or {}).get("policy")
    paths: dict[str, list[Any]] = {}
    for name, value in thresholds.items():
        if name == DEFAULT_GROUP:
            config["max_norm"] = value
            paths[name] = ["max_norm"]
        elif name in explicit:
            groups[explicit[name]]["max_norm"] = value
            paths[name] = ["groups", explicit[name], "max_norm"]
        elif name in origin and "params" in origin[name]:
            group = {"name": name, "match": [_literal(p) for p in origin[name]["params"]], "max_norm": value}
            if origin[name].get("origin") == "per_layer" and per_layer_policy is not None:
                group["policy"] = per_layer_policy
            groups.append(group)
            paths[name] = ["groups", len(groups) - 1, "max_norm"]
        else:
            raise SuggestError(f"group {name!r} of the log is not in the config (groups: {sorted(explicit)}); pass "
                               "the config the run used with --config")
    if any(origin.get(name, {}).get("origin") in ("per_layer", "per_parameter") for name in thresholds):
        config.pop("per_layer", None)
        config["per_parameter"] = False
    try:
        checked = ClipConfig.from_dict(config, source="suggested config")
    except ConfigError as err:
        raise SuggestError(f"the suggested config does not validate (is --config the run's?): {err}") from None
    return _lean(checked), paths


def _lean(config: ClipConfig) -> dict[str, Any]:
    """The config without the top-level settings that are at their defaults (what a user would write)."""
    defaults = ClipConfig().to_dict()
    return {k: v for k, v in config.to_dict().items() if k not in defaults or defaults[k] != v or k == "max_norm"}


def _literal(name: str) -> str:
    """A glob pattern matching exactly ``name`` (``[``, ``*``, ``?`` escaped)."""
    return "".join(f"[{c}]" if c in "[]*?" else c for c in name) if any(c in name for c in "[]*?") else name


def set_at(config: dict[str, Any], path: Sequence[Any], value: float) -> None:
    """Set ``config[path[0]][path[1]]... = value`` (a search-space parameter's ``path``)."""
    target: Any = config
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def search_space(result: dict[str, Any], spread: float) -> dict[str, Any]:
    """A JSON search space: per group a log-uniform range around the suggestion, and where it goes."""
    return {
        "about": "distclip per-group clip thresholds: for p in params: value = trial.suggest_float(p['name'], "
                 "p['low'], p['high'], log=p['log']); distclip.cli.suggest.set_at(config, p['path'], value)",
        "source": result["log"],
        "quantile": result["quantile"],
        "params": [{"name": f"max_norm/{r['group']}", "group": r["group"],
                    "low": round_significant(r["threshold"] / spread),
                    "high": round_significant(r["threshold"] * spread), "log": True, "suggested": r["threshold"],
                    "path": result["paths"][r["group"]]} for r in result["rows"]],
        "config": result["config"],
    }


def format_table(result: dict[str, Any]) -> str:
    header = (f"{'group':<16} {'norms':>6} {'median':>10} {'max':>10} {'max_norm':>10} {'clips (all)':>12} "
              f"{'after warm-up':>14}")
    lines = [f"distclip suggest: {result['clips']} clips in {result['log']}, first {result['warmup']} skipped as "
             f"warm-up, quantile {result['quantile']:g}", header, "-" * len(header)]
    for r in result["rows"]:
        lines.append(f"{r['group']:<16} {r['used']:>6} {r['median']:>10.4g} {r['max']:>10.4g} {r['threshold']:>10.4g} "
                     f"{r['rate_all']:>12.1%} {r['rate_after_warmup']:>14.1%}")
    if any(r["clipped_in_log"] for r in result["rows"]):
        lines.append("note: the logged run clipped: these are the pre-clip norms of a clipped trajectory, so this is "
                     "a refinement of the thresholds it ran with (a run with max_norm: inf gives the first round)")
    return "\n".join(lines)


