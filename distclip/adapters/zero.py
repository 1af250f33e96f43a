"""DeepSpeed ZeRO 0-3 layouts: which reduced gradient pieces each rank counts, and where the coefficients go.

DeepSpeed reduces, partitions, unscales and steps inside ``engine.step()`` (under Accelerate,
inside ``accelerator.backward()``): user code has no window between the gradient reduction and
the update. So the clip runs inside DeepSpeed's own norm-and-clip seam, which
:func:`distclip.deepspeed.attach` (:mod:`distclip.integrations.deepspeed`) takes over; this module
says what is counted and, once the clip has run, multiplies the planned coefficients into the fp32
partitions when DeepSpeed hands them over (:meth:`DeepSpeedAdapter.apply_to_partition`):

======  =================================  ==========================================  =============================
stage   optimizer                          norm: the pieces this rank counts           coefficients applied
======  =================================  ==========================================  =============================
0       the client torch optimizer         a disjoint 1/world slice of the             ``param.grad``, in a step
        (fp32)                             all-reduced (replicated) ``param.grad``     pre-hook of that optimizer
1, 2    ``DeepSpeedZeroOptimizer``         ``averaged_gradients``: this rank's flat    this rank's fp32 flat
                                           partition, one piece per parameter it       partition, in
                                           holds (a straddling parameter is split      ``unscale_and_clip_grads``
                                           between ranks)                              (loss scale divided out there)
3       ``DeepSpeedZeroOptimizer_Stage3``  ``averaged_gradients``: each parameter's    each fp32 flat sub-group, in
                                           partition without its padding               ``unscale_and_clip_grads``
======  =================================  ==========================================  =============================

With optimizer offload (ZeRO 1-3, to CPU) the reduced gradients already sit in the fp32 flat
partitions when the norm runs; the pieces are then the parameters' ranges of those.

MoE (``deepspeed.moe.layer.MoE``, ZeRO 0-2): an expert parameter (``param.allreduce = False``,
``param.group_name`` naming its expert-parallel group) is held only by the ranks of its
expert-data-parallel group, and the experts of different expert-parallel ranks are different
tensors even where their names coincide. At ZeRO-0 each rank counts its 1/size slice of its
experts over that group (dense parameters: 1/world over the data-parallel group); at ZeRO-1/2
DeepSpeed partitions each MoE parameter group over that group (``real_dp_process_group``), so the
partition pieces are already disjoint. Either way every element counts once over the job, and the
one reduction runs over the data-parallel group, which spans every expert-data-parallel group.

Row-wise clipping (``kind: agc``, ZeRO 0-3 without MoE): the row sums count the same pieces as
the norm, with the parameter values read from the fp32 master partitions at the same fragments
(:func:`distclip.compat.deepspeed.fragment`: where each fragment sits in the partition and in the
parameter's flat order; ZeRO-3: rank x partition size); the row coefficients are multiplied into
the fp32 partition in the same unscale seam, fragment by fragment (head, rows, tail).

ZeRO 1-3: ``scaled_global_norm`` / ``_get_norm_groups`` (called once per step, after reduction,
before any update) run distclip's clip: local partials of the pieces, divided by the loss scale
they carry, ONE collective, policy, coefficients. DeepSpeed's separate overflow check is switched
off: distclip decides on its reduced norm (the same on every rank); a skip sets DeepSpeed's own
``overflow`` flag, so DeepSpeed drops the step, its loss scaler backs off (fp16), the engine
counts a skipped step and does not advance the LR scheduler. The coefficients (divided by the
loss scale the gradients carried when measured) are multiplied into the fp32 partition where
DeepSpeed would unscale and clip it, using DeepSpeed's own parameter -> partition mapping
(:func:`distclip.compat.deepspeed.fragment` for ZeRO-1/2, partition sizes for ZeRO-3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.distributed as dist

from ..compat import deepspeed as ds_compat
from ..compat import pytorch as _compat
from ..core.groups import GroupTable
from ..core.names import named_trainable_parameters
from ..core.norms import SlotLayout
from ..core.rowwise import PieceMap, RowPlan, Span
from ..errors import ConfigError, UnsupportedDeepSpeedSetup
from .base import GradAdapter
from .counting import LocalPiece, Replicas, group_ranks

if TYPE_CHECKING:
    from ..core.report import ClipReport

Spans = dict[int, list[tuple[int, int]]]  # clip group -> [(start, end)] in a flat partition




is_deepspeed_engine = ds_compat.is_engine


@ds_compat.internal("DeepSpeed's engine and ZeRO optimizer layout")
def deepspeed_adapter(engine: Any) -> "DeepSpeedAdapter":
    """The adapter for this engine's ZeRO stage and optimizer; a clear error for what is not supported."""
    _check_parallel_layout(engine)
    optimizer = engine.optimizer
    name = type(optimizer).__name__
    stage = int(engine.zero_optimization_stage())
    if stage in (1, 2) and name == "DeepSpeedZeroOptimizer":
        return ZeroPartitionAdapter(engine)
    if stage == 3 and name == "DeepSpeedZeroOptimizer_Stage3":
        return Zero3Adapter(engine)
    if stage == 0 and isinstance(optimizer, torch.optim.Optimizer) and optimizer is engine.basic_optimizer:
        return Zero0Adapter(engine)
    raise UnsupportedDeepSpeedSetup(
        f"distclip: DeepSpeed ZeRO stage {stage} with optimizer {name} is not supported. Supported: ZeRO-0 in "
        "fp32 (a torch client optimizer), ZeRO-1/2 (DeepSpeedZeroOptimizer) and ZeRO-3 in fp32, bf16 and fp16. "
        "For ZeRO-0 in fp16/bf16 use ZeRO-1 (DeepSpeed 0.19.8 does not even scale the loss at ZeRO-0 fp16). "
        "bf16 with fp32 gradient accumulation at ZeRO-1 (BF16_Optimizer) is not supported either: drop "
        "data_types.grad_accum_dtype or use ZeRO-2."
    )


