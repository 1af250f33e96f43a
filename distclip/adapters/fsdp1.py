"""FSDP1 (``FullyShardedDataParallel``): every sharding strategy, ``use_orig_params`` True or False.

Where each gradient element lives is read from FSDP's own handle metadata, per FSDP unit:

* FULL_SHARD / SHARD_GRAD_OP: each rank holds a disjoint shard of the unit's FlatParameter
  gradient: counted by its holder.
* NO_SHARD: every rank of the unit's process group holds the whole (averaged) gradient: each
  counts a disjoint 1/world slice.
* HYBRID_SHARD / _HYBRID_SHARD_ZERO2: sharded within the shard group, the same shard replicated
  across the replicate ("inter-node") group: each replica counts a disjoint 1/R slice of it.
* parameters FSDP does not manage (``ignored_states``, or outside every FSDP unit): assumed
  replicated over the reduce group, as FSDP's own ``clip_grad_norm_`` assumes (it is your job to
  synchronise them): each rank counts a 1/world slice.

Original parameter names come from the handle (``_fqns``); the local flat shard is mapped back
to the original parameters through ``_shard_param_infos`` (offset and length of each parameter's
piece in this rank's shard), so per-group clipping works by original names with
``use_orig_params=False`` too, a parameter straddling two ranks' shards is counted in two pieces,
and padding (shard tail, alignment) is never counted.

Two paths give the same norm:

* **comm hook** (non-hybrid strategies): distclip registers an FSDP communication hook that runs
  FSDP's default reduction (same pre/post division, same collective), then computes this rank's
  per-group partials on the reduced shard while backward goes on.
* **post-backward**: the same pieces read from the gradients after backward. FSDP refuses comm
  hooks under hybrid sharding, so HYBRID_SHARD models always take this path.

The hook result is used only when provably valid (:mod:`distclip.adapters.hooks`): every unit
holding a gradient reduced in the last backward, no sharded gradient accumulated into an older
one, an exact cast to the parameter dtype, and the gradients untouched since; anything else falls
back to the post-backward path. FSDP1's private handle metadata is read through
:class:`distclip.compat.pytorch.FSDP1Unit`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from ..compat import pytorch as _compat
from ..core.groups import GroupTable
from ..core.hook_choice import ReductionVenue
from ..core.names import canonical_name
from ..core.norms import SlotLayout, local_partials
from ..core.rowwise import RowPlan
from ..errors import ConfigError, UnsupportedLayoutError
from .base import GradAdapter
from .counting import LocalPiece, Replicas, cast_is_exact, counted_segments, covering_group, group_ranks
from .hooks import ReductionHook

HYBRID = frozenset({"HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"})


def fsdp1_units(module: torch.nn.Module) -> list[tuple[str, FSDP]]:
    """Every FSDP1 unit inside ``module`` (itself included) with its module path, in module order."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, FSDP)]


@dataclass
class _Unit:
    """One FSDP unit that owns a FlatParameter, and how its gradient is laid out on this rank."""

    index: int
    view: _compat.FSDP1Unit
    replicas: Replicas | None  # None: this rank alone holds its shard
    flat_pieces: list[LocalPiece] = field(default_factory=list)  # in the flat gradient (source 0)
    sources: list[int] = field(default_factory=list)  # adapter sources holding this unit's gradients
    hook_plan: tuple[list[tuple[int, int]], list[int]] | None = None

    @property
    def module(self) -> FSDP:
        return self.view.fsdp

    @property
    def flat_param(self) -> torch.nn.Parameter:
        return self.view.flat_param

    @property
    def strategy(self) -> str:
        return self.view.strategy


