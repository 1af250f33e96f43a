"""``python -m distclip.bench.scale``: distclip's set-up and per-clip payload as the world grows, simulated.

One process plays ONE rank of a job of ``W`` ranks (torch's ``fake`` process-group backend: every
collective returns at once), builds that rank's share of a model laid out as DDP, FSDP2, HSDP,
tensor parallel x FSDP, a torchtitan-style unflattened mesh, a pipeline, or with declared tensors,
and builds distclip's :class:`~distclip.GradClipper` over it. Measured per (layout, W, P):

* **set-up time**: the CPU time of ``GradClipper(model, config)`` (``time.process_time``, best of a few:
  the fake collectives take none, and CPU time does not count the waits of a busy machine),
* **set-up memory**: the peak of Python allocations during it, and what it keeps (``tracemalloc``: the
  tables of ranks and parameters are Python objects; the few tensors, all O(W) or O(P), are not counted),
* **set-up bytes**: what the set-up exchanges send and receive on this rank,
* **per-clip payload**: the collectives of one ``clip()`` and their bytes (sent, received).

The set-up exchanges are all-gathers; the fake backend moves no data, so the bench answers them as the
other ranks would on a job where every rank agrees (the success path): this rank's own row on every
rank, except where a row depends on the rank (which pipeline stage each rank holds, each stage's
parameter names), which the bench computes from the layout. ``P`` counts parameter TENSORS (their
sizes matter to the kernels, not to the set-up).

Writes a JSON file (``--json``) and, with ``--plot``, a PNG of the curves.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import time
import tracemalloc
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

import distclip

from ..compat import pytorch as _compat
from ..core.reduce import hash60
from .measure import growth_exponent

LEAF_SHAPE = (16, 8)  # every parameter tensor: 128 elements, 16 rows
TP = 8  # tensor-parallel (and HSDP shard) degree of the 2-D/3-D layouts
PP = 4  # pipeline stages


# ------------------------------------------------------------------ the simulated exchanges
@dataclass
class Exchanges:
    """Answers the all-gathers distclip issues (fake backend: no data moves) and records every collective.

    ``rules``: functions ``(output, input, group, index) -> bool`` that fill the output as the other
    ranks would and return True; ``index`` counts the all-gathers since the last :meth:`take` (one
    set-up each). When no rule answers, every rank is taken to have sent this rank's input.
    """

    rules: list[Callable[[torch.Tensor, torch.Tensor, Any, int], bool]] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)

    @contextlib.contextmanager
    def active(self) -> Iterator["Exchanges"]:
        names = ("all_gather_single", "all_gather_into_tensor", "all_reduce")
        saved = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

        def gather(out: torch.Tensor, mine: torch.Tensor, group: Any = None, **_: Any) -> None:
            index = sum(c["op"] == "all_gather" for c in self.log)
            self.log.append({"op": "all_gather", "sent": mine.numel() * mine.element_size(),
                             "received": out.numel() * out.element_size(), "dtype": str(mine.dtype)})
            if not any(rule(out, mine, group, index) for rule in self.rules):
                out.view(-1, mine.numel()).copy_(mine.reshape(1, -1))

        def all_reduce(tensor: torch.Tensor, op: Any = None, group: Any = None, async_op: bool = False) -> Any:
            self.log.append({"op": f"all_reduce_{str(op).split('.')[-1].lower() if op is not None else 'sum'}",
                             "sent": tensor.numel() * tensor.element_size(),
                             "received": tensor.numel() * tensor.element_size(), "dtype": str(tensor.dtype)})
            return saved["all_reduce"](tensor, op=op if op is not None else dist.ReduceOp.SUM, group=group,
                                       async_op=async_op)

        for n in ("all_gather_single", "all_gather_into_tensor"):
            if n in saved:
                setattr(dist, n, gather)
        dist.all_reduce = all_reduce
        try:
            yield self
        finally:
            for n, fn in saved.items():
                setattr(dist, n, fn)

    def take(self) -> list[dict[str, Any]]:
        out, self.log = self.log, []
        return out


def rows_rule(group: Any, dtype: torch.dtype, rows: Callable[[], torch.Tensor]) -> Callable[..., bool]:
    """A rule for the all-gathers over ``group`` of ``dtype``: rank r's row is ``rows()[r]`` (zero-padded)."""

    def rule(out: torch.Tensor, mine: torch.Tensor, g: Any, index: int) -> bool:
        if g is not group or mine.dtype != dtype:
            return False
        table, given = out.view(-1, mine.numel()), rows()
        table.zero_()
        width = min(mine.numel(), given.shape[1])
        table[:, :width] = given[:, :width]
        return True

    return rule