def _check_parallel_layout(engine: Any) -> None:
    optimizer = engine.optimizer
    problems = []
    if optimizer is None or type(optimizer).__name__ == "DummyOptim":
        problems.append("the engine has no optimizer (inference?)")
    if getattr(engine, "mpu", None) is not None:
        problems.append("model parallelism (mpu) is set")
    if getattr(engine, "has_moe_layers", False):
        problems += _moe_problems(engine)
    if getattr(engine, "pipeline_parallelism", False):
        problems.append("pipeline parallelism is enabled")
    if getattr(engine, "zenflow", False):
        problems.append("ZenFlow is enabled")
    if getattr(engine, "torch_autocast_z0_gradscaler", None) is not None:
        problems.append("torch autocast with a GradScaler at ZeRO-0 is enabled")
    if getattr(optimizer, "swap_optimizer", False):
        problems.append("the optimizer state is offloaded to NVMe")
    if getattr(optimizer, "offload_optimizer", False) and getattr(optimizer, "partial_offload", 1.0) != 1.0:
        problems.append("the optimizer is offloaded partially (offload_optimizer.ratio < 1)")
    if problems:
        raise UnsupportedDeepSpeedSetup(
            "distclip cannot clip this DeepSpeed engine exactly: " + "; ".join(problems)
            + ". Supported: data parallelism with ZeRO 0-3, optimizer offload to CPU included, and DeepSpeed MoE "
            "layers (deepspeed.moe.layer.MoE, expert parallelism without tensor or sequence parallelism) at ZeRO 0-2."
        )


# ------------------------------------------------------------------------------------------- MoE
def is_expert_param(param: torch.Tensor) -> bool:
    """DeepSpeed's own test for an MoE expert parameter (``deepspeed.moe.utils.is_moe_param``)."""
    return hasattr(param, "allreduce") and not param.allreduce


def expert_group(param: torch.Tensor) -> str:
    """The expert-parallel group an MoE expert parameter belongs to (``param.group_name``, set by DeepSpeed)."""
    return param.group_name  # type: ignore[attr-defined]  # DeepSpeed's attribute: torch's stubs do not declare it


