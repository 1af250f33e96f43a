"""FSDP2 (``fully_shard``) and any DTensor gradients: each element counted once, from placement metadata.

A DTensor gradient's local tensor (``grad._local_tensor``) is this rank's part of it. For each
mesh dimension the placement says how the tensor spreads over that dimension's ranks:

* ``Shard`` (and strided shards): disjoint parts: each is counted by its holder (uneven and
  empty local shards included: an empty one contributes nothing, and its rank still joins).
* ``Replicate``: identical copies (the replicate dimension of an HSDP mesh): the copies of one
  replica set are split into disjoint 1/R slices, so each element is counted once.
* ``Partial``: not reduced yet: refused (clip after the reduction).

Parameters may live on different meshes in one model (torch's own ``clip_grad_norm_`` fails
there: pytorch #180346): each is handled on its own mesh, and one collective over a group
spanning every mesh combines them. Plain (non-DTensor) parameters next to DTensor ones are
assumed replicated over that group. Cost is linear in the number of parameters: local foreach
norms and one all-reduce, never a stack of DTensor norms (quadratic: pytorch #169445).

With ``fully_shard`` modules, the norm is computed inside the reduction: distclip sets each
module's all-reduce hook (``FSDPModule.set_all_reduce_hook``), which FSDP calls with the
reduce-scatter output (after the HSDP all-reduce) of each parameter group as it arrives in
backward; the per-group partials of that flat shard are computed there. The result is used only
when it is exactly what the gradients hold after backward (no accumulation into an older
gradient, no division after the hook, an exact dtype cast, gradients untouched since).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..core.groups import GroupTable
from ..core.norms import SlotLayout, combine_partials, local_partials
from ..core.reduce import collective_device
from .base import GradAdapter
from .sharded import (
    LocalPiece,
    Replicas,
    Segment,
    cast_is_exact,
    counted_segments,
    covering_group,
    backward_id,
    queue_after_backward,
    slice_segments,
)


class PartialGradientError(ValueError):
    """A gradient still has a ``Partial`` placement: it must be reduced before it is clipped."""


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (DTensor) tensor, without autograd or communication."""
    return t._local_tensor if isinstance(t, DTensor) else t


