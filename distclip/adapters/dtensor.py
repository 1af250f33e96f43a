"""FSDP2 (``fully_shard``) and any DTensor gradients: each element counted once, from placement metadata.

A DTensor gradient's local tensor (``grad._local_tensor``) is this rank's part of it. For each
mesh dimension the placement says how the tensor spreads over that dimension's ranks:

* ``Shard`` (and strided shards): disjoint parts: each is counted by its holder (uneven and
  empty local shards included: an empty one contributes nothing, and its rank still joins).
* ``Replicate``: identical copies (the replicate dimension of an HSDP mesh): the copies of one
  replica set are split into disjoint 1/R slices, so each element is counted once (under
  ``fully_shard``, per parameter group, as its all-reduce hook measures them: both paths count
  the same elements).
* a sub-mesh (``mesh["dp"]`` of ``(dp, tp)``: modules left out of tensor parallelism, experts on
  an ``ep`` sub-mesh), however the framework built it (slicing, flattening, unflattening a 1-D
  world mesh): each instance of the sub-mesh holds a copy, counted once over the job
  (:mod:`distclip.adapters.mesh_geometry`).
* ``Partial``: not reduced yet: refused (clip after the reduction).

Parameters may live on different meshes in one model (torch's own ``clip_grad_norm_`` fails
there: pytorch #180346): each is handled on its own mesh, and one collective over a group
spanning every mesh combines them. Plain (non-DTensor) parameters next to DTensor ones (LoRA
adapters attached after ``fully_shard``, parameters in ``ignored_params``) are taken to be
replicated over that group, unless declared with :func:`distclip.declare` (experts as plain tensors,
each rank its own: ``declare(experts, sharded_over=ep_group, replicated_over=dp_group)``). Cost is linear in the
number of parameters: local foreach norms and one all-reduce, never a stack of DTensor norms (quadratic: pytorch
#169445).

With ``fully_shard`` modules, the norm is computed inside the reduction: distclip sets each
module's all-reduce hook (``FSDPModule.set_all_reduce_hook``), which FSDP calls with the
reduce-scatter output (after the HSDP all-reduce) of each parameter group as it arrives in
backward; the per-group partials of that flat shard are computed there. The result is used only
when provably valid (:mod:`distclip.adapters.hooks`): no accumulation into an older gradient, no
division after the hook, an exact dtype cast, gradients untouched since.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence, cast

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..compat import pytorch as _compat
from ..core.groups import GroupTable
from ..core.hook_choice import ReductionVenue
from ..core.norms import SlotLayout, local_partials
from ..core.rowwise import RowPlan
from ..errors import ConfigError, PartialGradientError, UnsupportedLayoutError
from .base import GradAdapter
from .counting import (
    LocalPiece,
    Replicas,
    Segment,
    cast_is_exact,
    counted_segments,
    covering_group,
    group_ranks,
    slice_segments,
)
from .declared import declaration_of, declared_replicas
from .hooks import ReductionHook
from .mesh_geometry import MeshGeometry, PipelineStages

local_tensor = _compat.local_tensor  # kept importable from here


class DTensorAdapter(GradAdapter):
    """DTensor (FSDP2, HSDP, TP, EP, mixed meshes) gradients, plus plain ones beside them (see the module docstring)."""

    kind = "fsdp2"

    def __init__(self, named_params: Sequence[tuple[str, torch.Tensor]], module: torch.nn.Module | None = None,
                 stages: PipelineStages | None = None):
        super().__init__(named_params)
        self.module = module
        self._rank = dist.get_rank()
        self._stages = stages
        self._replica_cache: dict[tuple[int, tuple[Any, ...]], Replicas | None] = {}  # (id(geometry), placements)
        self._geometries: dict[int, tuple[Any, MeshGeometry]] = {}  # id(mesh) -> (mesh, geometry)
        self._layouts: dict[tuple[Any, ...], MeshGeometry] = {}  # mesh_identity -> geometry (shared by equal meshes)
        self._offsets: dict[tuple[Any, ...], int | None] = {}  # (id(geometry), placements, shape) -> flat offset
        spans: dict[frozenset[int], tuple[frozenset[int], dist.ProcessGroup | None]] = {}
        seen: set[int] = set()  # geometries whose span is in ``spans`` (two meshes may span equal sets: compare once)
        dtensor_pieces: list[LocalPiece] = []
        plain: list[int] = []
        for i, p in enumerate(self.params):
            if not isinstance(p, DTensor):
                plain.append(i)
                continue
            geometry = self.geometry(p.device_mesh)
            if id(geometry) not in seen and geometry.span not in spans:  # every rank of the mesh's instances
                spans[geometry.span] = (geometry.span, geometry.root_group())  # holds a copy or a part
            seen.add(id(geometry))
            piece = self._piece(i, p)
            if piece is not None:
                dtensor_pieces.append(piece)
        world = frozenset(range(dist.get_world_size()))
        rank_sets = list(spans.values()) + ([(world, None)] if plain and stages is None else [])
        self._span = rank_sets[0][0] if len(rank_sets) == 1 else frozenset().union(*(r for r, _ in rank_sets)) \
            if rank_sets else world
        self.reduce_group = covering_group(rank_sets, "DTensor")
        self._plain = self._plain_pieces(plain)
        self.pieces = dtensor_pieces + self._plain
        self._placements = {i: (id(p.device_mesh), tuple(p.placements)) for i, p in enumerate(self.params)
                            if isinstance(p, DTensor)}
        self._specs = [_compat.dtensor_spec(p) for p in self.params]  # FSDP2 gives gradients the same spec object

    def _plain_pieces(self, plain: list[int]) -> list[LocalPiece]:
        """Plain parameters beside the DTensors: copies over the ranks of this (pipeline stage's) layout, unless
        declared (:func:`distclip.declare`): a declaration then says the whole layout (FSDP2 does not manage
        these tensors, so nothing else copies them), e.g. experts sharded over ep and replicated over dp."""
        self.declarations = [None if isinstance(p, DTensor) else declaration_of(p) for p in self.params]
        if not plain:
            return []
        stage = sorted(self._stage_ranks())
        copy = Replicas(("plain", frozenset(stage)), stage.index(self._rank), len(stage))  # a set: its hash is kept
        alone = frozenset({self._rank})
        shared: dict[Any, Replicas | None] = {}  # per combination of declared groups: computed once
        pieces = []
        for i in plain:
            replicas: Replicas | None = copy
            if self.declarations[i] is not None:
                replicas, counted = declared_replicas(self.declarations[i], None, alone, self._rank, self.names[i],
                                                      shared)
                if not counted:
                    self.uncounted.add(i)
            pieces.append(LocalPiece(i, 0, self.params[i].numel(), i, replicas))
        return pieces

    def bind(self, table: GroupTable, layout: SlotLayout) -> None:
        self._split_copies_per_fsdp_group()
        super().bind(table, layout)

    def _split_copies_per_fsdp_group(self) -> None:
        """Copies of the parameters one ``fully_shard`` group reduces are split among their holders per group, in
        the group's order, as its all-reduce hook measures them: ranks on different paths (an edit on one rank
        alone makes it measure after backward) then still count each element once."""
        groups = _compat.fsdp2_param_groups(self.module) if self.module is not None else []
        if not groups:
            return
        index_of = {id(p): i for i, p in enumerate(self.params)}
        by_param = {piece.param: piece for piece in self.pieces}
        ordered: list[LocalPiece] = []
        for g, (_, group) in enumerate(groups):
            for param, _, _ in _compat.fsdp2_params(group):
                piece = by_param.pop(index_of.get(id(param), -1), None)
                if piece is None:
                    continue
                r = piece.replicas
                if r is not None:
                    piece = LocalPiece(piece.source, piece.start, piece.numel, piece.param,
                                       Replicas(("group", g, r.key), r.index, r.count), piece.offset)
                ordered.append(piece)
        self.pieces = ordered + [piece for piece in self.pieces if piece.param in by_param]

    def geometry(self, mesh: Any) -> MeshGeometry:
        """The mesh's instances across the job, computed once per mesh LAYOUT: slicing ``mesh["tp"]`` for every
        layer makes a new mesh object each time, and a geometry per object would cost O(W) per parameter."""
        cached = self._geometries.get(id(mesh))
        if cached is None or cached[0] is not mesh:
            key = _compat.mesh_identity(mesh)
            shared = self._layouts.get(key)
            if shared is None:
                shared = self._layouts[key] = MeshGeometry(mesh, self._rank, self._stages)
            cached = self._geometries[id(mesh)] = (mesh, shared)
        return cached[1]

    def _stage_ranks(self) -> frozenset[int]:
        """The ranks holding this layout: the world, or under pipeline parallelism this stage's ranks."""
        if self._stages is None:
            assert self.reduce_group is not None  # covering_group gave one in __init__
            return group_ranks(self.reduce_group)
        return frozenset(self._stages.same_stage(sorted(self._span)))

    def stage_size(self) -> int:
        return len(self._stage_ranks())

    def _piece(self, i: int, t: DTensor) -> LocalPiece | None:
        """Parameter ``i``'s local part of ``t`` (its parameter or gradient) and who else holds a copy of it."""
        mesh = t.device_mesh
        geometry = self.geometry(mesh)
        if geometry.coordinate is None:  # this rank holds no part of it
            return None
        key = (id(geometry), tuple(t.placements))
        if key not in self._replica_cache:
            if any(pl.is_partial() for pl in t.placements):
                raise PartialGradientError(
                    f"distclip: the gradient of {self.names[i]!r} has a Partial placement {tuple(t.placements)}: it "
                    "is not reduced yet, and the norm of a sum is not a sum of norms. Clip after the reduction "
                    "(or redistribute it to Shard/Replicate first)."
                )
            self._replica_cache[key] = geometry.replicas(t.placements)
        return LocalPiece(i, 0, _compat.local_tensor(t).numel(), i, self._replica_cache[key], self._flat_offset(key, t))

    def _flat_offset(self, key: tuple[Any, ...], t: DTensor) -> int | None:
        """:func:`~distclip.compat.pytorch.dtensor_flat_offset`, once per (mesh layout, placements, global shape):
        torch's shard arithmetic costs ~0.3 ms a tensor, and a model repeats a few shapes many times."""
        full = (*key, tuple(t.shape))
        if full not in self._offsets:
            self._offsets[full] = _compat.dtensor_flat_offset(t)
        return self._offsets[full]

    # ------------------------------------------------------------ gradients
    def _unlike(self) -> list[int]:
        """DTensor gradients laid out unlike their parameter (e.g. a Replicate gradient of a Shard parameter)."""
        out = []
        for i, p in enumerate(self.params):
            grad = p.grad
            if isinstance(grad, DTensor) and _compat.dtensor_spec(grad) is not self._specs[i] and (
                    id(grad.device_mesh), grad.placements) != self._placements.get(i):
                out.append(i)
        return out

    def counted_pieces(self) -> tuple[list[torch.Tensor], list[int]]:
        if not self._unlike():
            return self._counting.take(self.local_grads())
        return slice_segments(self.local_grads(), self._counted_for_grads(), self.group_of)

    def _counted_for_grads(self) -> list[Segment]:
        """Counted ranges from the gradients' own placements."""
        pieces = []
        for i, p in enumerate(self.params):
            grad = p.grad
            if isinstance(grad, DTensor):
                if not self.geometry(grad.device_mesh).span <= self._span:
                    raise UnsupportedLayoutError(
                        f"distclip: the gradient of {self.names[i]!r} lives on a mesh ({grad.device_mesh}) that "
                        "reaches ranks outside the parameters' meshes"
                    )
                piece = self._piece(i, grad)
                if piece is not None:
                    pieces.append(piece)
        return counted_segments(pieces + self._plain)

    def refuse_row_layouts(self, plan: RowPlan) -> None:
        for i in plan.by_param:
            p = self.params[i]
            if isinstance(p, DTensor) and _compat.dtensor_flat_offset(p) is None:
                raise ConfigError(
                    f"distclip agc: {self.names[i]!r} is a DTensor with placements {tuple(p.placements)}: its local "
                    "tensor is not a run of whole rows, so its elements cannot be mapped to rows. Row-wise "
                    "clipping supports DTensors whose placements are all Replicate or Shard(0) (FSDP2, HSDP, "
                    "ColwiseParallel weights); a Shard(1) (RowwiseParallel) or strided (FSDP2 over tensor parallel) "
                    "parameter is not supported: clip it with another policy (a group with its own policy)")
        super().refuse_row_layouts(plan)

    def row_partials(self) -> torch.Tensor:
        unlike = self._unlike()
        if unlike:
            grad = cast(DTensor, self.params[unlike[0]].grad)  # _unlike lists DTensor gradients only
            param = cast(DTensor, self.params[unlike[0]])  # the parameter of a DTensor gradient
            raise ConfigError(
                f"distclip agc: the gradient of {self.names[unlike[0]]!r} is laid out unlike its parameter "
                f"({tuple(grad.placements)} vs {tuple(param.placements)}); "
                "row-wise clipping needs gradients placed like their parameters")
        return super().row_partials()

    def scaled_grads(self) -> list[list[torch.Tensor]]:
        grads = self.local_grads()  # whole local tensors (a gradient may be laid out unlike its parameter)
        return [[g for i in group if (g := grads[i]) is not None] for group in self.params_by_group]

    def held_pieces(self) -> tuple[list[torch.Tensor], list[int]]:
        """Each parameter's whole local gradient (it may be laid out unlike the parameter, as in
        :meth:`scaled_grads`)."""
        held = [(g, i) for i, g in enumerate(self.local_grads()) if g is not None]
        return [g for g, _ in held], [i for _, i in held]

    def describe(self) -> dict[str, object]:
        meshes = sorted({str(self.geometry(p.device_mesh).shape) for p in self.params if isinstance(p, DTensor)})
        declared = sum(d is not None for d in self.declarations)
        return {"adapter": self.kind, "num_params": len(self.params), "mesh_shapes": meshes,
                **({"declared": declared} if declared else {})}

    # ----------------------------------------------------------------- hook
    def reduction_venue(self) -> ReductionVenue | None:
        """``fully_shard``'s reduce-scatter (over the reduce group's backend) on the parameters' device; None without
        a ``fully_shard`` module (no reduction hook)."""
        if self.module is None or not self.params or not _compat.fsdp2_param_groups(self.module):
            return None
        return self.venue_of(self.reduce_group, self.params[0].device)

    def enable_reduction_hook(self, inner: Any = None, inner_state: Any = None) -> bool:
        """Compute the partials in each ``fully_shard`` module's all-reduce hook (see the module docstring)."""
        if inner is not None:
            warnings.warn("distclip: ddp_comm_hook applies to DDP only; ignored for FSDP2", stacklevel=3)
        groups = _compat.fsdp2_param_groups(self.module) if self.module is not None else []
        if not groups:
            self.hook_status = "no fully_shard module"
            return False
        if any(_compat.fsdp2_has_all_reduce_hook(g) for _, g in groups):
            warnings.warn("distclip: a fully_shard module already has an all-reduce hook (FSDP allows one); "
                          "computing the norm after backward instead.", stacklevel=3)
            self.hook_status = "existing all-reduce hook"
            return False
        _compat.track_amp_unscaling()
        self.hook = FSDP2NormHook(self, [g for _, g in groups])
        self._outside_hook = [s for s in self._counted if s[0] not in self.hook.managed]  # measured at clip time
        for index, (module, _) in enumerate(groups):
            module.set_all_reduce_hook(self.hook.measure_for(index))
        self.hook_status = "all_reduce_hook"
        return True

    def reduced_partials(self) -> torch.Tensor | None:
        if self.hook is None:
            return None
        partials = self.hook.take()
        if self._unlike():  # not laid out as FSDP's reduction writes them
            return None
        return self.with_pieces_outside_the_hook(partials, self._outside_hook)