def _moe_problems(engine: Any) -> list[str]:
    """What distclip cannot count exactly in this MoE engine (empty: every expert's holders are known)."""
    problems = []
    if any(type(m).__name__ == "AutoEPMoELayer" for m in engine.module.modules()):
        problems.append("the model has AutoEP MoE layers (expert_parallel config / AutoEPMoELayer); only "
                        "deepspeed.moe.layer.MoE layers are supported")
    if int(engine.zero_optimization_stage()) == 3:
        problems.append("the model has MoE layers at ZeRO-3 (MoE is supported at ZeRO 0-2)")
    if int(getattr(engine, "sequence_parallel_size", 1) or 1) > 1:
        problems.append("the model has MoE layers and sequence parallelism is enabled")
    known = getattr(engine, "expert_data_parallel_group", None) or {}
    unknown = sorted({str(getattr(p, "group_name", None)) for p in engine.module.parameters()
                      if is_expert_param(p) and getattr(p, "group_name", None) not in known})
    if unknown:
        problems.append(f"expert parameters (allreduce=False) name expert groups {unknown} that the engine has no "
                        f"expert-data-parallel group for (known: {sorted(known)})")
    return problems


@ds_compat.internal("DeepSpeed's expert-parallel groups (engine.expert_data_parallel_group)")
def expert_replicas(engine: Any, params: Sequence[torch.Tensor], reduce_group: Any) -> dict[str, Replicas]:
    """Per expert group name among ``params``: this rank's copy of that group's experts.

    The ranks of an expert-data-parallel group hold the same experts (DeepSpeed all-reduces their
    gradients over it); other groups hold other experts. Each group must lie inside ``reduce_group``.
    """
    reduce_ranks = group_ranks(reduce_group)
    replicas: dict[str, Replicas] = {}
    for name in sorted({expert_group(p) for p in params if is_expert_param(p)}):
        group = engine.expert_data_parallel_group[name]
        if not group_ranks(group) <= reduce_ranks:
            raise UnsupportedDeepSpeedSetup(
                f"distclip: the expert-data-parallel group of '{name}' (ranks {sorted(group_ranks(group))}) is not "
                f"inside the data-parallel group (ranks {sorted(reduce_ranks)}) that the norm is reduced over"
            )
        replicas[name] = Replicas(("expert", name), dist.get_rank(group), dist.get_world_size(group))
    return replicas


@ds_compat.internal("DeepSpeed's ZeRO partition groups (real_dp_process_group)")
def check_partition_groups(engine: Any, optimizer: Any) -> None:
    """ZeRO-1/2: each parameter group is partitioned over the data-parallel group, or (an MoE group,
    experts of one expert group only) over that group's expert-data-parallel ranks; else refused."""
    dp_ranks = group_ranks(optimizer.dp_process_group)
    moe_flags = getattr(optimizer, "is_moe_param_group", None) or [False] * len(optimizer.bit16_groups)
    experts = getattr(engine, "expert_data_parallel_group", None) or {}
    for i, (params, is_moe) in enumerate(zip(optimizer.bit16_groups, moe_flags)):
        ranks = group_ranks(optimizer.real_dp_process_group[i])
        if not is_moe:
            if any(is_expert_param(p) for p in params):
                raise UnsupportedDeepSpeedSetup(
                    f"distclip: ZeRO parameter group {i} mixes expert parameters (allreduce=False) into a dense group, "
                    "which DeepSpeed partitions as if they were replicated; build the optimizer's groups with "
                    "deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer"
                )
            if ranks != dp_ranks:
                raise UnsupportedDeepSpeedSetup(
                    f"distclip: ZeRO parameter group {i} is partitioned over ranks {sorted(ranks)}, not over the "
                    f"data-parallel group (ranks {sorted(dp_ranks)})"
                )
            continue
        names = {getattr(p, "group_name", None) for p in params}
        name = next(iter(names)) if len(names) == 1 else None
        holders = group_ranks(experts[name]) if name in experts else None
        if not all(is_expert_param(p) for p in params) or holders != ranks or not ranks <= dp_ranks:
            raise UnsupportedDeepSpeedSetup(
                f"distclip: MoE parameter group {i} of the ZeRO optimizer must hold the experts of one expert group "
                f"only, partitioned over that group's expert-data-parallel ranks (here: expert groups "
                f"{sorted(map(str, names))}, partitioned over ranks {sorted(ranks)}); build the optimizer's groups "
                "with deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer"
            )


@dataclass
class _PartitionFactors:
    """What to multiply into the fp32 partitions this step: per-group factors, or zeros."""

    factors: torch.Tensor | None  # coefficient / loss scale, per clip group (fp32); 1 / loss scale for row-wise groups
    zero: bool = False
    row_coefs: torch.Tensor | None = None  # per row (row-wise groups), fp32