class FSDP1Adapter(GradAdapter):
    """FSDP1 gradients, each element counted once (see the module docstring)."""

    kind = "fsdp1"

    def __init__(self, module: torch.nn.Module):
        super().__init__([])
        self.module = module
        self.units: list[_Unit] = []
        self._sources: list[torch.Tensor] = []  # objects whose .grad holds local gradients
        self._values: list[tuple[_compat.FSDP1Unit, int, int] | None] = []  # per source: (unit, start, numel) of its
        # values in the unit's local shard; None: the source's own values (the flat parameter itself, or unmanaged)
        self._shapes: list[tuple[int, ...]] = []  # per name: the original (global) shape
        self._row_major: list[bool] = []  # per name: the flat order runs over whole rows (dim 0 outermost)
        self._named_tensors: dict[int, str] = {}  # original parameters that exist as tensors
        names: list[str] = []
        managed: set[int] = set()
        spans: list[tuple[frozenset[int], dist.ProcessGroup | None]] = []
        pieces: list[LocalPiece] = []

        for prefix, fsdp in fsdp1_units(module):
            view = _compat.FSDP1Unit(fsdp)
            if not view.has_params:
                continue
            managed.add(id(view.flat_param))
            managed.update(id(p) for p in view.orig_params + view.shared_params)
            spans.append(self._unit_span(view))
            unit = _Unit(len(self.units), view, self._unit_replicas(view, len(self.units)))
            pieces += self._add_unit(unit, prefix, names)
            self.units.append(unit)

        unmanaged = [(canonical_name(n), p) for n, p in module.named_parameters()
                     if id(p) not in managed and p.requires_grad]
        self.reduce_group = covering_group(spans or [(frozenset(range(dist.get_world_size())), None)], "FSDP")
        copy = Replicas(("unmanaged",), dist.get_rank(self.reduce_group), dist.get_world_size(self.reduce_group))
        self._managed_sources = len(self._sources)  # sources before this index: FSDP writes them
        self._unmanaged: list[LocalPiece] = []
        for name, p in unmanaged:
            self._unmanaged.append(LocalPiece(len(self._sources), 0, p.numel(), len(names), copy))
            self._sources.append(p)
            self._values.append(None)
            self._shapes.append(tuple(p.shape))
            self._row_major.append(True)
            names.append(name)
            self._named_tensors[id(p)] = name
        self.names = names
        self.params = []  # original parameters may not exist as tensors (use_orig_params=False)
        self.pieces = pieces + self._unmanaged

    # ----------------------------------------------------------------- layout
    @staticmethod
    def _unit_span(unit: _compat.FSDP1Unit) -> tuple[frozenset[int], dist.ProcessGroup | None]:
        """Every rank holding part of this unit's gradient (the same set on each of them), and its group if one
        exists."""
        if unit.strategy not in HYBRID:
            return group_ranks(unit.process_group), unit.process_group
        if unit.device_mesh is not None:
            return frozenset(unit.device_mesh.mesh.flatten().tolist()), None
        assert unit.inter_node_group is not None  # FSDP sets it for the hybrid strategies
        size = unit.process_group.size() * unit.inter_node_group.size()
        if size == dist.get_world_size():  # shard groups x replicate groups tile the world
            return frozenset(range(size)), None
        raise UnsupportedLayoutError(
            f"distclip: FSDP {unit.strategy} over {size} of {dist.get_world_size()} ranks given as a process-group "
            "pair: pass device_mesh=init_device_mesh(...) to FSDP so the ranks it spans are known"
        )

    @staticmethod
    def _unit_replicas(unit: _compat.FSDP1Unit, index: int) -> Replicas | None:
        """The unit's replica set: each unit's copies are split on their own, on both paths (the comm hook
        measures one unit at a time), so that ranks on different paths still count each element once."""
        if unit.strategy == "NO_SHARD":
            pg = unit.process_group
        elif unit.strategy in HYBRID:
            pg = unit.inter_node_group
        else:
            return None
        return Replicas((index, unit.strategy == "NO_SHARD", group_ranks(pg)), pg.rank(), pg.size())

    def _add_unit(self, unit: _Unit, prefix: str, names: list[str]) -> list[LocalPiece]:
        """Name the unit's original parameters; return where each one's local gradient lives."""
        view = unit.view
        pieces: list[LocalPiece] = []
        if not view.use_orig_params:
            if not view.flat_param.requires_grad:
                return pieces
            unit.sources.append(len(self._sources))
            self._sources.append(view.flat_param)
            self._values.append((view, 0, -1))
        params = view.orig_params if view.use_orig_params else [None] * len(view.fqns)
        for k, (fqn, info, param) in enumerate(zip(view.fqns, view.shard_infos, params)):
            if param is not None and not param.requires_grad:
                continue
            index = len(names)
            names.append(canonical_name(f"{prefix}.{fqn}" if prefix else fqn))
            self._shapes.append(view.shapes[k])
            self._row_major.append(_rows_outermost(view.shapes[k], view.strides[k]))
            if param is not None:
                self._named_tensors[id(param)] = names[-1]
            numel = info.numel_in_shard if info.in_shard else 0
            offset = view.intra_starts[k] if info.in_shard else 0  # in the parameter's flat order
            if info.in_shard:
                unit.flat_pieces.append(LocalPiece(0, info.offset_in_shard, numel, index, unit.replicas))
            if view.use_orig_params:  # the original parameter's .grad is its (flattened) local piece
                unit.sources.append(len(self._sources))
                pieces.append(LocalPiece(len(self._sources), 0, numel, index, unit.replicas, offset))
                self._sources.append(param)
                self._values.append((view, info.offset_in_shard if info.in_shard else 0, numel))
            elif info.in_shard:  # a range of the flat gradient
                pieces.append(LocalPiece(unit.sources[0], info.offset_in_shard, numel, index, unit.replicas, offset))
        return pieces

    def bind(self, table: GroupTable, layout: SlotLayout) -> None:
        super().bind(table, layout)
        self._counted_unmanaged = counted_segments(self._unmanaged)
        for unit in self.units:
            own = [LocalPiece(0, p.start, p.numel, p.param,
                              None if p.replicas is None else Replicas(unit.index, p.replicas.index, p.replicas.count))
                   for p in unit.flat_pieces if p.param not in self.uncounted]
            segments = counted_segments(own)
            unit.hook_plan = ([(lo, hi) for _, lo, hi, _ in segments], [self.group_of[i] for *_, i in segments])

    # ------------------------------------------------------------ gradients
    def local_grads(self) -> list[torch.Tensor | None]:
        return [s.grad for s in self._sources]

    def drop_grads(self) -> None:
        # With use_orig_params=True FSDP frees the flat gradient itself once every original
        # gradient is None (what optimizer.zero_grad(set_to_none=True) relies on).
        for source in self._sources:
            source.grad = None

    def tensor_names(self) -> dict[int, str]:
        return self._named_tensors

    def global_shapes(self) -> list[tuple[int, ...]]:
        return list(self._shapes)

    def local_params(self) -> list[torch.Tensor | None]:
        """Per source, its parameter values laid out like its gradient: the unit's local shard (or an original
        parameter's range of it), or an unmanaged parameter itself."""
        out: list[torch.Tensor | None] = []
        for source, where in zip(self._sources, self._values):
            if where is None:
                out.append(source.detach())
                continue
            view, start, numel = where
            shard = view.local_shard.detach()
            out.append(shard if numel < 0 else shard.narrow(0, start, numel))
        return out

    def refuse_row_layouts(self, plan: RowPlan) -> None:
        super().refuse_row_layouts(plan)
        for i in plan.by_param:
            if not self._row_major[i]:
                raise ConfigError(
                    f"distclip agc: FSDP1 flattens {self.names[i]!r} (shape {self._shapes[i]}) in a memory order whose "
                    "rows are not contiguous runs (a transposed or permuted tensor), so its shard cannot be mapped to "
                    "rows; make the parameter contiguous before wrapping, or clip it with another policy")

    def device_hint(self) -> torch.device | None:
        return next((s.grad.device for s in self._sources if s.grad is not None), None) or next(
            (u.flat_param.device for u in self.units), None)

    def describe(self) -> dict[str, object]:
        return {"adapter": self.kind, "num_params": len(self.names),
                "strategies": sorted({u.strategy for u in self.units}),
                "use_orig_params": sorted({u.view.use_orig_params for u in self.units})}

    # ----------------------------------------------------------------- hook
    def hook_unavailable_reason(self) -> str | None:
        """Why distclip cannot compute the norm inside FSDP's reduction here (None: it can)."""
        if not self.units:
            return "no FSDP unit owns parameters"
        hybrid = sorted({u.strategy for u in self.units} & HYBRID)
        if hybrid:
            return f"FSDP1 refuses communication hooks under hybrid sharding ({', '.join(hybrid)})"
        if any(u.view.comm_hook is not None for u in self.units):
            return "this model already has an FSDP communication hook (FSDP allows one)"
        if any(u.view.fake_reduce for u in self.units):
            return "FSDP fake reduction is enabled"
        return None

    def reduction_venue(self) -> ReductionVenue | None:
        """The units' process group reduces the gradients, on the flat parameters' device."""
        if not self.units:
            return None
        return self.venue_of(self.units[0].view.process_group, self.units[0].flat_param.device)

    def enable_reduction_hook(self, inner: Any = None, inner_state: Any = None) -> bool:
        """Compute the partials inside FSDP's gradient reduction (comm hook) where FSDP allows it.

        Hybrid strategies: FSDP forbids comm hooks, so the norm is computed after backward
        (returns False, silently: that path is just as exact). An existing comm hook: warns,
        returns False.
        """
        if inner is not None:
            warnings.warn("distclip: ddp_comm_hook applies to DDP only; ignored for FSDP", stacklevel=3)
        reason = self.hook_unavailable_reason()
        self.hook_status = reason or "comm_hook"
        if reason is not None:
            if "already has" in reason:
                warnings.warn(f"distclip: {reason}; computing the norm after backward instead.", stacklevel=3)
            return False
        _compat.track_amp_unscaling()
        self.hook = FSDP1NormHook(self)
        units = {id(u.module): u for u in self.units}
        # Outermost units first, so FSDP's lazy initialisation (which its first forward would do)
        # picks the right roots.
        for root in FSDP.fsdp_modules(self.module, root_only=True):
            root.register_comm_hook(state=None, hook=self.hook.reduce_and_measure)
        for _, fsdp in fsdp1_units(self.module):  # each unit gets its own state: the hook must know whose shard it is
            view = units.get(id(fsdp))
            (view.view if view is not None else _compat.FSDP1Unit(fsdp)).set_comm_hook_state(view)
        return True

    def reduced_partials(self) -> torch.Tensor | None:
        if self.hook is None:
            return None
        return self.with_pieces_outside_the_hook(self.hook.take(), self._counted_unmanaged)