def _mesh_key(mesh: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(mesh.mesh.shape), tuple(mesh.mesh.flatten().tolist())


class DTensorAdapter(GradAdapter):
    """DTensor (FSDP2, HSDP, mixed meshes) gradients, plus plain ones beside them (see the module docstring)."""

    kind = "fsdp2"

    def __init__(self, named_params: Sequence[tuple[str, torch.nn.Parameter]], module: torch.nn.Module | None = None):
        super().__init__(named_params)
        self.module = module
        self._replica_cache: dict[tuple[int, tuple[Any, ...]], Replicas | None] = {}
        self._meshes: dict[int, tuple[Any, tuple[tuple[int, ...], tuple[int, ...]], Any]] = {}  # id -> (mesh, key, coordinate)
        spans: dict[Hashable, tuple[frozenset[int], dist.ProcessGroup | None]] = {}
        self._pieces: list[LocalPiece] = []
        plain: list[int] = []
        for i, p in enumerate(self.params):
            if not isinstance(p, DTensor):
                plain.append(i)
                continue
            mesh = p.device_mesh
            key = self._mesh_facts(mesh)[0]
            if key not in spans:
                spans[key] = (frozenset(key[1]), mesh.get_group() if mesh.ndim == 1 else None)
            piece = self._piece(i, p)
            if piece is not None:
                self._pieces.append(piece)
        world = frozenset(range(dist.get_world_size()))
        rank_sets = list(spans.values()) + ([(world, None)] if plain else [])
        self._span = frozenset().union(*(r for r, _ in rank_sets)) if rank_sets else world
        self.reduce_group = covering_group(rank_sets, "DTensor")
        copy = Replicas(("plain",), dist.get_rank(self.reduce_group), dist.get_world_size(self.reduce_group))
        self._plain = [LocalPiece(i, 0, self.params[i].numel(), i, copy) for i in plain]
        self._placements = {i: (id(p.device_mesh), tuple(p.placements)) for i, p in enumerate(self.params)
                            if isinstance(p, DTensor)}
        self._specs = [getattr(p, "_spec", None) for p in self.params]  # FSDP2 gives gradients the same spec object
        self.hook: FSDP2NormHook | None = None
        self.hook_status = "not enabled"  # after enable_reduction_hook: "all_reduce_hook" or why not

    def _mesh_facts(self, mesh: Any) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], Any]:
        """(``_mesh_key``, this rank's coordinate) of a mesh, computed once per mesh object (both are slow)."""
        facts = self._meshes.get(id(mesh))
        if facts is None or facts[0] is not mesh:
            facts = self._meshes[id(mesh)] = (mesh, _mesh_key(mesh), mesh.get_coordinate())
        return facts[1], facts[2]

    def _piece(self, i: int, t: DTensor) -> LocalPiece | None:
        """Parameter ``i``'s local part of ``t`` (its parameter or gradient) and who else holds a copy of it."""
        mesh = t.device_mesh
        if self._mesh_facts(mesh)[1] is None:  # this rank holds no part of it
            return None
        key = (id(mesh), tuple(t.placements))
        if key not in self._replica_cache:
            self._replica_cache[key] = self._replicas(self.names[i], mesh, t.placements)
        return LocalPiece(i, 0, t._local_tensor.numel(), i, self._replica_cache[key])

    @staticmethod
    def _replicas(name: str, mesh: Any, placements: Sequence[Any]) -> Replicas | None:
        """Which copy of its replica set this rank's local tensor is (None: no Replicate dimension)."""
        if any(pl.is_partial() for pl in placements):
            raise PartialGradientError(
                f"distclip: the gradient of {name!r} has a Partial placement {tuple(placements)}: it is not "
                "reduced yet, and the norm of a sum is not a sum of norms. Clip after the reduction "
                "(or redistribute it to Shard/Replicate first)."
            )
        dims = [d for d, pl in enumerate(placements) if pl.is_replicate()]
        coordinate = mesh.get_coordinate()
        if not dims or coordinate is None:
            return None
        index, count = 0, 1
        for d in dims:
            index, count = index * mesh.size(d) + coordinate[d], count * mesh.size(d)
        # Ranks that differ only along the Replicate dimensions hold the same local tensor.
        others = tuple(c for d, c in enumerate(coordinate) if d not in dims)
        return Replicas((_mesh_key(mesh), tuple(dims), others), index, count)

    def bind(self, table: GroupTable, layout: SlotLayout) -> None:
        super().bind(table, layout)
        self._counted = counted_segments(self._pieces + self._plain)

    # ------------------------------------------------------------ gradients
    def _local_grads(self) -> tuple[list[torch.Tensor | None], list[int]]:
        """Each parameter's local gradient, and which DTensor gradients are laid out unlike their parameter."""
        out: list[torch.Tensor | None] = []
        unlike: list[int] = []
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                out.append(None)
            elif isinstance(grad, DTensor):
                if grad._spec is not self._specs[i] and (id(grad.device_mesh), grad.placements) != self._placements.get(i):
                    unlike.append(i)
                out.append(grad._local_tensor)
            else:
                out.append(grad)
        return out, unlike

    def counted_pieces(self) -> tuple[list[torch.Tensor], list[int]]:
        grads, unlike = self._local_grads()
        segments = self._counted if not unlike else self._counted_for_grads()
        return slice_segments(grads, segments, self.group_of)

    def _counted_for_grads(self) -> list[Segment]:
        """Counted ranges from the gradients' own placements (e.g. a Replicate gradient of a Shard parameter)."""
        pieces = []
        for i, p in enumerate(self.params):
            grad = p.grad
            if isinstance(grad, DTensor):
                if not frozenset(self._mesh_facts(grad.device_mesh)[0][1]) <= self._span:
                    raise NotImplementedError(
                        f"distclip: the gradient of {self.names[i]!r} lives on a mesh ({grad.device_mesh}) that "
                        "reaches ranks outside the parameters' meshes"
                    )
                piece = self._piece(i, grad)
                if piece is not None:
                    pieces.append(piece)
        return counted_segments(pieces + self._plain)

    def scaled_grads(self) -> list[list[torch.Tensor]]:
        return [[local_tensor(p.grad) for p in group if p.grad is not None] for group in self.params_by_group]

    def describe(self) -> dict[str, object]:
        meshes = sorted({str(_mesh_key(p.device_mesh)[0]) for p in self.params if isinstance(p, DTensor)})
        return {"adapter": self.kind, "num_params": len(self.params), "mesh_shapes": meshes}

    # ----------------------------------------------------------------- hook
    def enable_reduction_hook(self, inner: Any = None, inner_state: Any = None) -> bool:
        """Compute the partials in each ``fully_shard`` module's all-reduce hook (see the module docstring)."""
        if inner is not None:
            warnings.warn("distclip: ddp_comm_hook applies to DDP only; ignored for FSDP2", stacklevel=3)
        groups = fsdp2_param_groups(self.module) if self.module is not None else []
        if not groups:
            self.hook_status = "no fully_shard module"
            return False
        if any(getattr(g, "_all_reduce_hook", None) is not None for _, g in groups):
            warnings.warn("distclip: a fully_shard module already has an all-reduce hook (FSDP allows one); "
                          "computing the norm after backward instead.", stacklevel=3)
            self.hook_status = "existing all-reduce hook"
            return False
        self.hook = FSDP2NormHook(self, [g for _, g in groups])
        self._outside_hook = [s for s in self._counted if s[0] not in self.hook.managed]  # measured at clip time
        for index, (module, _) in enumerate(groups):
            module.set_all_reduce_hook(self.hook.measure_for(index))
        self.hook_status = "all_reduce_hook"
        return True

    def reduced_partials(self) -> torch.Tensor | None:
        if self.hook is None:
            return None
        grads, unlike = self._local_grads()
        partials = self.hook.take(grads)
        if partials is None or unlike:  # unlike: not laid out as FSDP's reduction writes them
            return None
        pieces, groups = slice_segments(grads, self._outside_hook, self.group_of)
        if not pieces:
            return partials
        return combine_partials([partials, local_partials(pieces, groups, self.layout, partials.device)],
                                self.layout, partials.device)


