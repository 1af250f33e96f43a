"""Declared layouts of plain (non-DTensor) parameters: hand-written tensor / expert parallelism.

A DTensor says where its pieces live; a plain tensor does not. In a Megatron-style model a
column-parallel weight is a different shard on every tensor-parallel rank, while a LayerNorm
weight is the same copy on all of them, and nothing on the tensors tells the two apart: counted
by the data-parallel rule alone, the copies are counted once per tensor-parallel rank (the
"norm sqrt(TP) too large" bug) and the shards of the other ranks are never added. Declare them::

    distclip.declare(block.norm.weight, replicated_over=tp_group)   # the same on every rank of tp_group
    distclip.declare(block.fc1.weight, sharded_over=tp_group)       # a different part on each rank of tp_group
    distclip.declare(model.router.bias, owner=0)                     # counted by global rank 0 only

on every rank, before building the clipper. Groups are process groups (or 1-D DeviceMeshes).
A declaration adds to what the wrapper already knows: under ``DDP(model, process_group=dp)`` a
parameter is a copy on every rank of ``dp`` anyway, so a declared ``replicated_over=tp`` one is a
copy on every rank of ``dp`` x ``tp``. The clip then reduces over every rank that holds a counted
element (the world, when the groups tile it). Undeclared plain parameters keep the wrapper's rule
(DDP: copies over its group; a plain module: this rank's own; beside DTensors, which no wrapper copies:
copies over every rank of the layout). Beside DTensors a declaration is the tensor's whole layout, e.g.
experts left out of ``fully_shard``: ``declare(experts, sharded_over=ep_group, replicated_over=dp_group)``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
from torch.utils.weak import WeakIdKeyDictionary

from ..compat import pytorch as _compat
from ..core.errors import UsageError
from ..core.reduce import exchange_bytes, exchange_int_rows, hash60
from .counting import Replicas

# Keyed by identity: a WeakKeyDictionary compares tensors with ``==`` on lookup (elementwise: an error)
_DECLARED: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


class Ranks(tuple):
    """The global ranks of one process group, in group order: ONE object per group (see :func:`_ranks_of`),
    so that P declarations over a group of R ranks hold P references, not P copies of R ranks, and its
    set and hash are computed once."""

    @functools.cached_property
    def members(self) -> frozenset[int]:
        return frozenset(self)

    def __hash__(self) -> int:
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = self.__dict__["_hash"] = tuple.__hash__(self)
        return cached


def members(ranks: Sequence[int]) -> frozenset[int]:
    """The set of a group's ranks (computed once per :class:`Ranks`)."""
    return ranks.members if isinstance(ranks, Ranks) else frozenset(ranks)


# process group -> its Ranks, while the group lives: declaring P parameters over one group reads its ranks once
_GROUP_RANKS: "weakref.WeakKeyDictionary[Any, Ranks]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Declaration:
    """How a plain parameter is laid out beyond its wrapper."""

    replicated: tuple[tuple[int, ...], ...] = ()  # global ranks of each group it is a copy over, in group order
    sharded: tuple[int, ...] = ()  # global ranks of the group it is split over
    owner: int | None = None  # the one global rank that counts it

    def ranks(self) -> set[int]:
        """Every rank the declaration names."""
        return {r for g in self.replicated for r in g} | set(self.sharded)


def _ranks_of(group: Any, what: str) -> Ranks:
    if hasattr(group, "get_group") and hasattr(group, "mesh"):  # a DeviceMesh
        if group.ndim != 1:
            raise UsageError(f"distclip.declare({what}=...): a DeviceMesh must be 1-D (slice it, e.g. mesh['tp'])")
        group = group.get_group()
    try:
        cached = _GROUP_RANKS.get(group)
    except TypeError:  # not weakly referenceable: not a ProcessGroup (reported below)
        cached = None
    if cached is not None:
        return cached
    try:
        ranks = Ranks(dist.get_process_group_ranks(group))
    except Exception as err:  # noqa: BLE001 - anything else is not a process group
        raise UsageError(
            f"distclip.declare({what}=...) expects a torch.distributed ProcessGroup or a 1-D DeviceMesh, got "
            f"{type(group).__name__}"
        ) from err
    try:
        _GROUP_RANKS[group] = ranks
    except TypeError:
        pass
    return ranks