# ------------------------------------------------------------------ models
class Leaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(LEAF_SHAPE))


class Model(nn.Module):
    """``layers.{i}.weight`` for i in [first, first + count): the names a pipeline stage keeps from the full model."""

    def __init__(self, count: int, first: int = 0):
        super().__init__()
        self.layers: nn.ModuleDict = nn.ModuleDict({str(first + i): Leaf() for i in range(count)})


CONFIG = {  # four explicit groups and the default one: G = 5 (every group in p = 2)
    "max_norm": 1.0,
    "comm_hook": False,
    "groups": [{"name": f"g{k}", "match": [f"layers.*{k}.weight"], "max_norm": 0.5 + k} for k in range(4)],
}


@dataclass
class Layout:
    """One rank's share of a model and how to build distclip on it."""

    model: Any
    kwargs: dict[str, Any] = field(default_factory=dict)
    rules: list[Callable[..., bool]] = field(default_factory=list)


def _mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def _titan_mesh(sizes: tuple[int, ...], names: tuple[str, ...]) -> Any:
    """torchtitan 0.3's ParallelDims.build_mesh: one 1-D world mesh, unflattened into named dimensions."""
    return _compat.unflatten_mesh(_mesh((dist.get_world_size(),), ("world",)), sizes, names)


def _local_shape(shape: tuple[int, ...], mesh: Any, placements: list[Any]) -> tuple[int, ...]:
    """This rank's local shape of a DTensor (torch.chunk arithmetic: ``ceil(n / k)`` rows per rank, the last
    ones short or empty). The set-up reads only metadata, so the bench builds each DTensor from its local part
    (``DTensor.from_local``: O(1) a tensor, where ``distribute_tensor`` and ``fully_shard`` split the whole
    tensor over the mesh: O(W) a tensor)."""
    local = list(shape)
    coordinate = mesh.get_coordinate()
    for dim, placement in enumerate(placements):
        if placement.is_shard():
            n, k = local[placement.dim], mesh.size(dim)
            chunk = -(-n // k)
            local[placement.dim] = max(0, min(n, (coordinate[dim] + 1) * chunk) - min(n, coordinate[dim] * chunk))
    return tuple(local)


def _dtensor_params(model: Model, place: Callable[[int], tuple[Any, list[Any]]]) -> nn.Module:
    """Every parameter ``i`` of ``model`` made a DTensor on the mesh and placements ``place(i)``."""
    from torch.distributed.tensor import DTensor

    for i, leaf in enumerate(model.layers.values()):
        mesh, placements = place(i)
        local = torch.randn(_local_shape(LEAF_SHAPE, mesh, placements))
        leaf.weight = nn.Parameter(DTensor.from_local(local, mesh, placements, run_check=False,
                                                      shape=torch.Size(LEAF_SHAPE), stride=(LEAF_SHAPE[1], 1)))
    return model


def build_ddp(world: int, params: int) -> Layout:
    """DDP over the world: every parameter a copy on every rank."""
    return Layout(nn.parallel.DistributedDataParallel(Model(params)))


def build_replicate(world: int, params: int) -> Layout:
    """DTensor ``Replicate`` over a 1-D world mesh (DDP-like replication, read from placements)."""
    from torch.distributed.tensor import Replicate

    mesh = _mesh((world,), ("dp",))
    return Layout(_dtensor_params(Model(params), lambda i: (mesh, [Replicate()])))


def build_fsdp2(world: int, params: int) -> Layout:
    """FSDP2's layout over a 1-D world mesh: every parameter ``Shard(0)``."""
    from torch.distributed.tensor import Shard

    mesh = _mesh((world,), ("dp",))
    return Layout(_dtensor_params(Model(params), lambda i: (mesh, [Shard(0)])))


def build_hsdp(world: int, params: int) -> Layout:
    """HSDP's layout: (replicate W/8, shard 8), every parameter ``(Replicate(), Shard(0))``."""
    from torch.distributed.tensor import Replicate, Shard

    mesh = _mesh((world // TP, TP), ("replicate", "shard"))
    return Layout(_dtensor_params(Model(params), lambda i: (mesh, [Replicate(), Shard(0)])))


def build_tp_fsdp(world: int, params: int) -> Layout:
    """(dp W/8, tp 8): half the tensors sharded on both dimensions (FSDP on dim 0, tensor parallel on dim 1),
    the other half (norms, embeddings) on the ``dp`` sub-mesh only: copies over the tp ranks. The sub-mesh
    is sliced for every tensor (``mesh["dp"]`` is a new object each time), as a per-layer plan does."""
    from torch.distributed.tensor import Shard

    mesh = _mesh((world // TP, TP), ("dp", "tp"))
    return Layout(_dtensor_params(Model(params), lambda i: (mesh, [Shard(0), Shard(1)]) if i % 2 == 0
                                  else (mesh["dp"], [Shard(0)])))


def build_titan(world: int, params: int) -> Layout:
    """torchtitan-style: the world mesh unflattened into (dp_shard, cp 2, tp 4); half the tensors tensor-parallel
    on ``tp`` (copies over dp_shard x cp), half sharded over the flattened ``dp_shard_cp`` (copies over tp)."""
    from torch.distributed.tensor import Shard

    mesh = _titan_mesh((world // TP, 2, TP // 2), ("dp_shard", "cp", "tp"))
    fsdp_mesh = _compat.flatten_mesh(mesh["dp_shard", "cp"], "dp_shard_cp")
    tp_mesh = mesh["tp"]
    return Layout(_dtensor_params(Model(params), lambda i: (tp_mesh, [Shard(0)]) if i % 2 == 0
                                  else (fsdp_mesh, [Shard(0)])))


def build_pipeline(world: int, params: int) -> Layout:
    """torchtitan-style (pp 4, dp W/4) from the world mesh; this rank's stage ``Shard(0)`` over ``dp``."""
    from torch.distributed.tensor import Shard

    mesh = _titan_mesh((PP, world // PP), ("pp", "dp"))
    per_stage = max(1, params // PP)
    stage = dist.get_rank() // (world // PP)
    dp_mesh = mesh["dp"]
    model = _dtensor_params(Model(per_stage, first=stage * per_stage), lambda i: (dp_mesh, [Shard(0)]))
    pp_group = mesh["pp"].get_group()
    names = [json.dumps([[k, [f"layers.{k * per_stage + i}.weight" for i in range(per_stage)]]]).encode()
             for k in range(PP)]
    stage_of_rank = (torch.arange(world) // (world // PP)).view(-1, 1)
    width = max(len(n) for n in names)
    payloads = torch.zeros(PP, width, dtype=torch.uint8)
    for k, n in enumerate(names):
        payloads[k, : len(n)] = torch.frombuffer(bytearray(n), dtype=torch.uint8)
    rules = [
        rows_rule(dist.group.WORLD, torch.int64, lambda: stage_of_rank),
        rows_rule(pp_group, torch.int64, lambda: torch.tensor([[len(n)] for n in names])),
        rows_rule(pp_group, torch.uint8, lambda: payloads),
    ]
    # the set-up's first all-gather is the stage exchange; later ones over the world (the check, the census) agree
    first = rules[0]

    def stage_rule(out: torch.Tensor, mine: torch.Tensor, g: Any, index: int) -> bool:
        return index == 0 and first(out, mine, g, index)

    return Layout(model, {"pipeline_group": mesh["pp"]}, [stage_rule, *rules[1:]])


def build_declared(world: int, params: int) -> Layout:
    """Megatron-style: DDP over dp (W/8) and hand-written tensor parallelism over tp (8), declared:
    half the tensors ``sharded_over`` tp, half ``replicated_over`` tp (the census checks those)."""
    mesh = _mesh((world // TP, TP), ("dp", "tp"))
    model = Model(params)
    for i, leaf in enumerate(model.layers.values()):
        if i % 2 == 0:
            distclip.declare(leaf.get_parameter("weight"), sharded_over=mesh["tp"])
        else:
            distclip.declare(leaf.get_parameter("weight"), replicated_over=mesh["tp"])
    # the census publishes, per declared group, (hash of its ranks, its size, hash of its digests): every
    # tensor-parallel group its own ranks' hash, the same digests (DDP replicas hold the same values)
    keys = torch.tensor([hash60(repr(list(range(g * TP, (g + 1) * TP)))) for g in range(world // TP)])
    key_of_rank = keys.repeat_interleave(TP)

    def census_rule(out: torch.Tensor, mine: torch.Tensor, g: Any, index: int) -> bool:
        if g is not dist.group.WORLD or mine.dtype != torch.int64 or mine.numel() != 3 or index != 2:
            return False  # index 0: the set-up check; 1: the census's row lengths; 2: its rows
        table = out.view(-1, 3)
        table.copy_(mine.reshape(1, 3))
        table[:, 0] = key_of_rank
        return True

    return Layout(nn.parallel.DistributedDataParallel(model, process_group=mesh["dp"].get_group()), rules=[census_rule])


LAYOUTS: dict[str, Callable[[int, int], Layout]] = {
    "ddp": build_ddp, "replicate": build_replicate, "fsdp2": build_fsdp2, "hsdp": build_hsdp,
    "tp_fsdp": build_tp_fsdp, "titan": build_titan, "pipeline": build_pipeline, "declared": build_declared,
}


# ------------------------------------------------------------------ one measurement
def simulated_rank(world: int) -> int:
    """The rank this process plays: inside the job, on no dimension's first coordinate."""
    return world // 2 + world // 8 + 1 if world > 2 else world - 1


@contextlib.contextmanager
def fake_world(world: int) -> Iterator[None]:
    _compat.init_fake_process_group(simulated_rank(world), world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _set_grads(model: Any) -> None:
    for p in model.parameters():
        p.grad = torch.ones_like(p)


def measure_setup(layout_name: str, world: int, params: int, config: dict[str, Any],
                  repeats: int = 3) -> dict[str, Any]:
    """Set-up time, memory and bytes, and the per-clip collectives, of one layout at (W, P)."""
    with fake_world(world):
        layout = LAYOUTS[layout_name](world, params)
        exchanges = Exchanges(rules=layout.rules)
        times: list[float] = []
        with warnings.catch_warnings(), exchanges.active():
            warnings.simplefilter("ignore")
            gc.collect()
            gc.disable()  # the set-up's own work, not a collection of the bench's garbage that happens to fall in it
            try:
                for _ in range(repeats):
                    start = time.process_time()
                    clipper = distclip.GradClipper(layout.model, config, **layout.kwargs)
                    times.append(time.process_time() - start)
                    setup = exchanges.take()
                    del clipper
                    if times[-1] > 0.5:  # slow: one more (the memory run) is enough
                        break
            finally:
                gc.enable()
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            clipper = distclip.GradClipper(layout.model, config, **layout.kwargs)
            gc.collect()
            kept, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            exchanges.take()
            _set_grads(layout.model)
            clipper.clip()
            clip = exchanges.take()
        slots = clipper.layout.num_slots + (2 * clipper.rows.num_rows if clipper.rows is not None else 0)
        return {
            "layout": layout_name, "world": world, "params": params, "groups": len(clipper.group_names),
            "setup_ms": min(times) * 1e3, "setup_peak_kib": (peak - before) / 1024,
            "setup_kept_kib": (kept - before) / 1024,
            "setup_sent_bytes": sum(c["sent"] for c in setup),
            "setup_received_bytes": sum(c["received"] for c in setup),
            "setup_collectives": len(setup), "slots": slots,
            "clip_collectives": [c["op"] for c in clip], "clip_sent_bytes": sum(c["sent"] for c in clip),
            "clip_received_bytes": sum(c["received"] for c in clip),
        }


def measure_payload(world: int, groups: int, mixed: bool) -> dict[str, Any]:
    """The collectives of one clip of a DDP model of ``groups`` tensors, one group each (the first in p = inf
    when ``mixed``: a configuration whose slots need both SUM and MAX)."""
    config: dict[str, Any] = {"max_norm": 1.0, "comm_hook": False, "per_parameter": groups > 1}
    if mixed:
        config["groups"] = [{"name": "inf", "match": ["layers.0.weight"], "norm_type": math.inf}]
    with fake_world(world):
        model = nn.parallel.DistributedDataParallel(Model(groups))
        exchanges = Exchanges()
        with warnings.catch_warnings(), exchanges.active():
            warnings.simplefilter("ignore")
            clipper = distclip.GradClipper(model, config)
            exchanges.take()
            _set_grads(model)
            clipper.clip()
            clip = exchanges.take()
    return {"world": world, "tensors": groups, "groups": len(clipper.group_names), "mixed_p": mixed,
            "slots": clipper.layout.num_slots,
            "collectives": [c["op"] for c in clip], "sent_bytes": sum(c["sent"] for c in clip),
            "received_bytes": sum(c["received"] for c in clip)}


# ------------------------------------------------------------------ the sweep
def slopes(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Log-log growth of ``key``: along W (largest P), along P (largest W), and along the diagonal W ~ P."""
    out: dict[str, float] = {}
    worlds = sorted({r["world"] for r in rows})
    sizes = sorted({r["params"] for r in rows})
    at = {(r["world"], r["params"]): r[key] for r in rows}
    along_w = [(w, at[(w, sizes[-1])]) for w in worlds if (w, sizes[-1]) in at]
    along_p = [(p, at[(worlds[-1], p)]) for p in sizes if (worlds[-1], p) in at]
    diagonal = [(w * p, at[(w, p)]) for w, p in zip(worlds, sizes) if (w, p) in at]
    for name, series in (("W", along_w), ("P", along_p), ("diagonal", diagonal)):
        if len(series) >= 2:
            out[name] = growth_exponent([x for x, _ in series], [y for _, y in series])
    # along the diagonal both grow by the same factor: report the slope against that factor (1 = linear in P + W)
    if "diagonal" in out:
        out["diagonal"] *= 2
    return out


def run(worlds: list[int], sizes: list[int], layouts: list[str], payload_worlds: list[int],
        payload_groups: list[int], budget: float = math.inf, verbose: bool = True) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    skipped: list[Any] = []
    gc.freeze()  # torch's objects: out of every later collection (a full one costs ~0.2 s with torch loaded)
    for name in layouts:
        for world in worlds:
            for params in sizes:
                last = next((r for r in reversed(rows) if r["layout"] == name and r["params"] == params), None)
                if last is not None and last["setup_ms"] / 1e3 * world / last["world"] > budget:
                    skipped.append({"layout": name, "world": world, "params": params})
                    if verbose:
                        print(f"{name:10s} W={world:6d} P={params:6d}  skipped: projected over --budget {budget:g} s")
                    continue
                row = measure_setup(name, world, params, CONFIG)
                rows.append(row)
                if verbose:
                    print(f"{name:10s} W={world:6d} P={params:6d}  {row['setup_ms']:9.1f} ms  "
                          f"peak {row['setup_peak_kib']:10.0f} KiB  kept {row['setup_kept_kib']:9.0f} KiB  "
                          f"set-up recv {row['setup_received_bytes']:10d} B  "
                          f"clip {row['clip_collectives']} {row['clip_received_bytes']} B", flush=True)
    growth = {name: {key: slopes([r for r in rows if r["layout"] == name], key)
                     for key in ("setup_ms", "setup_peak_kib", "setup_received_bytes")} for name in layouts}
    payload = [measure_payload(w, g, mixed) for w in payload_worlds for g in payload_groups for mixed in (False, True)]
    return {"machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()
                        or platform.machine()},
            "config": CONFIG, "setup": rows, "skipped": skipped, "growth": growth, "payload": payload}


def print_tables(results: dict[str, Any]) -> None:
    rows = results["setup"]
    print("\n== set-up of GradClipper on one simulated rank (CPU ms, best of up to 3; memory: tracemalloc peak) ==")
    header = (f"{'layout':10s} {'W':>6s} {'P':>6s} {'ms':>9s} {'peak KiB':>10s} {'kept KiB':>9s} {'recv KiB':>9s} "
              f"{'colls':>5s} {'slots':>5s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['layout']:10s} {r['world']:6d} {r['params']:6d} {r['setup_ms']:9.1f} {r['setup_peak_kib']:10.0f} "
              f"{r['setup_kept_kib']:9.0f} {r['setup_received_bytes'] / 1024:9.1f} {r['setup_collectives']:5d} "
              f"{r['slots']:5d}")
    print("\n== growth exponents (log-log slopes; 1 = linear, 2 = quadratic; 'diagonal': W and P grown together) ==")
    for name, keys in results["growth"].items():
        print(f"{name:10s} " + "  ".join(f"{key}: " + ", ".join(f"{k} {v:.2f}" for k, v in s.items())
                                        for key, s in keys.items()))
    print("\n== per-clip payload (a DDP model, per_parameter groups; 'mixed': one group in p = inf) ==")
    print(f"{'W':>6s} {'G':>6s} {'mixed':>5s} {'slots':>6s} {'collectives':>28s} {'sent B':>9s} {'received B':>11s}")
    for r in results["payload"]:
        print(f"{r['world']:6d} {r['groups']:6d} {r['mixed_p']!s:>5s} {r['slots']:6d} "
              f"{','.join(r['collectives']):>28s} {r['sent_bytes']:9d} {r['received_bytes']:11d}")


def plot(results: dict[str, Any], path: Path, baseline: dict[str, Any] | None = None) -> None:
    """The curves as a PNG: set-up time, memory and bytes against W (and time against P), the per-clip bytes;
    ``baseline`` (an earlier run's results) dashed beside them where it differs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["setup"]
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    worlds = sorted({r["world"] for r in rows})
    sizes = sorted({r["params"] for r in rows})
    mid = sizes[len(sizes) // 2]
    common = sorted(set(worlds) & {r["world"] for r in baseline["setup"]}) if baseline is not None else worlds
    top = (common or worlds)[-1]  # the largest world size both runs measured
    colors = {name: f"C{i}" for i, name in enumerate(layouts)}
    panels = [("setup_ms", "world", "params", mid, f"set-up CPU time, P = {mid} tensors", "ms"),
              ("setup_ms", "params", "world", top, f"set-up CPU time, W = {top}", "ms"),
              ("setup_peak_kib", "world", "params", mid, f"set-up peak Python memory, P = {mid}", "KiB"),
              ("setup_received_bytes", "world", "params", mid, f"set-up bytes received, P = {mid}", "bytes")]
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    flat = list(axes.flat)
    for ax, (key, x, fixed, value, title, unit) in zip(flat, panels):
        for name in layouts:
            for source, style in ((results, "-"), (baseline, "--")):
                if source is None:
                    continue
                series = sorted((r[x], r[key]) for r in source["setup"] if r["layout"] == name and r[fixed] == value)
                now = sorted((r[x], r[key]) for r in rows if r["layout"] == name and r[fixed] == value)
                if style == "--" and _close(series, now):
                    continue  # the baseline matches: one curve
                ax.plot([a for a, _ in series], [b for _, b in series], style, marker="o", markersize=3,
                        color=colors[name], label=name if style == "-" else f"{name} (before)")
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.set_xlabel("world size W" if x == "world" else "parameter tensors P")
    ax = flat[4]
    for source, style in ((results, "-"), (baseline, "--")):
        if source is None:
            continue
        payload = source["payload"]
        for i, n in enumerate(sorted({_tensors(p) for p in payload})):
            for mixed in (False, True):
                points = sorted((p["world"], p["received_bytes"], p["groups"]) for p in payload
                                if p["mixed_p"] == mixed and _tensors(p) == n)
                if not points or (style == "--" and not mixed):
                    continue
                ax.plot([w for w, _, _ in points], [b for _, b, _ in points], style, marker="s" if mixed else "o",
                        markersize=3, color=f"C{i}", label=f"G={points[0][2]}{' (one in p = inf)' if mixed else ''}"
                        f"{' (before)' if style == '--' else ''}")
    ax.set_title("per-clip bytes received per rank")
    ax.set_ylabel("bytes")
    ax.set_xlabel("world size W")
    for ax in flat[:5]:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    flat[5].axis("off")
    flat[5].text(0, 0.5, "One simulated rank of W (torch's fake process group).\n"
                 "Solid: now; dashed: before the fixes (where different).\n"
                 "Linear in P + W: slope <= 1 on these log-log axes;\n"
                 "the per-clip bytes flat in W.", fontsize=11, va="center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def _tensors(row: dict[str, Any]) -> int:
    """The model size of a payload row (older results lack the field: one group per tensor, plus default)."""
    if "tensors" in row:
        return row["tensors"]
    return row["groups"] - 1 if row["mixed_p"] or row["groups"] > 1 else 1


def _close(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> bool:
    """Two series within 35% of each other at every point (timing noise): drawn once."""
    return len(a) == len(b) and all(x == y and abs(u - v) <= 0.35 * max(u, v) for (x, u), (y, v) in zip(a, b))


def _ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distclip.bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="8,64,512,4096", help="world sizes W, comma-separated")
    parser.add_argument("--params", default="100,1000,10000", help="parameter tensors P, comma-separated")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"from {list(LAYOUTS)}")
    parser.add_argument("--payload-worlds", default="8,64,512,4096,16384")
    parser.add_argument("--payload-groups", default="1,16,256")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="CPU seconds: skip a set-up whose time, projected linearly from the previous world size, "
                             "is over this")
    parser.add_argument("--json", default="bench-results/scale.json")
    parser.add_argument("--plot", default="", help="write the curves as a PNG here")
    parser.add_argument("--baseline", default="", help="an earlier run's JSON, drawn dashed in the plot")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = run(_ints(args.worlds), _ints(args.params), args.layouts.split(","), _ints(args.payload_worlds),
                  _ints(args.payload_groups), args.budget)
    print_tables(results)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")
    if args.plot:
        plot(results, Path(args.plot), json.loads(Path(args.baseline).read_text()) if args.baseline else None)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