class DeepSpeedAdapter(GradAdapter):
    """Common part: names from ``engine.module``, DeepSpeed's clipping off, honest ``get_global_grad_norm``."""

    kind = "deepspeed"
    applies_in_place = False  # the coefficients reach the fp32 partitions later, inside DeepSpeed's step

    def __init__(self, engine: Any):
        super().__init__(list(named_trainable_parameters(engine.module)))
        self.engine = engine
        self.optimizer = engine.optimizer
        self.stage = int(engine.zero_optimization_stage())
        self.attached = False  # set by distclip.deepspeed.attach: the clip then runs inside engine.step()
        self._plan: _PartitionFactors | None = None
        self._spans: list[Spans] = []  # per fp32 partition (ZeRO-3: sub-group): each clip group's ranges

    def _require_installed(self) -> None:
        if not self.attached:
            raise RuntimeError(
                "distclip: a DeepSpeed engine clips inside engine.step(); call distclip.deepspeed.attach(engine, "
                "config) once after deepspeed.initialize() instead of clipping yourself. (Measuring with "
                "distclip.global_grad_norm(engine) between engine.backward() and engine.step() works.)"
            )

    # ------------------------------------------------- called inside step()
    def plan(self, report: "ClipReport | None", scale: float, zero: bool) -> None:
        """What :meth:`apply_to_partition` multiplies in this step: the report's coefficients divided by the loss
        scale the gradients carried when measured (``zero``: zeros; None: nothing, the step is skipped)."""
        if report is None:
            self._plan = None
        elif zero:
            self._plan = _PartitionFactors(factors=None, zero=True)
        else:
            coefs = torch.stack(list(report.coefs.values()))
            if self.row_plan is not None:  # row-wise groups: their rows' coefficients, not their smallest one
                coefs = torch.where(self.row_plan.group_mask(coefs.device)[: coefs.numel()], 1.0, coefs)
            self._plan = _PartitionFactors(factors=coefs / scale, row_coefs=report.row_coefs)

    def apply_to_partition(self, flat: torch.Tensor, partition: int) -> None:
        """Unscale and clip fp32 flat partition (ZeRO-3: sub-group) ``partition`` in place, as planned."""
        self._apply(flat, self._spans[partition])
        self._apply_rows(flat, partition)

    def _apply(self, flat: torch.Tensor, spans: Spans) -> None:
        plan = self._plan
        if plan is None:
            raise RuntimeError("distclip: DeepSpeed unscaled gradients without running distclip's norm first")
        if plan.zero:
            flat.zero_()
            return
        assert plan.factors is not None  # set whenever zero is False
        factors = plan.factors.to(flat.device)
        for g, ranges in spans.items():
            _compat.foreach_mul_([flat[a:b] for a, b in ranges], factors[g])

    def _apply_rows(self, flat: torch.Tensor, partition: int) -> None:
        """Multiply the row-wise clipped fragments of an fp32 partition by their rows' coefficients."""
        plan = self._plan
        if self.row_plan is None or plan is None or plan.zero or plan.row_coefs is None:
            return
        row_map, ranges = self._row_apply[partition]
        if ranges:
            row_map.scale_([flat[a:b] for a, b in ranges], plan.row_coefs)

    # ------------------------------------------------------------ UNITS
    def global_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(getattr(p, "ds_shape", p.shape)) for p in self.params]  # ZeRO-3: the partitioned tensor is empty

    def refuse_row_layouts(self, plan: RowPlan) -> None:
        if getattr(self.engine, "has_moe_layers", False) and plan.blocks:
            raise ConfigError(
                "distclip agc: row-wise clipping of a DeepSpeed model with MoE layers is not supported (experts of "
                "different expert-parallel ranks share names, so the row layout would not be the same on every "
                "rank); clip it with another policy")
        super().refuse_row_layouts(plan)

    def _bind_partition_rows(self, plan: RowPlan, fragments: list[list[tuple[int, int, int, int]]]) -> None:
        """From ``(param, offset in the parameter, start in the fp32 partition, numel)`` per partition (one per
        parameter it holds, in DeepSpeed's order): the counted spans (all of them: a partition is held by this
        rank alone) and each partition's apply map. Kept as ``(position, param, offset, start, numel)``."""
        self.row_plan = plan
        self.refuse_row_layouts(plan)
        kept = [[(k, *f) for k, f in enumerate(frags) if f[0] in plan.by_param and f[3] > 0] for frags in fragments]
        self._row_fragments = kept
        self._row_count_map = plan.piece_map([Span(j, off, n) for frags in kept for _, j, off, _, n in frags])
        self._row_apply: list[tuple[PieceMap, list[tuple[int, int]]]] = [
            (plan.piece_map([Span(j, off, n) for _, j, off, _, n in frags]), [(a, a + n) for *_, a, n in frags])
            for frags in kept]

    def _fragment_grads(self, flats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Offload: the row-wise fragments' gradients, ranges of the fp32 flat gradients."""
        out: list[torch.Tensor] = []
        for flat, frags in zip(flats, self._row_fragments):
            for *_, a, n in frags:
                assert flat.grad is not None  # counted_pieces ran first and raised for a missing one
                out.append(flat.grad[a : a + n])
        return out

    def _partition_row_partials(self, grads: Sequence[torch.Tensor | None], values: Sequence[torch.Tensor]
                                ) -> torch.Tensor:
        """The row part of the slot vector from the counted gradient pieces (in fragment order) and the fp32
        partitions (parameter values at the same fragments)."""
        params = [flat.detach()[a : a + n] for flat, frags in zip(values, self._row_fragments) for *_, a, n in frags]
        device = self.collective_device([t for t in grads if t is not None][:1])
        return torch.cat([self._row_count_map.sums(grads, device), self._row_count_map.sums(params, device)])

    def scale_rows(self, coefs: torch.Tensor) -> None:
        """Planned from the report and applied to the fp32 partitions inside the step."""
        self._require_installed()

    # ------------------------------------------------------- GradAdapter API
    def scale(self, coefs: torch.Tensor, groups: Sequence[int], host_coefs: Sequence[float] | None = None) -> None:
        """Nothing to scale yet: the coefficients go into the fp32 partitions inside DeepSpeed's step."""
        self._require_installed()

    def zero(self, groups: Sequence[int]) -> None:
        """Planned from the report (``nonfinite: zero``) and applied to the fp32 partitions inside the step."""
        self._require_installed()

    def drop_grads(self) -> None:
        """The skip itself is DeepSpeed's (``overflow``), set by the seam from ``report.skipped``."""
        self._require_installed()

    def grad_scale(self) -> float:
        return float(getattr(self.optimizer, "loss_scale", 1.0))

    def loss_scaled(self) -> bool:
        return bool(self.engine.fp16_enabled())

    def describe(self) -> dict[str, object]:
        dtype = next((str(p.dtype) for p in self.params), None)
        return {"adapter": self.kind, "zero_stage": self.stage, "num_params": len(self.params), "param_dtype": dtype}

    def _group_index(self) -> dict[int, int]:
        return {id(p): g for p, g in zip(self.params, self.group_of)}


def group_spans(fragments: Sequence[tuple[int, int, int]]) -> Spans:
    """(start, numel, group) fragments of a flat partition -> per group, merged (start, end) ranges.

    Consecutive fragments of the same group become one range (a gap between them is alignment
    padding, zero), so the number of multiplies per step is about the number of group changes.
    """
    spans: Spans = {}
    last: tuple[int, int, int] | None = None  # (start, end, group)
    for start, numel, g in sorted(f for f in fragments if f[1] > 0):
        if last is not None and last[2] == g:
            last = (last[0], start + numel, g)
        else:
            if last is not None:
                spans.setdefault(last[2], []).append((last[0], last[1]))
            last = (start, start + numel, g)
    if last is not None:
        spans.setdefault(last[2], []).append((last[0], last[1]))
    return spans


class Zero0Adapter(DeepSpeedAdapter):
    """ZeRO-0 (plain data parallel): gradients all-reduced into ``param.grad``; each rank counts 1/world of them.

    With MoE, an expert's gradient is all-reduced over its expert-data-parallel group only: each
    rank counts 1/size of its experts over that group, and 1/world of the dense gradients.
    """

    def __init__(self, engine: Any):
        super().__init__(engine)
        group = engine.seq_data_parallel_group
        self.reduce_group = group
        dense = Replicas(("zero0", frozenset(dist.get_process_group_ranks(group))), dist.get_rank(group),
                         dist.get_world_size(group))
        experts = expert_replicas(engine, self.params, group)  # {} without MoE
        # MoE: an expert is replicated over its expert-data-parallel group only
        self.pieces = [LocalPiece(i, 0, p.numel(), i, experts[expert_group(p)] if is_expert_param(p) else dense)
                       for i, p in enumerate(self.params)]

    def scale(self, coefs: torch.Tensor, groups: Sequence[int], host_coefs: Sequence[float] | None = None) -> None:
        self._require_installed()
        GradAdapter.scale(self, coefs, groups, host_coefs)

    def zero(self, groups: Sequence[int]) -> None:
        self._require_installed()
        GradAdapter.zero(self, groups)

    def scale_rows(self, coefs: torch.Tensor) -> None:
        self._require_installed()
        GradAdapter.scale_rows(self, coefs)  # param.grad, in the step pre-hook (counting: the base's pieces)

    def drop_grads(self) -> None:
        self._require_installed()
        GradAdapter.drop_grads(self)  # param.grad = None: the torch optimizer leaves those parameters alone

    def grad_scale(self) -> float:
        return 1.0


class ZeroPartitionAdapter(DeepSpeedAdapter):
    """ZeRO-1/2: each rank holds one contiguous partition of each flattened parameter group.

    The norm counts ``averaged_gradients[i]`` (this rank's reduced partition as one piece per
    parameter it holds, in ``params_in_partition`` order, alignment padding excluded): a parameter
    straddling two partitions is counted piecewise by both ranks, each element once.
    """

    def __init__(self, engine: Any):
        super().__init__(engine)
        self.reduce_group = self.optimizer.dp_process_group  # spans every group's partition, MoE groups included
        check_partition_groups(engine, self.optimizer)

    @ds_compat.internal("DeepSpeed ZeRO optimizer internals (bind)")
    def bind(self, table: GroupTable, layout: SlotLayout) -> None:
        super().bind(table, layout)
        group_of = self._group_index()
        optimizer = self.optimizer
        index = {id(p): j for j, p in enumerate(self.params)}
        self._piece_groups: list[list[int]] = []
        self._piece_params: list[list[int]] = []  # parameter index of each held piece (attribution)
        self._piece_numels: list[list[int]] = []
        self._fragments: list[list[tuple[int, int, int]]] = []  # (start, numel, group) in the fp32 partition
        self._fragment_params: list[list[int]] = []
        self._spans = []
        for held, params in zip(optimizer.params_in_partition, optimizer.bit16_groups):
            self._piece_groups.append([_lookup(group_of, p, self.engine) for p in held])
            self._piece_params.append([index[id(p)] for p in held])
            self._piece_numels.append([ds_compat.fragment(p)[2] for p in held])
            located = [(ds_compat.fragment(p), _lookup(group_of, p, self.engine), index[id(p)]) for p in params]
            fragments = [(where[1], where[2], g) for where, g, _ in located if where is not None]
            self._fragments.append(fragments)
            self._fragment_params.append([j for where, _, j in located if where is not None])
            self._spans.append(group_spans(fragments))

    @ds_compat.internal("DeepSpeed ZeRO optimizer internals (bind_rows)")
    def bind_rows(self, plan: RowPlan) -> None:
        """Per partition, the fragments of the parameters it holds (``params_in_partition`` order, as the
        reduced gradient pieces): where each sits in its parameter and in the fp32 partition."""
        index = {id(p): j for j, p in enumerate(self.params)}
        fragments = []
        for held in self.optimizer.params_in_partition:
            frags = []
            for p in held:
                in_param, in_partition, numel = ds_compat.fragment(p)
                frags.append((index.get(id(p), -1), in_param, in_partition, numel))
            fragments.append(frags)
        self._bind_partition_rows(plan, fragments)

    @ds_compat.internal("DeepSpeed ZeRO optimizer internals (row_partials)")
    def row_partials(self) -> torch.Tensor:
        partitions = self.optimizer.single_partition_of_fp32_groups
        if self.optimizer.cpu_offload:  # reduced gradients already sit in the fp32 partitions
            grads: Sequence[torch.Tensor | None] = self._fragment_grads(partitions)
        else:
            held = self._held_grads()
            grads = [held[i][k] for i, frags in enumerate(self._row_fragments) for k, *_ in frags]
        return self._partition_row_partials(grads, partitions)

    def _held_grads(self) -> list[list[torch.Tensor]]:
        """Per partition, the reduced gradient piece of each parameter it holds (``params_in_partition`` order)."""
        out: list[list[torch.Tensor]] = []
        averaged = self.optimizer.averaged_gradients
        for i, (gids, numels) in enumerate(zip(self._piece_groups, self._piece_numels)):
            if not gids:
                out.append([])  # this rank holds no element of DeepSpeed group i (an empty partition)
                continue
            grads = averaged.get(i)
            if grads is None:
                raise RuntimeError(
                    f"distclip: DeepSpeed holds no reduced gradients for its parameter group {i}: the norm exists "
                    "only at the gradient accumulation boundary, after engine.backward() and before engine.step()"
                )
            held = [g for g in grads if not ds_compat.is_padding(g)][: len(gids)]
            if [g.numel() for g in held] != numels:
                raise RuntimeError(
                    f"distclip: DeepSpeed's reduced partition of group {i} does not match its parameter mapping "
                    f"(pieces {[g.numel() for g in held]}, expected {numels}); this DeepSpeed version lays out "
                    "ZeRO partitions differently than distclip expects"
                )
            out.append(held)
        return out

    @ds_compat.internal("DeepSpeed ZeRO optimizer internals (counted_pieces)")
    def counted_pieces(self) -> tuple[list[torch.Tensor], list[int]]:
        return self._partition_pieces(by_param=False)

    @ds_compat.internal("DeepSpeed ZeRO optimizer internals (held_pieces)")
    def held_pieces(self) -> tuple[list[torch.Tensor], list[int]]:
        """The counted pieces (a partition is held by this rank alone), with their parameter indices."""
        return self._partition_pieces(by_param=True)

    def _partition_pieces(self, by_param: bool) -> tuple[list[torch.Tensor], list[int]]:
        """This rank's reduced gradient pieces, each with its clip group (or, ``by_param``, its parameter index)."""
        if self.optimizer.cpu_offload:  # reduced gradients already sit in the fp32 partitions
            flats = [part.grad for part in self.optimizer.single_partition_of_fp32_groups]
            pieces, groups = _fragment_pieces(flats, self._fragments)
            return pieces, [j for held in self._fragment_params for j in held] if by_param else groups
        pieces = []  # the types of the branch above
        labels: list[int] = []
        for held, gids, params in zip(self._held_grads(), self._piece_groups, self._piece_params):
            pieces += held
            labels += params if by_param else gids
        return pieces, labels


class Zero3Adapter(DeepSpeedAdapter):
    """ZeRO-3: every parameter is partitioned across the ranks; each rank counts its partition minus padding."""

    def __init__(self, engine: Any):
        super().__init__(engine)
        self.reduce_group = self.optimizer.dp_process_group
        world = dist.get_world_size(self.reduce_group)
        for params in self.optimizer.fp16_groups:
            for p in params:
                if dist.get_world_size(p.ds_process_group) != world:
                    raise UnsupportedDeepSpeedSetup(
                        "distclip: a ZeRO-3 parameter is partitioned over a different process group than the "
                        "data-parallel one (hpZ / MiCS / AutoTP); not supported"
                    )

    @ds_compat.internal("DeepSpeed ZeRO optimizer internals (bind)")
    def bind(self, table: GroupTable, layout: SlotLayout) -> None:
        super().bind(table, layout)
        group_of = self._group_index()
        index = {id(p): j for j, p in enumerate(self.params)}
        self._pieces: list[list[tuple[int, int, int]]] = []  # per sub-group: (group, real numel, partition numel)
        self._fragments: list[list[tuple[int, int, int]]] = []  # (start, real numel, group) in the fp32 sub-group
        self._piece_params: list[list[int]] = []  # parameter index of each partition (attribution)
        self._spans = []
        for params in self.optimizer.fp16_groups:
            pieces, fragments, offset = [], [], 0
            for p in params:
                g = _lookup(group_of, p, self.engine)
                size = p.partition_numel()
                real = min(size, max(0, p.ds_numel - dist.get_rank(p.ds_process_group) * size))
                pieces.append((g, real, size))
                fragments.append((offset, real, g))
                offset += size
            self._pieces.append(pieces)
            self._fragments.append(fragments)
            self._piece_params.append([index[id(p)] for p in params])
            self._spans.append(group_spans(fragments))

    @ds_compat.internal("DeepSpeed ZeRO-3 optimizer internals (bind_rows)")
    def bind_rows(self, plan: RowPlan) -> None:
        """Per sub-group, each parameter's partition: rank x partition size in its flat order, at its offset in
        the fp32 sub-group, without padding."""
        index = {id(p): j for j, p in enumerate(self.params)}
        fragments = []
        for params, frags in zip(self.optimizer.fp16_groups, self._fragments):
            fragments.append([(index.get(id(p), -1), dist.get_rank(p.ds_process_group) * p.partition_numel(),
                               start, real) for p, (start, real, _) in zip(params, frags)])
        self._bind_partition_rows(plan, fragments)

    @ds_compat.internal("DeepSpeed ZeRO-3 optimizer internals (row_partials)")
    def row_partials(self) -> torch.Tensor:
        flats = self.optimizer.fp32_partitioned_groups_flat
        if self.optimizer.offload_optimizer:  # reduced gradients already sit in the fp32 sub-groups
            grads: Sequence[torch.Tensor | None] = self._fragment_grads(flats)
        else:
            averaged = self.optimizer.averaged_gradients
            grads = [averaged[i][k].reshape(-1)[:n]
                     for i, frags in enumerate(self._row_fragments) for k, *_, n in frags]
        return self._partition_row_partials(grads, flats)

    @ds_compat.internal("DeepSpeed ZeRO optimizer internals (counted_pieces)")
    def counted_pieces(self) -> tuple[list[torch.Tensor], list[int]]:
        return self._partition_pieces(by_param=False)

    @ds_compat.internal("DeepSpeed ZeRO optimizer internals (held_pieces)")
    def held_pieces(self) -> tuple[list[torch.Tensor], list[int]]:
        """The counted pieces (each parameter's partition without padding), with their parameter indices."""
        return self._partition_pieces(by_param=True)

    def _partition_pieces(self, by_param: bool) -> tuple[list[torch.Tensor], list[int]]:
        """This rank's reduced gradient partitions, each with its clip group (or, ``by_param``, its parameter index)."""
        if self.optimizer.offload_optimizer:  # reduced gradients already sit in the fp32 sub-groups
            flats = [flat.grad for flat in self.optimizer.fp32_partitioned_groups_flat]
            pieces, groups = _fragment_pieces(flats, self._fragments)
            return pieces, [j for params in self._piece_params for j in params] if by_param else groups
        pieces, groups = [], []  # the types of the branch above
        averaged = self.optimizer.averaged_gradients
        for i, layout in enumerate(self._pieces):
            grads = averaged.get(i)
            if grads is None:
                raise RuntimeError(
                    f"distclip: DeepSpeed holds no reduced gradients for its ZeRO-3 sub-group {i}: the norm exists "
                    "only at the gradient accumulation boundary, after engine.backward() and before engine.step()"
                )
            for grad, (g, real, size), j in zip(grads, layout, self._piece_params[i], strict=True):
                if grad.numel() != size:
                    raise RuntimeError(
                        f"distclip: a ZeRO-3 gradient partition has {grad.numel()} elements, expected {size}; this "
                        "DeepSpeed version lays out ZeRO-3 partitions differently than distclip expects"
                    )
                pieces.append(grad.reshape(-1)[:real])
                groups.append(j if by_param else g)
        return pieces, groups


def _fragment_pieces(
    flats: Sequence[torch.Tensor | None], fragments: Sequence[Sequence[tuple[int, int, int]]]
) -> tuple[list[torch.Tensor], list[int]]:
    """Offload: the pieces are ranges of the fp32 flat gradients, one per parameter fragment."""
    pieces: list[torch.Tensor] = []
    groups: list[int] = []
    for i, (flat, frags) in enumerate(zip(flats, fragments)):
        if not frags:
            continue
        if flat is None or flat.numel() < max(start + numel for start, numel, _ in frags):
            raise RuntimeError(
                f"distclip: DeepSpeed's offloaded fp32 gradient partition {i} is missing or too small: the norm "
                "exists only at the gradient accumulation boundary, after engine.backward() and before engine.step()"
            )
        pieces += [flat[start : start + numel] for start, numel, _ in frags]
        groups += [g for _, _, g in frags]
    return pieces, groups


def _lookup(group_of: dict[int, int], param: torch.Tensor, engine: Any) -> int:
    try:
        return group_of[id(param)]
    except KeyError:
        names = getattr(engine, "param_names", {})
        raise RuntimeError(
            f"distclip: DeepSpeed optimizes a parameter ({names.get(param, 'unnamed')}) that is not a trainable "
            "parameter of engine.module; distclip cannot assign it to a clip group"
        ) from None