def declare(param: torch.Tensor, *, replicated_over: Any = None, sharded_over: Any = None,
            owner: int | None = None) -> torch.Tensor:
    """Declare how a plain parameter is laid out across ranks; returns ``param``.

    ``replicated_over=group`` (or a list of groups): the same values on every rank of the group(s);
    ``sharded_over=group``: a different part on each rank of ``group`` (may be combined with
    ``replicated_over`` for the copies of each part); ``owner=rank``: counted by that global rank
    only (alone). Call it on every rank, before the clipper is built.
    """
    if not isinstance(param, torch.Tensor) or _compat._is_dtensor(param):
        raise UsageError(
            "distclip.declare is for plain tensors; a DTensor already carries its layout "
            f"(got {type(param).__name__})")
    if owner is not None:
        if replicated_over is not None or sharded_over is not None:
            raise UsageError("distclip.declare(owner=...) takes no other keyword: the owner alone counts the tensor")
        if isinstance(owner, bool) or not isinstance(owner, int) or not 0 <= owner < dist.get_world_size():
            raise UsageError(
                f"distclip.declare(owner=...) must be a global rank in [0, {dist.get_world_size()}), got {owner!r}")
        _DECLARED[param] = Declaration(owner=owner)
        return param
    if replicated_over is None and sharded_over is None:
        raise UsageError("distclip.declare needs replicated_over=, sharded_over= or owner=")
    if isinstance(replicated_over, (list, tuple)):
        groups = replicated_over
    else:
        groups = [] if replicated_over is None else [replicated_over]
    replicated = tuple(_ranks_of(g, "replicated_over") for g in groups)
    sharded = _ranks_of(sharded_over, "sharded_over") if sharded_over is not None else ()
    if sharded and any(members(sharded) & members(g) - {dist.get_rank()} for g in replicated):
        raise UsageError("distclip.declare: the sharded_over group overlaps a replicated_over group: a tensor "
                         "cannot be both a copy and a different part on the same ranks")
    _DECLARED[param] = Declaration(replicated=replicated, sharded=sharded)
    return param


def declaration_of(param: torch.Tensor) -> Declaration | None:
    return _DECLARED.get(param)


def declared_groups(declarations: Iterable[Declaration | None]) -> list[frozenset[int]]:
    """The distinct groups named by ``declarations`` (replicated and sharded), each as a set of ranks.

    Linear in the number of declarations plus the ranks of the distinct groups: declarations over one
    group share its :class:`Ranks` object, which is looked at once."""
    by_id: dict[int, Sequence[int]] = {}
    for d in declarations:
        if d is not None:
            for g in (*d.replicated, d.sharded):
                if g:
                    by_id.setdefault(id(g), g)
    return list(dict.fromkeys(members(g) for g in by_id.values()))


def declared_replicas(declaration: Declaration | None, base: Replicas | None, base_ranks: frozenset[int],
                      rank: int, name: str, cache: dict[Any, Replicas | None] | None = None
                      ) -> tuple[Replicas | None, bool]:
    """(replicas, counted here) of a plain parameter whose wrapper makes it a copy over ``base_ranks``.

    ``base``: the wrapper's own replicas (None: this rank's alone). Each ``replicated_over`` group G
    multiplies the copies by |G|: rank (g, b) is copy ``g * |B| + b`` of ``|G| * |B|``. G must meet
    the ranks counted so far in this rank only (a grid), or lie inside them (nothing new).

    ``cache`` (one per adapter): the result per combination of declared groups, so that P parameters
    declared over the same groups cost O(P) and not O(P x ranks), and share one :class:`Replicas`.
    """
    if declaration is None:
        return base, True
    if declaration.owner is not None:
        return None, rank == declaration.owner
    key = tuple(map(id, declaration.replicated))  # the Ranks objects are one per group (and live in the declaration)
    if cache is not None and key in cache:
        return cache[key], True
    index, count = (base.index, base.count) if base is not None else (0, 1)
    covered = base_ranks | {rank}
    replica_key: list[Any] = ["declared", base_ranks]  # frozensets: their hashes are computed once
    for ranks in declaration.replicated:
        group = members(ranks)
        if rank not in group:
            raise UsageError(f"distclip: {name!r} is declared replicated over ranks {sorted(group)}, which do not "
                             f"include this rank ({rank})")
        if group <= covered:
            continue
        overlap = group & covered
        if len(overlap) > 1:
            raise UsageError(
                f"distclip: {name!r} is declared replicated over ranks {sorted(group)}, which share {sorted(overlap)} "
                f"with the ranks it is already a copy over ({sorted(covered)}): declare each group once, e.g. only "
                "the tensor-parallel group under DDP")
        index, count = ranks.index(rank) * count + index, count * len(group)
        covered |= group
        replica_key.append(group)
    out = None if count == 1 else Replicas(tuple(replica_key), index, count)
    if cache is not None:
        cache[key] = out
    return out, True


