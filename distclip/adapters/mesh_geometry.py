"""Which ranks hold the same DTensor piece, read off the mesh's rank layout (never off an assumed root).

A DTensor lives on a DeviceMesh that may be a root mesh, a sub-mesh (``mesh["dp"]``), a flattened
one (``mesh["dp", "cp"]._flatten()``), or a mesh unflattened from a 1-D world mesh (torchtitan's
``ParallelDims``, Accelerate's ``ParallelismConfig``). torch keeps every such mesh as one
*instance* of a layout over its root's ranks; the other instances of that layout are the same
mesh elsewhere in the job (``mesh["dp"]`` at every ``tp`` coordinate), holding the same
parameters. So, for a piece with placements ``P`` at coordinate ``c`` of its mesh, the ranks that
hold an identical copy are, in every instance, those whose coordinates equal ``c`` along the
non-``Replicate`` dimensions (:meth:`MeshGeometry.replicas`), less the ranks of other pipeline
stages (:class:`PipelineStages`), which hold other parameters in meshes of the same layout.

A DTensor on a sub-mesh is thereby counted once over the whole job, not once per copy of its
sub-mesh (the classic "norm sqrt(TP) too large" bug), whatever way the framework built the mesh.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..compat import pytorch as _compat
from .counting import Replicas


class PipelineStages:
    """Which pipeline stage each rank of the job holds (exchanged once at set-up: one int per rank).

    Ranks of other stages hold other parameters, even in meshes of the same layout (torchtitan
    unflattens ``pp`` out of the same world mesh as ``dp_shard`` and ``tp``): never copies.
    """

    def __init__(self, stage_of_rank: Sequence[int], rank: int):
        self.stage_of_rank = tuple(int(s) for s in stage_of_rank)  # indexed by global rank
        self.stage = self.stage_of_rank[rank]

    def same_stage(self, ranks: Sequence[int]) -> list[int]:
        """The ``ranks`` that hold this rank's stage."""
        return [r for r in ranks if self.stage_of_rank[r] == self.stage]


class MeshGeometry:
    """One mesh seen from this rank: its instances across the job, this rank's coordinate (computed once per mesh)."""

    def __init__(self, mesh: Any, rank: int, stages: PipelineStages | None = None):
        self.mesh = mesh
        self.shape = tuple(mesh.mesh.shape)
        self.coordinate = mesh.get_coordinate()  # None: this rank is not in the mesh
        self.instances = _compat.mesh_instances(mesh)  # [K, *mesh.shape]
        self.span = frozenset(self.instances.flatten().tolist())  # every rank holding a part or a copy
        self.rank = rank
        self.stages = stages

    def root_group(self) -> Any:
        """A process group over exactly :attr:`span` when one exists (the 1-D root's), else None."""
        root = _compat.root_mesh(self.mesh)
        return root.get_group() if root.ndim == 1 else None

    def holders(self, placements: Sequence[Any]) -> list[int]:
        """The ranks (sorted) that hold the same local piece as this rank, this rank included."""
        index = (slice(None),) + tuple(
            slice(None) if placement.is_replicate() else c for placement, c in zip(placements, self.coordinate))
        ranks = sorted(int(r) for r in self.instances[index].flatten().tolist())
        return self.stages.same_stage(ranks) if self.stages is not None else ranks

    def replicas(self, placements: Sequence[Any]) -> Replicas | None:
        """This rank's copy among the ranks holding the same piece (None: it alone holds it)."""
        if self.coordinate is None:
            return None
        holders = self.holders(placements)
        if len(holders) <= 1:
            return None
        # a frozenset caches its hash: the replica set is a dict key once per piece (counted_segments)
        return Replicas(("holders", frozenset(holders)), holders.index(self.rank), len(holders))