def _rows_outermost(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether a flat order of this tensor (FSDP1 flattens non-contiguous tensors in memory order) keeps each
    dim-0 row one contiguous run: dim 0 is the outermost dimension in memory."""
    if len(shape) <= 1 or shape[0] <= 1:
        return True
    return strides[0] * shape[0] == math.prod(shape)


def _div_if_needed(tensor: torch.Tensor, factor: float) -> None:
    if factor > 1:  # FSDP's own rule
        tensor.div_(factor)


class FSDP1NormHook(ReductionHook[torch.Tensor]):
    """FSDP's default reduction, then this rank's per-group partials of the reduced shard."""

    def __init__(self, adapter: FSDP1Adapter):
        super().__init__(adapter.layout)
        self.adapter = adapter

    # -- called by FSDP in each unit's post-backward hook: (state, grad) for NO_SHARD,
    # (state, padded unsharded grad, sharded output) otherwise.
    def reduce_and_measure(self, unit, grad, output=None):
        self.begin()
        view = unit.view
        # A sharded gradient kept from an earlier backward will be added to this one afterwards.
        accumulating = output is not None and view.accumulating()
        _div_if_needed(grad, view.predivide)
        if output is None:
            dist.all_reduce(grad, group=view.process_group)
            reduced = grad
        else:
            dist.reduce_scatter_single(output, grad, group=view.process_group)
            reduced = output
        _div_if_needed(reduced, view.postdivide)
        if accumulating or not cast_is_exact(reduced.dtype, view.flat_param.dtype):
            self.invalidate()
            return
        slices, groups = unit.hook_plan
        device = self.adapter.collective_device([reduced])
        self.record(unit.index, local_partials([reduced[a:b] for a, b in slices], groups, self.adapter.layout, device))

    def gradients(self) -> list[torch.Tensor | None]:
        """Every gradient FSDP writes (unmanaged ones are measured at clip time)."""
        return [s.grad for s in self.adapter._sources[: self.adapter._managed_sources]]

    def complete(self) -> bool:
        sources = self.adapter._sources
        return all(unit.index in self.measured or all(sources[s].grad is None for s in unit.sources)
                   for unit in self.adapter.units)