def fsdp2_param_groups(module: torch.nn.Module) -> list[tuple[Any, Any]]:
    """(fully_shard module, its parameter group) for every module with exactly one group.

    ``set_all_reduce_hook`` is refused for modules with several groups (per-parameter meshes);
    their gradients are then measured after backward.
    """
    from torch.distributed.fsdp import FSDPModule

    out = []
    for m in module.modules():
        if isinstance(m, FSDPModule):
            groups = m._get_fsdp_state()._fsdp_param_groups
            if len(groups) == 1:
                out.append((m, groups[0]))
    return out


def _post_divides(group: Any, reduce_dtype: torch.dtype) -> bool:
    """Whether FSDP divides the reduce output after the all-reduce hook (it then is not the final gradient)."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import _get_gradient_divide_factors
        from torch.distributed.fsdp._fully_shard._fsdp_common import DDPMeshInfo, FSDPMeshInfo

        info = group.mesh_info
        rs_group = group._reduce_scatter_process_group if isinstance(info, FSDPMeshInfo) else None
        ar_group = group._all_reduce_process_group if isinstance(info, DDPMeshInfo) else None
        _, post, _, _ = _get_gradient_divide_factors(
            rs_group, ar_group, reduce_dtype, group.device.type, group.gradient_divide_factor,
            group.force_sum_reduction_for_comms)
        return post is not None and post != 1
    except Exception:  # another torch version: do not trust the hook
        return True


@dataclass(frozen=True)
class _GroupPlan:
    params: tuple[int, ...]  # adapter parameter index of each of the group's parameters
    slices: list[tuple[int, int]]  # counted ranges of the group's flat reduce output
    groups: list[int]  # clip group of each range
    numel: int  # size of the flat output when every parameter has a gradient
    _divides: dict[torch.dtype, bool]

    def post_divides(self, group: Any, reduce_dtype: torch.dtype) -> bool:
        if reduce_dtype not in self._divides:
            self._divides[reduce_dtype] = _post_divides(group, reduce_dtype)
        return self._divides[reduce_dtype]


class FSDP2NormHook:
    """Per-group partials of each FSDP2 parameter group's reduced flat shard, as it arrives in backward."""

    def __init__(self, adapter: DTensorAdapter, groups: list[Any]):
        self.adapter = adapter
        self.groups = groups
        self._index_of = {id(p): i for i, p in enumerate(adapter.params)}
        self._replicas = {p.param: p.replicas for p in adapter._pieces}
        self._plans: dict[int, _GroupPlan] = {}
        self._partials: dict[int, torch.Tensor] = {}
        self._measured: set[int] = set()  # parameter indices measured in this backward
        self._valid = True
        self._backward = -1  # id of the backward whose reductions are being measured
        self._snapshot: list[Any] | None = None
        # parameters whose gradients only FSDP's reduction (hence this hook) produces
        self.managed = {self._index_of[id(fp.sharded_param)] for g in groups for fp in g.fsdp_params
                         if id(fp.sharded_param) in self._index_of}
        self.managed_order = sorted(self.managed)

    def measure_for(self, index: int):
        def hook(reduce_output: torch.Tensor) -> None:
            self._measure(index, reduce_output)

        return hook

    def _plan(self, index: int) -> _GroupPlan | None:
        """Group ``index``'s flat output: where each parameter's shard sits, which ranges this rank counts."""
        group = self.groups[index]
        params = tuple(self._index_of.get(id(fp.sharded_param), -1) for fp in group.fsdp_params)
        cached = self._plans.get(index)
        if cached is not None and cached.params == params:
            return cached
        if -1 in params:  # a parameter replaced since set-up (e.g. reset_sharded_param): no hook
            return None
        pieces, offset = [], 0
        for fp, i in zip(group.fsdp_params, params):  # FSDP2 lays each shard out padded, in this order
            copy = self._replicas.get(i)
            key = None if copy is None else Replicas(("group", index), copy.index, copy.count)
            pieces.append(LocalPiece(0, offset, fp.sharded_size.numel(), i, key))
            offset += fp.padded_sharded_param_size.numel()
        segments = counted_segments(pieces)
        plan = _GroupPlan(params, [(lo, hi) for _, lo, hi, _ in segments],
                          [self.adapter.group_of[i] for *_, i in segments], offset, {})
        self._plans[index] = plan
        return plan

    # -- called by FSDP2 with each group's reduce-scatter (and HSDP all-reduce) output
    def _measure(self, index: int, reduce_output: torch.Tensor) -> None:
        if backward_id() != self._backward:  # first group of a new backward
            self._backward = backward_id()
            self._partials.clear()
            self._measured = set()
            self._valid = queue_after_backward(self._queue_snapshot)
            self._snapshot = None
        group = self.groups[index]
        plan = self._plan(index)
        if (
            plan is None
            or plan.numel != reduce_output.numel()  # not every parameter of the group had a gradient
            or plan.post_divides(group, reduce_output.dtype)  # FSDP divides the output after this hook
            or any(fp.sharded_param.grad is not None for fp in group.fsdp_params)  # will accumulate into them
            or any(not cast_is_exact(reduce_output.dtype, fp.sharded_param.dtype) for fp in group.fsdp_params)
        ):
            self._valid = False
            return
        flat = reduce_output.reshape(-1)
        device = collective_device(self.adapter.reduce_group, flat.device)
        self._partials[index] = local_partials([flat[a:b] for a, b in plan.slices], plan.groups, self.adapter.layout, device)
        self._measured.update(plan.params)

    def _queue_snapshot(self) -> None:
        if not queue_after_backward(self._take_snapshot):  # after FSDP's root final callback
            self._take_snapshot()

    def _take_snapshot(self) -> None:
        self._snapshot = self._versions()

    def _versions(self) -> list[Any]:
        """Identity and versions of the gradients FSDP writes (the others are measured at clip time).

        Both the DTensor's and its local tensor's: an in-place op on the DTensor bumps only the
        former, one on the local tensor (or a ``to_local()`` view of it) only the latter.
        """
        out: list[Any] = []
        for i in self.managed_order:
            grad = self.adapter.params[i].grad
            local = local_tensor(grad) if grad is not None else None
            out.append(None if grad is None else (id(grad), grad._version, id(local), local._version))
        return out

    def take(self, grads: list[torch.Tensor | None]) -> torch.Tensor | None:
        """The partials of the last backward, once, if the gradients are still exactly what FSDP wrote."""
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is None or not self._valid or not self._partials:
            return None
        if snapshot != self._versions():  # changed since backward (a manual edit, accumulation...)
            return None
        if any(grads[i] is not None and i not in self._measured for i in self.managed):
            return None  # a gradient FSDP reduced without the hook seeing it
        parts = [self._partials[i] for i in sorted(self._partials)]
        return combine_partials(parts, self.adapter.layout, parts[0].device)


