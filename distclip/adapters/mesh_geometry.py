"""Where a DeviceMesh sits in the job: which ranks hold the same DTensor piece, counted over the ROOT mesh.

A DTensor lives on a mesh that may be a sub-mesh (``mesh["dp"]``) or a flattened sub-mesh
(``mesh["dp", "cp"]._flatten()``) of a larger root mesh, e.g. ``(dp, tp)``. Along the root
dimensions the sub-mesh does not span, every rank holds its own copy of the sub-mesh, hence of the
tensor: a DTensor on ``mesh["dp"]`` is replicated across ``tp``, exactly like a ``Replicate``
placement. Counting replicas over one mesh only counts such a tensor once per ``tp`` rank (the
classic "norm sqrt(TP) too large" bug); counting over the root mesh counts it once.

For a piece with placements ``P`` on mesh ``M``, the *replicated root dimensions* are those
spanned by M's ``Replicate`` dimensions plus those M does not span at all. Ranks that differ only
along them hold identical pieces: :meth:`MeshGeometry.replicas` gives this rank's index among them
(mixed radix of its root coordinates along those dimensions), their number, and a key that is the
same on all of them (the root mesh and this rank's coordinates along the other dimensions).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from . import _compat
from .counting import Replicas


def mesh_key(mesh: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, ranks in order): equal for the same mesh on every rank that holds it."""
    return tuple(mesh.mesh.shape), tuple(mesh.mesh.flatten().tolist())


class MeshGeometry:
    """One mesh placed in its root mesh, from this rank's point of view (computed once per mesh)."""

    def __init__(self, mesh: Any, rank: int, pipeline_ranks: frozenset[int] | None = None):
        self.mesh = mesh
        self.key = mesh_key(mesh)
        self.coordinate = mesh.get_coordinate()  # None: this rank is not in the mesh
        self.root = _compat.root_mesh(mesh)
        self.root_key = mesh_key(self.root)
        self.root_shape: tuple[int, ...] = tuple(self.root.mesh.shape)
        self.ranks = frozenset(self.key[1])
        self.root_ranks = frozenset(self.root_key[1])
        if self.coordinate is None:
            return
        root_grid = self.root.mesh
        position = (root_grid == rank).nonzero()
        if position.numel() == 0:
            raise _compat.unsupported(f"the root of mesh {mesh} does not hold this rank ({rank})")
        self.root_coordinate: tuple[int, ...] = tuple(position[0].tolist())
        self.spans: list[tuple[int, ...]] = [self._root_dims_of(d) for d in range(mesh.ndim)]
        covered = {d for dims in self.spans for d in dims}
        # Root dimensions along which the pipeline stages run hold other stages' parameters, not copies.
        self.stage_dims = self._dims_varying(pipeline_ranks) if pipeline_ranks else ()
        self.uncovered = tuple(d for d in range(len(self.root_shape)) if d not in covered and d not in self.stage_dims)
        same_stage = (root_grid.new_ones(root_grid.shape, dtype=torch.bool) if not self.stage_dims else
                      self._along(root_grid, self.stage_dims))
        self.stage_ranks = frozenset(root_grid[same_stage].tolist())

    def _root_dims_of(self, dim: int) -> tuple[int, ...]:
        """The root dimensions that mesh dimension ``dim`` runs along (several for a flattened one)."""
        index = list(self.coordinate)
        along = []
        for c in range(self.mesh.size(dim)):
            index[dim] = c
            along.append(int(self.mesh.mesh[tuple(index)]))
        coords = [tuple((self.root.mesh == r).nonzero()[0].tolist()) for r in along]
        dims = tuple(d for d in range(len(self.root_shape)) if len({c[d] for c in coords}) > 1)
        if math.prod(self.root_shape[d] for d in dims) != self.mesh.size(dim) and self.mesh.size(dim) > 1:
            raise _compat.unsupported(
                f"mesh dimension {dim} of {self.mesh} is not a whole set of dimensions of its root mesh "
                f"{self.root} (a partial slice)"
            )
        return dims

    def _dims_varying(self, ranks: frozenset[int]) -> tuple[int, ...]:
        """The root dimensions along which these ranks' coordinates differ (none if some are outside the root)."""
        if not ranks <= self.root_ranks:
            return ()
        coords = [tuple((self.root.mesh == r).nonzero()[0].tolist()) for r in sorted(ranks)]
        return tuple(d for d in range(len(self.root_shape)) if len({c[d] for c in coords}) > 1)

    def _along(self, grid: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
        """Mask of the grid positions that share this rank's coordinates along ``dims``."""
        mask = grid.new_ones(grid.shape, dtype=torch.bool)
        for d in dims:
            index = [slice(None)] * grid.ndim
            index[d] = self.root_coordinate[d]
            keep = torch.zeros_like(mask)
            keep[tuple(index)] = True
            mask &= keep
        return mask

    def replicas(self, placements: Sequence[Any]) -> Replicas | None:
        """This rank's copy among the ranks holding the same piece (None: it alone holds it)."""
        if self.coordinate is None:
            return None
        replicated = set(self.uncovered)
        for dim, placement in enumerate(placements):
            if placement.is_replicate():
                replicated.update(self.spans[dim])
        if not replicated:
            return None
        dims = sorted(replicated)
        index, count = 0, 1
        for d in dims:
            index, count = index * self.root_shape[d] + self.root_coordinate[d], count * self.root_shape[d]
        others = tuple(c for d, c in enumerate(self.root_coordinate) if d not in replicated)
        return Replicas((self.root_key, tuple(dims), others), index, count)
