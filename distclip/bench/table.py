"""Plain-text tables for the benchmark results."""

from __future__ import annotations

import math
from typing import Any


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def print_backend_table(backend: str, params: int, rows: list[dict[str, Any]], machine: dict[str, Any]) -> None:
    print(f"\n== {backend}: {rows[0]['num_params'] / 1e6:.1f}M params, {machine['world_size']} ranks "
          f"({machine['backend']}), median of measured steps ==")
    width = max(22, *(len(r["variant"]) for r in rows))
    header = (f"{'variant':{width}s} {'clip ms':>9s} {'ms/M':>7s} {'step ms':>9s} {'vs native':>9s} "
              f"{'vs uniform':>11s} {'policy/fix':>10s} {'clip % step':>11s} {'step +%':>8s} {'colls':>6s} "
              f"{'+mem MB':>8s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['variant']:{width}s} {_fmt(r['clip_ms']):>9s} {_fmt(r.get('clip_ms_per_M'), '.3f'):>7s} "
              f"{_fmt(r['step_ms']):>9s} {_fmt(r.get('clip_vs_native')):>9s} "
              f"{_fmt(r.get('groups_vs_uniform')):>11s} {_fmt(r.get('policy_vs_fixed')):>10s} "
              f"{_fmt(r.get('clip_pct_of_step'), '.1f'):>11s} "
              f"{_fmt(r.get('step_overhead_pct'), '+.1f'):>8s} "
              f"{_fmt(r['collectives'], 'd'):>6s} {_fmt(r['peak_mem_added_bytes'] / 1e6, '.1f'):>8s}")


def print_scaling(scaling: dict[str, Any]) -> None:
    sizes = scaling["sizes"]
    print("\n== clip time (s) against the number of 8x16 tensors ==")
    print(f"{'':34s}" + "".join(f"{n:>10d}" for n in sizes) + f"{'exponent':>10s}")
    for name, data in scaling["series"].items():
        cells = "".join(f"{_fmt(data['seconds'].get(str(n)), '.4f'):>10s}" for n in sizes)
        print(f"{name:34s}{cells}{_fmt(data['growth_exponent']):>10s}")
    print("('-': skipped, projected over the time budget)")


def print_bandwidth(bw: dict[str, Any]) -> None:
    gb = bw["gradient_bytes"] / 1e9
    print(f"\n== bandwidth on {gb:.2f} GB of fp32 gradients per rank ==")
    for name in ("copy", "norm", "norm_and_scale"):
        row = bw[name]
        print(f"{name:16s} {row['seconds'] * 1e3:9.2f} ms  {row['GBps']:7.2f} GB/s "
              f"(traffic {row['traffic_bytes'] / 1e9:.2f} GB, {row['GBps'] / bw['copy']['GBps']:.2f}x copy)")


def print_kernels(rows: list[dict[str, Any]], machine: dict[str, Any]) -> None:
    print(f"\n== local norm kernels: torch's fp32 foreach norm vs distclip power_sums, same tensors, in turns "
          f"({machine['threads_per_rank']} thread(s) per rank, best of the runs) ==")
    header = f"{'case':14s} {'p':>4s} {'torch ms':>10s} {'distclip ms':>12s} {'ratio':>7s} {'pair ratio':>11s} " \
             f"{'torch err':>10s} {'distclip err':>13s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['case']:14s} {r['p']:4.1f} {r['torch_ms']:10.2f} {r['distclip_ms']:12.2f} {r['ratio']:7.2f} "
              f"{r['median_pair_ratio']:11.2f} {r['torch_err']:10.1e} {r['distclip_err']:13.1e}")
    print("(err: worst relative error of a tensor's sum |t|^p against float64 on the same values; "
          "pair ratio: median of distclip/torch over the runs)")


def print_targets(targets: dict[str, Any], machine: dict[str, Any]) -> None:
    load = targets.get("load_1min") or []
    print(f"\n== speed targets: distclip vs the native alternative, same run, in turns ({machine['threads_per_rank']} "
          f"thread(s) per rank; 1-min load {' -> '.join(f'{x:.2f}' for x in load)}) ==")
    header = f"{'target':44s} {'case':44s} {'distclip':>10s} {'native':>10s} {'vs native':>10s} {'paired':>9s} " \
             f"{'goal':>24s} {'met':>4s} {'err':>8s}"
    print(header)
    print("-" * len(header))
    for r in targets["rows"]:
        unit = r["unit"]
        vs = f"{r['vs_native']:.2f}x" if r["compare"] == "ratio" else f"{r['vs_native']:+.3f}{unit}"
        paired = f"{r['paired_vs_native']:.2f}x" if r["compare"] == "ratio" else f"{r['paired_vs_native']:+.3f}{unit}"
        print(f"{r['target'][:44]:44s} {r['case'][:44]:44s} {r['distclip']:8.3f}{unit:>2s} "
              f"{r['native']:8.3f}{unit:>2s} {vs:>10s} {paired:>9s} {r['goal']:>24s} {'yes' if r['met'] else 'NO':>4s} "
              f"{_fmt(r.get('max_rel_err'), '.1e'):>8s}")
    print("(best of the turns; paired: median over the turns of distclip/native, or of distclip - native; "
          "err: worst relative error of a tensor's sum |t|^p against float64)")
