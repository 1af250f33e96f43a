"""Pipeline parallelism: this rank's stage(s) of a model split over a pipeline process group.

Each rank holds one stage (or several: virtual stages), and each stage may itself be a plain
module, DDP, FSDP1 or FSDP2 (also tensor parallel) over the stage's own ranks. The global norm is
the sum over the stages: each stage adapter counts its elements once among the stage's ranks, and
the partials of every stage travel in the SAME single collective, over the world (every stage's
ranks together). So a pipeline adds no collective, and per-group clipping works across stages:
the group table is built from the names of every stage (exchanged once at set-up over the
pipeline group, put in stage order), so every rank has the same slot layout even where a group
has no parameter.

Tied weights on two stages (torchtitan / Megatron: the first stage's embedding and the last
stage's output head are copies the user keeps in sync by an all-reduce between the two stages)
are declared with ``tied=[("tok_embeddings.weight", "output.weight")]``: the first name counts,
the others are copies, excluded from the norm and scaled with the first one's group coefficient.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import torch
import torch.distributed as dist

from ..core.config import ConfigError
from ..core.groups import GroupTable
from ..core.hook_choice import ReductionVenue
from ..core.norms import SlotLayout, combine_partials
from ..core.reduce import exchange_ints
from .base import GradAdapter
from .counting import group_ranks
from .declared import census_payload, check_census
from .mesh_geometry import PipelineStages


def pipeline_process_group(group: Any) -> Any:
    """A ProcessGroup from a ProcessGroup or a 1-D DeviceMesh (torchtitan passes its ``pp_mesh``)."""
    if hasattr(group, "get_group") and hasattr(group, "mesh"):
        if group.ndim != 1:
            raise ConfigError(
                f"pipeline_group: a DeviceMesh must be 1-D (the pipeline dimension, e.g. mesh['pp']), got {group}")
        return group.get_group()
    try:
        group_ranks(group)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(
            f"pipeline_group must be a ProcessGroup or a 1-D DeviceMesh, got {type(group).__name__}") from err
    return group


def stage_modules(stages: Any, pipeline_rank: int, pipeline_size: int) -> list[tuple[int, Any]]:
    """(stage index, object to adapt) of each stage this rank holds: a stage, a PipelineStage (its
    ``submod`` and ``stage_index``), or a list of them (virtual stages).

    A module does not know its stage index: the k-th module of a list is taken to be stage
    ``k * pipeline_size + pipeline_rank`` (the "loop" assignment of torch's and torchtitan's
    interleaved schedules); pass PipelineStage objects for any other assignment (e.g. V-shaped).
    """
    items = list(stages) if isinstance(stages, (list, tuple)) else [stages]
    if not items:
        raise ConfigError("distclip: no pipeline stage given")
    out = []
    for k, s in enumerate(items):
        if isinstance(getattr(s, "submod", None), torch.nn.Module) and hasattr(s, "stage_index"):
            out.append((int(s.stage_index), s.submod))
        else:
            out.append((k * pipeline_size + pipeline_rank, s))
    return out


class PipelineAdapter(GradAdapter):
    """The stages this rank holds, each counted by its own adapter, reduced over the world in one collective."""

    kind = "pipeline"

    def __init__(self, stages: Any, pipeline_group: Any, tied: Sequence[Sequence[str]] | None = None):
        from . import single_adapter

        super().__init__([])
        self.pipeline_group = pipeline_process_group(pipeline_group)
        self.pipeline_ranks = group_ranks(self.pipeline_group)
        self.pipeline_rank = dist.get_rank(self.pipeline_group)
        # which stage every rank holds: one all-gather of one int (every rank of the world builds this adapter)
        layout = PipelineStages(exchange_ints(dist.group.WORLD, [self.pipeline_rank])[:, 0].tolist(), dist.get_rank())
        held = stage_modules(stages, self.pipeline_rank, len(self.pipeline_ranks))
        self.stage_indices = [index for index, _ in held]
        self.stages = [single_adapter(m, stages=layout) for _, m in held]
        self.names = [n for s in self.stages for n in s.names]
        self.params = [p for s in self.stages for p in s.params]
        self.has_names = all(s.has_names for s in self.stages)
        duplicates = sorted(n for n, k in Counter(self.names).items() if k > 1)
        if duplicates:
            raise ConfigError(
                f"distclip: the stages on this rank share parameter names {duplicates[:3]}: give virtual stages the "
                "full model's names (as torchtitan's pipeline split does) so that groups and tied weights are "
                "unambiguous")
        self.tied = [tuple(t) for t in (tied or [])]
        for tie in self.tied:
            if len(tie) < 2 or not all(isinstance(n, str) for n in tie):
                raise ConfigError(
                    f"tied: each entry lists two or more parameter names (the counted one first), got {tie!r}")
        self.reduce_group = dist.group.WORLD
        self.setup_problems = self._tiling_problems()

    def _tiling_problems(self) -> tuple[str, ...]:
        """Whether the stages tile the world. Not raised here: a problem some ranks alone see would leave the
        others waiting in the set-up exchange, so the clipper raises it on every rank after that exchange."""
        sizes = sorted({s.stage_size() for s in self.stages})
        world, stages = dist.get_world_size(), len(self.pipeline_ranks)
        if len(sizes) == 1 and stages * sizes[0] == world:
            return ()
        return (f"distclip: {stages} pipeline ranks x the ranks of each stage ({sizes}: the stage's wrapper's ranks "
                f"times the groups its tensors are declared over) do not make up the {world} ranks of the world; "
                "the norm is reduced over the world, so every rank must hold a stage of this model (pass the "
                "pipeline group of this model's ranks, and declare tensors only over groups inside their stage)",)

    # ----------------------------------------------------------------- layout
    def copies(self) -> dict[str, str]:
        """Tied copies on this rank -> the name of the parameter that counts for them."""
        local = set(self.names)
        return {copy: tie[0] for tie in self.tied for copy in tie[1:] if copy in local}

    def bind(self, table: GroupTable, layout: SlotLayout) -> None:
        self.layout = layout
        copies = self.copies()
        for stage in self.stages:
            stage.uncounted |= {i for i, n in enumerate(stage.names) if n in copies}
            stage.bind(table, layout)
        self.group_of = [g for s in self.stages for g in s.group_of]

    def tensor_names(self) -> dict[int, str]:
        return {k: v for s in self.stages for k, v in s.tensor_names().items()}

    def names_by_stage(self) -> list[tuple[int, list[str]]]:
        """(stage index, parameter names) of each stage this rank holds."""
        return [(index, stage.names) for index, stage in zip(self.stage_indices, self.stages)]

    def stage_key(self) -> int:
        """Which stage(s) this rank holds: ranks with the same key must have the same stage layout."""
        return self.pipeline_rank

    def describe(self) -> dict[str, object]:
        return {"adapter": self.kind, "pipeline_size": len(self.pipeline_ranks), "virtual_stages": len(self.stages)}

    def describe_stage(self) -> dict[str, object]:
        return {"stages": [s.describe() for s in self.stages], "stage_indices": self.stage_indices}

    def verify_layout(self) -> None:
        """The census of declared copies, on EVERY rank (one exchange over the world): stages that declare
        nothing join it too, so that a model declaring tensors on some stages only does not hang."""
        declarations = [d for s in self.stages for d in (s.declarations or [None] * len(s.names))]
        check_census(self.reduce_group, census_payload(self.names, self.params, declarations))

    # ------------------------------------------------------------------ COUNT
    def local_grads(self) -> list[torch.Tensor | None]:
        return [g for s in self.stages for g in s.local_grads()]

    def local_partials(self, skip_groups: frozenset[int] = frozenset()) -> tuple[torch.Tensor, str]:
        parts = [s.local_partials(skip_groups) for s in self.stages]
        device = self.collective_device([p for p, _ in parts])
        combined = combine_partials([p.to(device) for p, _ in parts], self.layout, device)
        sources = {source for _, source in parts}
        return combined, sources.pop() if len(sources) == 1 else "mixed"

    def counted_pieces(self) -> tuple[list[torch.Tensor], list[int]]:
        pieces, groups = [], []
        for stage in self.stages:
            p, g = stage.counted_pieces()
            pieces += p
            groups += g
        return pieces, groups

    def held_pieces(self) -> tuple[list[torch.Tensor], list[int]]:
        """Every stage's pieces, their parameter indices shifted to this adapter's order (the stages' names in turn)."""
        pieces, params, offset = [], [], 0
        for stage in self.stages:
            p, i = stage.held_pieces()
            pieces += p
            params += [offset + k for k in i]
            offset += len(stage.names)
        return pieces, params

    def grad_scale(self) -> float:
        return 1.0

    # ------------------------------------------------------------------- HOOK
    def reduction_venue(self) -> ReductionVenue | None:
        """The first stage's that has one (the stages on a rank share a backend and a device)."""
        return next((v for v in (s.reduction_venue() for s in self.stages) if v is not None), None)

    def decline_reduction_hook(self, reason: str, inner: Any = None, inner_state: Any = None) -> None:
        for stage in self.stages:
            stage.decline_reduction_hook(reason, inner, inner_state)
        self.hook_status = ", ".join(s.hook_status for s in self.stages)

    def enable_reduction_hook(self, inner: Any = None, inner_state: Any = None) -> bool:
        enabled = [s.enable_reduction_hook(inner, inner_state) for s in self.stages]
        self.hook_status = ", ".join(s.hook_status for s in self.stages)
        return all(enabled)

    # ------------------------------------------------------------------ APPLY
    def scaled_grads(self) -> list[list[torch.Tensor]]:
        out: list[list[torch.Tensor]] = [[] for _ in range(self.layout.num_groups)]
        for stage in self.stages:
            for g, tensors in enumerate(stage.scaled_grads()):
                out[g] += tensors
        return out

    def scale(self, coefs: torch.Tensor, groups: Sequence[int], host_coefs: Sequence[float] | None = None) -> None:
        for stage in self.stages:
            stage.scale(coefs, groups, host_coefs)

    def zero(self, groups: Sequence[int]) -> None:
        for stage in self.stages:
            stage.zero(groups)

    def drop_grads(self) -> None:
        for stage in self.stages:
            stage.drop_grads()