@dataclass(frozen=True)
class _GroupPlan:
    params: tuple[int, ...]  # adapter parameter index of each of the group's parameters
    slices: list[tuple[int, int]]  # counted ranges of the group's flat reduce output
    groups: list[int]  # clip group of each range
    numel: int  # size of the flat output when every parameter has a gradient


class FSDP2NormHook(ReductionHook[torch.Tensor]):
    """Per-group partials of each FSDP2 parameter group's reduced flat shard, as it arrives in backward."""

    def __init__(self, adapter: DTensorAdapter, groups: list[Any]):
        super().__init__(adapter.layout)
        self.adapter = adapter
        self.groups = groups
        self._index_of = {id(p): i for i, p in enumerate(adapter.params)}
        self._replicas = {p.param: p.replicas for p in adapter.pieces}
        self._plans: dict[int, _GroupPlan] = {}
        self._divides: dict[tuple[int, torch.dtype], bool] = {}
        self._measured: set[int] = set()  # parameter indices measured in this backward
        # parameters whose gradients only FSDP's reduction (hence this hook) produces
        self.managed = {self._index_of[id(param)] for g in groups for param, _, _ in _compat.fsdp2_params(g)
                        if id(param) in self._index_of}
        self.managed_order = sorted(self.managed)

    def measure_for(self, index: int):
        def hook(reduce_output: torch.Tensor) -> None:
            self._measure(index, reduce_output)

        return hook

    def on_new_backward(self) -> None:
        self._measured = set()

    def _plan(self, index: int) -> _GroupPlan | None:
        """Group ``index``'s flat output: where each parameter's shard sits, which ranges this rank counts.

        FSDP2 reduces only the parameters that got a gradient: frozen ones (a LoRA model's base weights
        beside its trainable norms) are not in the output; a trainable one without a gradient this step
        shows as a size mismatch, and the step is measured after backward instead."""
        fsdp_params = [entry for entry in _compat.fsdp2_params(self.groups[index]) if entry[0].requires_grad]
        params = tuple(self._index_of.get(id(param), -1) for param, _, _ in fsdp_params)
        cached = self._plans.get(index)
        if cached is not None and cached.params == params:
            return cached
        if -1 in params:  # a parameter replaced since set-up (e.g. reset_sharded_param): no hook
            return None
        pieces, offset = [], 0
        for (_, numel, padded), i in zip(fsdp_params, params):  # FSDP2 lays each shard out padded, in this order
            copy = self._replicas.get(i)
            # one replica set per (group, the parameter's own replica set): a group may hold parameters
            # copied over different root dimensions (e.g. a norm over tp x ep, experts over tp only)
            key = None if copy is None else Replicas(("group", index, copy.key), copy.index, copy.count)
            if i not in self.adapter.uncounted:
                pieces.append(LocalPiece(0, offset, numel, i, key))
            offset += padded
        segments = counted_segments(pieces)
        plan = _GroupPlan(params, [(lo, hi) for _, lo, hi, _ in segments],
                          [self.adapter.group_of[i] for *_, i in segments], offset)
        self._plans[index] = plan
        return plan

    def _post_divides(self, index: int, dtype: torch.dtype) -> bool:
        """Whether FSDP divides group ``index``'s output after this hook; unknown (another torch): stop the hook."""
        key = (index, dtype)
        if key not in self._divides:
            try:
                self._divides[key] = _compat.fsdp2_post_divides(self.groups[index], dtype)
            except _compat.UnsupportedVersionError as err:
                self.adapter.hook_status = f"disabled: {err}"
                warnings.warn(f"{err} The norm is computed after backward instead (exact, slower).", stacklevel=2)
                self._divides[key] = True
        return self._divides[key]

    # -- called by FSDP2 with each group's reduce-scatter (and HSDP all-reduce) output
    def _measure(self, index: int, reduce_output: torch.Tensor) -> None:
        self.begin()
        group = self.groups[index]
        plan = self._plan(index)
        fsdp_params = _compat.fsdp2_params(group)
        if (
            plan is None
            or plan.numel != reduce_output.numel()  # not every parameter of the group had a gradient
            or self._post_divides(index, reduce_output.dtype)  # FSDP divides the output after this hook
            or any(param.grad is not None for param, _, _ in fsdp_params)  # will accumulate into them
            or any(not cast_is_exact(reduce_output.dtype, param.dtype) for param, _, _ in fsdp_params)
        ):
            self.invalidate()
            return
        flat = reduce_output.reshape(-1)
        device = self.adapter.collective_device([flat])
        pieces = [flat[a:b] for a, b in plan.slices]
        self.record(index, local_partials(pieces, plan.groups, self.adapter.layout, device))
        self._measured.update(plan.params)

    def gradients(self) -> list[torch.Tensor | None]:
        """The gradients FSDP writes (the others are measured at clip time), each as the DTensor and its
        local tensor: an in-place op on the DTensor bumps only the former's version, one on the local
        tensor (or a ``to_local()`` view of it) only the latter's."""
        out: list[torch.Tensor | None] = []
        for i in self.managed_order:
            grad = self.adapter.params[i].grad
            out += [grad, None if grad is None else _compat.local_tensor(grad)]
        return out

    def complete(self) -> bool:
        grads = self.adapter.params
        return all(grads[i].grad is None or i in self._measured for i in self.managed)
