"""The shared implementation of the adapter contract (:mod:`distclip.core.contract`): COUNT, HOOK, APPLY, ROWS.

Most layouts describe their local gradients as *pieces* and get COUNT and APPLY from
:class:`GradAdapter`; layouts whose gradients do not live in ``param.grad`` override
:meth:`~GradAdapter.local_grads` or the APPLY methods (DeepSpeed ZeRO).

Glossary (one word per idea, used across the adapters):

* **parameter**: one trainable tensor, known by its canonical name (the same on every rank).
* **piece** (:class:`~distclip.adapters.counting.LocalPiece`): a contiguous range of one local gradient
  tensor that belongs to one parameter: this rank's shard, or its copy of a replicated range.
* **holders**: the ranks that hold the same piece (from placements, mesh layouts, process groups).
* **replica set** (:class:`~distclip.adapters.counting.Replicas`): holders of identical copies; each
  counts a disjoint ``1/count`` slice of their pieces, so every element is counted once.
* **segment** (:data:`~distclip.adapters.counting.Segment`): ``(source, start, end, parameter)``, a range
  of a local tensor this rank counts (or scales).
* **span** (:class:`~distclip.core.rowwise.Span`): a run of a parameter's elements in its GLOBAL flat
  order (where a piece sits in its parameter).
* **row**: a dim-0 slice of a parameter, what row-wise clipping (``kind: agc``) clips by its own norm.
* **slot**: one number of the reduced vector (a group's ``sum |g|^p``, or its max for p = inf).
* **stage**: a pipeline stage; ranks of other stages hold other parameters, never copies.
* **reduction hook**: partials measured inside a backend's own gradient reduction (DDP buckets,
  FSDP1 units, FSDP2 parameter groups), used only when provably valid (:mod:`~distclip.adapters.hooks`).
* **unit**: only FSDP1's own word, one ``FullyShardedDataParallel`` instance.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any, Sequence

import torch
import torch.distributed as dist

from ..compat import pytorch as _compat
from ..core.config import ConfigError
from ..core.groups import GroupTable
from ..core.hook_choice import ReductionVenue
from ..core.norms import SlotLayout, combine_partials, local_partials
from ..core.reduce import ProcessGroup, collective_device
from ..core.rowwise import RowPlan, Span
from .counting import (
    LocalPiece,
    Replicas,
    Segment,
    Slicing,
    counted_segments,
    flat_range,
    group_ranks,
    segment_offsets,
    slice_segments,
)
from .declared import Declaration, census_payload, check_census, declaration_of, declared_replicas
from .hooks import ReductionHook


class GradAdapter:
    """One gradient layout (plain, DDP, FSDP1, DTensor, DeepSpeed, pipeline) behind the core's contract.

    Subclasses set ``kind`` and ``reduce_group``; most describe their local gradients as
    :class:`~distclip.adapters.counting.LocalPiece` s (``self.pieces``: which range of which local
    tensor belongs to which parameter, and who else holds a copy) and get COUNT and APPLY from
    here; layouts whose gradients do not live in ``param.grad`` override :meth:`local_grads`,
    or the APPLY methods (DeepSpeed).
    """

    kind = "abstract"
    reduce_group: ProcessGroup | None = None  # None: rank-local, no collective
    pipeline_group: ProcessGroup | None = None  # set by the pipeline adapter only
    has_names = True  # False when given bare parameters (per-group clipping then impossible)
    foldable = False  # gradients live in param.grad of the very tensors an optimizer steps
    applies_in_place = True  # APPLY changes the counted gradients at once (the audit measures it)
    hook: ReductionHook | None = None
    hook_status = "not enabled"  # after enable_reduction_hook: the hook's name, or why there is none
    row_plan: RowPlan | None = None  # after bind_rows: the row layout of row-wise (agc) clipping
    # what is wrong with this layout: raised on every rank after the set-up exchange
    setup_problems: tuple[str, ...] = ()
    _layout: SlotLayout | None = None  # set by bind (a class default: subclasses that skip __init__ have it too)
    _dtensor_params = True  # set by bind: whether any parameter is a DTensor (until then, assume so)

    def __init__(self, named_params: Sequence[tuple[str, torch.Tensor]]):
        seen: set[int] = set()
        unique: list[tuple[str, torch.Tensor]] = []
        for n, p in named_params:  # each tensor once, under the first name it comes with
            if id(p) not in seen:
                seen.add(id(p))
                unique.append((n, p))
        self.names: list[str] = [n for n, _ in unique]
        self.params: list[torch.Tensor] = [p for _, p in unique]  # parameters, or bare tensors a user passed
        self.pieces: list[LocalPiece] = []  # COUNT: set by subclasses (sources index local_grads())
        self.uncounted: set[int] = set()  # parameters another rank or stage counts (tied copies, declared owners)
        self.declarations: list[Declaration | None] = []
        self.group_of: list[int] = []
        self._layout = None
        self._device: torch.device | None = None

    @property
    def layout(self) -> SlotLayout:
        """The slot layout given to :meth:`bind`; every per-step method runs after it (the Clipper binds at set-up)."""
        if self._layout is None:
            raise RuntimeError(f"distclip: the {self.kind} adapter's slot layout was read before bind() gave it "
                               "(a distclip bug: a Clipper binds its adapter when it is built)")
        return self._layout

    @layout.setter
    def layout(self, layout: SlotLayout) -> None:
        self._layout = layout

    def bind(self, table: GroupTable, layout: SlotLayout) -> None:
        """Learn each parameter's group and the slot layout; precompute the per-step plans."""
        self.group_of = [table.index_of[n] for n in self.names]
        self.layout = layout
        self.params_by_group: list[list[int]] = [[] for _ in table.groups]
        for i, g in enumerate(self.group_of):
            self.params_by_group[g].append(i)
        self._counted: list[Segment] = counted_segments([p for p in self.pieces if p.param not in self.uncounted])
        self._scaled: list[Segment] = [(p.source, p.start, p.start + p.numel, p.param) for p in self.pieces if p.numel]
        # the per-step path, prepared once: which ranges to count and to scale, and their groups
        numels = self._source_numels()
        self._counting = Slicing(self._counted, self.group_of, numels)
        self._scaling = Slicing(self._scaled, self.group_of, numels)
        self._scaled_by_group = [[k for k, g in enumerate(self._scaling.groups) if g == group]
                                 for group in range(layout.num_groups)]
        self._dtensor_params = any(_compat.is_dtensor(p) for p in self.params)

    def tensor_names(self) -> dict[int, str]:
        """``id(tensor) -> canonical name`` for the parameter tensors a user may pass to pick parameters."""
        return {id(p): n for n, p in zip(self.names, self.params)}

    # ----------------------------------------------------------------- layout
    def whole_params_with_declarations(self, base: Replicas | None, base_ranks: frozenset[int]) -> bool:
        """Pieces for layouts whose local gradients are whole parameters (plain, DDP): the wrapper's replicas
        ``base`` over ``base_ranks``, changed by :func:`distclip.declare` declarations. Returns whether any exists."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.declarations = [declaration_of(p) for p in self.params]
        self.pieces = []
        shared: dict[Any, Replicas | None] = {}  # per combination of declared groups: computed once
        for i, (name, p) in enumerate(zip(self.names, self.params)):
            replicas, counted = declared_replicas(self.declarations[i], base, base_ranks, rank, name, shared)
            if not counted:
                self.uncounted.add(i)
            self.pieces.append(LocalPiece(i, 0, p.numel(), i, replicas))
        return any(d is not None for d in self.declarations)

    def verify_layout(self) -> None:
        """Set-up check of what metadata cannot prove (a collective, after the consistency check): declared
        copies must be copies."""
        if any(d is not None for d in self.declarations):
            check_census(self.reduce_group, census_payload(self.names, self.params, self.declarations))

    # -------------------------------------------------------------- pipeline
    def copies(self) -> dict[str, str]:
        """Tied copies on this rank -> the name of the parameter counted for them (pipelines only)."""
        return {}

    def names_by_stage(self) -> list[tuple[int, list[str]]]:
        return [(0, self.names)]

    def stage_key(self) -> int:
        return 0

    def describe_stage(self) -> dict[str, object]:
        return {}

    def stage_size(self) -> int:
        """How many ranks hold a part or a copy of these (one pipeline stage's) gradients."""
        if self.reduce_group is None:
            return 1
        return len(group_ranks(self.reduce_group))

    # ------------------------------------------------------------------ COUNT
    def local_grads(self) -> list[torch.Tensor | None]:
        """The local gradient tensor of each piece source (default: each parameter's ``.grad``, local part)."""
        if not self._dtensor_params:  # plain parameters have plain gradients
            return [p.grad for p in self.params]
        return [None if p.grad is None else _compat.local_tensor(p.grad) for p in self.params]

    def _source_numels(self) -> list[int] | None:
        """The element count of each :meth:`local_grads` entry, when known at bind (each parameter's local part,
        for layouts that keep this class's ``local_grads``); None otherwise."""
        if type(self).local_grads is not GradAdapter.local_grads:
            return None
        return [_compat.local_tensor(p).numel() for p in self.params]

    def counted_pieces(self) -> tuple[list[torch.Tensor], list[int]]:
        """The gradient pieces this rank counts (disjoint across the job) and their group indices."""
        return self._counting.take(self.local_grads())

    def local_partials(self, skip_groups: frozenset[int] = frozenset()) -> tuple[torch.Tensor, str]:
        """This rank's slot vector and where it came from (``comm_hook`` or ``post_backward``).

        ``skip_groups``: on the post-backward path, groups whose slots the caller fills itself (row-wise
        groups: from their rows' sums); a hook's vector holds every group.
        """
        hooked = self.reduced_partials()
        if hooked is not None:
            return hooked, "comm_hook"
        pieces, groups = self.counted_pieces()
        if skip_groups:
            kept = [i for i, g in enumerate(groups) if g not in skip_groups]
            pieces, groups = [pieces[i] for i in kept], [groups[i] for i in kept]
        return local_partials(pieces, groups, self.layout, self.collective_device(pieces)), "post_backward"

    def held_pieces(self) -> tuple[list[torch.Tensor], list[int]]:
        """Every local gradient piece this rank holds (replicated copies too, not only the counted slices) and
        the index of its parameter (in :attr:`names`): where a non-finite step's NaN or inf is looked for.

        The pieces cover exactly the parameters' elements (FSDP1 / ZeRO padding excluded), so a value found
        is in a parameter, on a rank that holds it.
        """
        return slice_segments(self.local_grads(), self._scaled, range(len(self.names)))

    def venue_of(self, group: ProcessGroup | None, device: torch.device | None) -> ReductionVenue | None:
        """The venue of gradients on ``device`` reduced over ``group`` (None without a group)."""
        if group is None or not dist.is_initialized():
            return None
        return ReductionVenue(str(dist.get_backend(group)), device.type if device is not None else "cpu")

    def collective_device(self, pieces: Sequence[torch.Tensor] = ()) -> torch.device:
        """Where the slot vector lives: chosen from the reduce group's backend (the same on every rank)."""
        if self._device is None or (pieces and self._device.type != pieces[0].device.type):
            hint = pieces[0].device if pieces else self.device_hint()
            self._device = collective_device(self.reduce_group, hint)
        return self._device

    def grad_scale(self) -> float:
        """The factor the counted pieces still carry (an fp16 loss scale not yet divided out); 1.0 if none."""
        return 1.0

    def loss_scaled(self) -> bool:
        """Whether a non-finite norm here is a loss-scale overflow the backend skips by itself (DeepSpeed fp16)."""
        return False

    def device_hint(self) -> torch.device | None:
        grads = [g for g in self.local_grads() if g is not None]
        if grads:
            return grads[0].device
        return self.params[0].device if self.params else None

    # ------------------------------------------------------------------- HOOK
    def reduction_venue(self) -> ReductionVenue | None:
        """Where this layout reduces its gradients (what ``comm_hook: auto`` decides from); None: no reduction hook."""
        return None

    def decline_reduction_hook(self, reason: str, inner: Any = None, inner_state: Any = None) -> None:
        """The post-backward path was chosen (``comm_hook: false``, or ``auto`` where the hook does not pay):
        record why.

        ``inner``: a user communication hook distclip would have wrapped (DDP registers it as it is).
        """
        self.hook_status = reason

    def enable_reduction_hook(self, inner: Any = None, inner_state: Any = None) -> bool:
        """Compute partials inside the gradient reduction from now on, if this layout allows it.

        ``inner``/``inner_state``: a user communication hook to wrap (DDP). Returns whether a
        hook is active; ``hook_status`` says which, or why not.
        """
        self.hook_status = f"no reduction hook for the {self.kind} layout"
        return False

    def reduced_partials(self) -> torch.Tensor | None:
        """Local slot partials already computed inside the gradient reduction, if provably valid."""
        return self.hook.take() if self.hook is not None else None

    def with_pieces_outside_the_hook(self, partials: torch.Tensor | None,
                                     segments: list[Segment]) -> torch.Tensor | None:
        """The hook's partials plus those of ``segments`` (gradients no reduction hook sees, e.g.
        parameters FSDP does not manage), measured now; None when the hook's result is not valid."""
        if partials is None:
            return None
        pieces, groups = slice_segments(self.local_grads(), segments, self.group_of)
        if not pieces:
            return partials
        return combine_partials([partials, local_partials(pieces, groups, self.layout, partials.device)],
                                self.layout, partials.device)

    # ------------------------------------------------------------------ APPLY
    def scaled_grads(self) -> list[list[torch.Tensor]]:
        """Per group, the local gradient tensors the group's coefficient multiplies."""
        pieces, groups = self._scaling.take(self.local_grads())
        if len(pieces) == len(self._scaling.groups):  # every piece present: the groups' positions are known
            if len(self._scaled_by_group) == 1:
                return [pieces]
            return [[pieces[k] for k in ks] for ks in self._scaled_by_group]
        out: list[list[torch.Tensor]] = [[] for _ in range(self.layout.num_groups)]
        for t, g in zip(pieces, groups):
            out[g].append(t)
        return out

    def scale(self, coefs: torch.Tensor, groups: Sequence[int], host_coefs: Sequence[float] | None = None) -> None:
        """Multiply the local gradients of each group in ``groups`` by its coefficient, in place.

        ``host_coefs`` (already on the host): one foreach call per device and dtype for all groups
        together. Otherwise the coefficients stay on the device (no host sync): one foreach call
        per group, device and dtype.
        """
        per_group = self.scaled_grads()
        if host_coefs is not None:
            tensors = [t for g in groups for t in per_group[g]] if len(groups) > 1 else per_group[groups[0]]
            scalars = [host_coefs[g] for g in groups for _ in per_group[g]]
            for same_kind, indices in _on_each_device(tensors):
                _compat.foreach_mul_(same_kind, scalars if indices is None else [scalars[i] for i in indices])
            return
        for g in groups:
            if per_group[g]:
                coef = coefs[g]
                for same_kind, _ in _on_each_device(per_group[g]):
                    _compat.foreach_mul_(same_kind, coef.to(same_kind[0].device))

    def zero(self, groups: Sequence[int]) -> None:
        """Zero the local gradients of these groups (the step still runs)."""
        per_group = self.scaled_grads()
        grads = [t for g in groups for t in per_group[g]]
        if grads:
            _compat.foreach_zero_(grads)

    def drop_grads(self) -> None:
        """Discard this step's gradients so the optimizer step leaves parameters and state untouched."""
        for p in self.params:
            p.grad = None

    # ------------------------------------------------------------------ UNITS
    def global_shapes(self) -> list[tuple[int, ...]]:
        """Each parameter's GLOBAL shape (what row-wise clipping splits into rows; known on every rank)."""
        return [tuple(p.shape) for p in self.params]

    def local_params(self) -> list[torch.Tensor | None]:
        """The parameter values of each piece source, laid out like :meth:`local_grads` (default: each
        parameter, local part)."""
        return [_compat.local_tensor(p).detach() for p in self.params]

    def bind_rows(self, plan: RowPlan) -> None:
        """Map this rank's pieces of the row-wise clipped parameters onto ``plan``'s rows (once, after bind).

        Counted pieces (disjoint across the job) add to the row sums; every held piece is scaled.
        """
        self.row_plan = plan
        self.refuse_row_layouts(plan)
        counted = [s for s in self._counted if s[3] in plan.by_param]
        self._row_counted = counted
        # every offset is known: refuse_row_layouts raised for a row-wise piece without one
        counted_spans = []
        for s, offset in zip(counted, segment_offsets(counted, self.pieces)):
            assert offset is not None
            counted_spans.append(Span(s[3], offset, s[2] - s[1]))
        self._row_count_map = plan.piece_map(counted_spans)
        held = [p for p in self.pieces if p.numel and p.param in plan.by_param]
        self._row_held = [(p.source, p.start, p.start + p.numel) for p in held]
        held_spans = []
        for p in held:
            assert p.offset is not None
            held_spans.append(Span(p.param, p.offset, p.numel))
        self._row_apply_map = plan.piece_map(held_spans)

    def refuse_row_layouts(self, plan: RowPlan) -> None:
        """A clear ConfigError for row-wise clipped parameters whose local pieces cannot be mapped to rows."""
        for i, declaration in enumerate(self.declarations):
            if i in plan.by_param and declaration is not None and declaration.sharded:
                raise ConfigError(
                    f"distclip agc: {self.names[i]!r} is declared sharded_over a group, so its global shape and the "
                    "position of this rank's part are unknown; row-wise clipping supports whole, replicated and "
                    "DTensor Shard(0) parameters. Clip it with another policy (a group with its own policy)")
        for piece in self.pieces:
            if piece.param in plan.by_param and piece.numel and piece.offset is None:
                raise ConfigError(
                    f"distclip agc: this rank's part of {self.names[piece.param]!r} is not one run of its rows, so its "
                    "elements cannot be mapped to rows; supported: whole parameters, DTensor Shard(0) / Replicate, "
                    "FSDP1 and ZeRO flat shards. Clip it with another policy (a group with its own policy)")

    def row_partials(self) -> torch.Tensor:
        """This rank's row part of the slot vector: ``[sum |g|^p per row, sum |w|^p per row]`` of its counted pieces."""
        grads, params = self.local_grads(), self.local_params()
        g = [flat_range(grads[s], lo, hi) for s, lo, hi, _ in self._row_counted]
        w = [flat_range(params[s], lo, hi) for s, lo, hi, _ in self._row_counted]
        device = self.collective_device([t for t in g if t is not None][:1])
        return torch.cat([self._row_count_map.sums(g, device), self._row_count_map.sums(w, device)])

    def scale_rows(self, coefs: torch.Tensor) -> None:
        """Multiply every local piece of the row-wise clipped parameters by its rows' coefficients (fp32 [U])."""
        grads = self.local_grads()
        self._row_apply_map.scale_([_in_place_range(grads[s], lo, hi) for s, lo, hi in self._row_held], coefs)

    def describe(self) -> dict[str, object]:
        """What the set-up consistency check compares across ranks (beyond config and groups)."""
        declared = sum(d is not None for d in self.declarations)
        return {"adapter": self.kind, "num_params": len(self.names), **({"declared": declared} if declared else {})}


def _on_each_device(tensors: list[torch.Tensor]) -> list[tuple[list[torch.Tensor], list[int] | None]]:
    """The tensors per device (and, off the CPU, per dtype, for the foreach fast paths), with their indices
    (None: all of them, in order). CPU tensors of any dtypes are one list: a CPU foreach op runs per tensor."""
    if not tensors:
        return []
    if all(map(_IS_CPU, tensors)):
        return [(tensors, None)]
    return [(same_kind, indices) for same_kind, indices in _compat.group_by_device_and_dtype(tensors).values()]


_IS_CPU = attrgetter("is_cpu")


def _in_place_range(tensor: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor | None:
    """Elements ``[lo, hi)`` of ``tensor`` as something to multiply in place: the tensor itself when whole
    (any strides), else a view of its flat form."""
    if tensor is None or (lo == 0 and hi == tensor.numel()):
        return tensor
    return tensor.view(-1)[lo:hi]