def census_payload(names: Sequence[str], params: Sequence[torch.Tensor],
                   declarations: list[Declaration | None]) -> list[list[Any]]:
    """Per group a parameter is declared replicated over: [group ranks, [[name, hash of its shape, dtype and
    values], ...]]. The members of a group must publish the same list (checked at set-up)."""
    by_id: dict[int, tuple[Sequence[int], list[int]]] = {}  # declarations over one group share its Ranks object
    for i, d in enumerate(declarations):
        for ranks in (d.replicated if d is not None else ()):
            by_id.setdefault(id(ranks), (ranks, []))[1].append(i)
    members_of: dict[tuple[int, ...], list[int]] = {}
    for group, indices in by_id.values():
        members_of.setdefault(tuple(sorted(group)), []).extend(indices)
    declared = sorted({i for indices in members_of.values() for i in indices})
    values = (params[i].detach().double() for i in declared)
    checksums = torch.stack([torch.stack([t.sum(), t.abs().sum()]) for t in values]
                            ).cpu().tolist() if declared else []  # one host sync, at set-up
    value_of = dict(zip(declared, checksums))
    out = []
    for ranks, indices in members_of.items():
        digests = [[names[i], hashlib.sha256(repr((tuple(params[i].shape), str(params[i].dtype), value_of[i])).encode()
                                             ).hexdigest()[:16]] for i in indices]
        out.append([list(ranks), digests])
    return out


def _census_row(payload: list[list[Any]]) -> list[int]:
    """Per declared group: (hash of its ranks, its size, hash of its parameters' digests in name order)."""
    row = []
    for ranks, digests in payload:
        row += [hash60(repr(ranks)), len(ranks), hash60(repr(sorted(map(tuple, digests))))]
    return row


def _census_verdict(rows: torch.Tensor, sizes: torch.Tensor) -> set[int]:
    """The groups (by rank hash) whose members did not all publish the same digests: a group of ``n`` ranks
    must be published by ``n`` ranks, all alike. The same on every rank (every rank sees every row); tensor
    ops over the ``world x 3k`` table, no Python object per rank."""
    valid = torch.arange(rows.shape[1]).unsqueeze(0) < sizes.unsqueeze(1)
    triples = rows[valid].view(-1, 3)  # (key, size, digest) of every declared group of every rank
    if not len(triples):
        return set()
    keys, group_of, published = torch.unique(triples[:, 0], return_inverse=True, return_counts=True)
    first = torch.full((len(keys),), len(triples), dtype=torch.int64).scatter_reduce_(
        0, group_of, torch.arange(len(triples)), reduce="amin")  # the first publication of each group
    differ = (triples[:, 1:] != triples[first[group_of], 1:]).any(dim=1)
    bad = torch.zeros(len(keys), dtype=torch.bool).index_put_((group_of,), differ, accumulate=True)
    bad |= published != triples[first, 1]
    return set(keys[bad].tolist())


def check_census(group: Any, payload: list[list[Any]]) -> None:
    """Raise on every rank when parameters declared replicated over a group differ between its ranks,
    naming the parameters that differ.

    One exchange of three int64 per declared group and rank (O(world x groups) bytes, whatever the
    number of parameters); the digests of each parameter travel only for the groups that disagree.
    """
    bad = _census_verdict(*exchange_int_rows(group, _census_row(payload)))
    if not bad:
        return
    suspect = [[ranks, digests] for ranks, digests in payload if hash60(repr(ranks)) in bad]
    published = [json.loads(b) for b in exchange_bytes(group, json.dumps(suspect).encode())]
    problems = []
    by_rank: dict[int, dict[tuple[int, ...], dict[str, str]]] = {}  # each member's suspect groups, read once
    for ranks, digests in suspect:
        mine = dict(digests)
        for r in ranks:
            if r not in by_rank:
                by_rank[r] = {tuple(g): dict(d) for g, d in published[dist.get_group_rank(group, r)]}
            theirs = by_rank[r].get(tuple(ranks), {})
            differ = [name for name, digest in digests if theirs.get(name) != digest]
            differ += [name for name in theirs if name not in mine]
            if differ:
                problems.append(f"{differ[:3]} differ between ranks {dist.get_rank()} and {r} of the group {ranks}")
                break
    raise UsageError(
        "distclip: parameters declared replicated_over a group are not copies on its ranks"
        + (": " + "; ".join(problems[:3]) if problems else " (see the other ranks' errors)")
        + ". A tensor that differs across the group is a shard: declare it sharded_over that group instead "
        "(shape, dtype or values differ; the census compares them once, when the clipper is built)")
