"""Assign parameters to clip groups: explicit glob groups, the per-layer or per-parameter shorthand, ``default``."""

from __future__ import annotations

import fnmatch
import hashlib
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

from .config import DEFAULT_GROUP, ClipConfig, ConfigError, GroupSpec, PerLayerSpec

EXCLUDED_GROUP = "<not clipped>"  # hidden trailing group of the parameters outside a clipped subset


@dataclass(frozen=True)
class ClipGroup:
    """One clip group: its threshold and norm type, resolved from the config.

    ``origin``: the config section that made it (``groups``, ``per_layer``, ``per_parameter``,
    ``default``, or ``excluded`` for the hidden group of a clipped subset); it decides which
    ``policy`` the group follows. ``clipped``: False for a measured-only group (``max_norm: null``;
    its ``max_norm`` is then inf). ``in_total``: False when the group is left out of the total norm.
    """

    name: str
    max_norm: float
    norm_type: float
    origin: str = "groups"
    clipped: bool = True
    in_total: bool = True

    @property
    def key(self) -> tuple:
        """What the slot layout and the coefficients depend on (fingerprints compare it across ranks)."""
        return (self.name, self.max_norm, self.norm_type, self.clipped, self.in_total)


@dataclass(frozen=True)
class GroupTable:
    """Groups in a fixed order (identical on every rank) and the group index of each parameter."""

    groups: tuple[ClipGroup, ...]
    index_of: dict[str, int]  # canonical parameter name -> group index

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    def fingerprint(self, names: Sequence[str] | None = None) -> str:
        """Hash of the group order and of each parameter's group (of ``names`` only, when given): equal
        across ranks iff layouts agree."""
        assigned = self.index_of.items() if names is None else ((n, self.index_of[n]) for n in names)
        text = repr([g.key for g in self.groups]) + repr(sorted(assigned))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def groups_fingerprint(self) -> str:
        """Hash of the group order, thresholds and norm types alone (the slot layout)."""
        return hashlib.sha256(repr([g.key for g in self.groups]).encode()).hexdigest()[:16]

    def tied(self, copies: dict[str, str]) -> "GroupTable":
        """This table with each tied copy in its counted parameter's group (both are scaled alike)."""
        unknown = sorted(owner for owner in copies.values() if owner not in self.index_of)
        if unknown:
            raise ConfigError(f"tied: {unknown} is not a trainable parameter of any pipeline stage")
        return GroupTable(self.groups, {**self.index_of, **{c: self.index_of[o] for c, o in copies.items()}})

    def restricted_to(self, names: Sequence[str], norm_type: float) -> "GroupTable":
        """This table with every parameter NOT in ``names`` moved to a trailing :data:`EXCLUDED_GROUP`.

        The excluded group is last, so the visible groups keep their indices and order.
        """
        keep = set(names)
        unknown = keep - self.index_of.keys()
        if unknown:
            raise ConfigError(
                f"distclip: {len(unknown)} of the parameters to clip are not trainable parameters of this model "
                f"(e.g. {sorted(unknown)[:3]}); pass parameters of the model the clipper was built for"
            )
        excluded = len(self.groups)
        groups = (*self.groups, ClipGroup(EXCLUDED_GROUP, math.inf, norm_type, origin="excluded",
                                            clipped=False, in_total=False))
        return GroupTable(groups, {n: (g if n in keep else excluded) for n, g in self.index_of.items()})


def _group(name: str, spec: GroupSpec | PerLayerSpec, config: ClipConfig, origin: str) -> ClipGroup:
    """A group of an explicit or per-layer section: its own settings, else the top-level ones; a measured-only
    section (``max_norm: null``) makes groups that are never clipped (threshold inf)."""
    max_norm = math.inf if spec.measured_only else (spec.max_norm or config.max_norm)
    return ClipGroup(name, max_norm, spec.norm_type or config.norm_type, origin=origin,
                     clipped=not spec.measured_only, in_total=spec.in_total)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _layer_prefix(name: str, depth: int) -> str:
    parts = name.split(".")
    return ".".join(parts[: max(1, min(depth, len(parts) - 1))])


def resolve_groups(config: ClipConfig, param_names: Sequence[str], warn_empty: bool = True) -> GroupTable:
    """Build the group table. Order: explicit groups (config order), per-layer or per-parameter groups
    (model order), default.

    ``param_names`` must be the canonical names of every parameter, in the same order on every
    rank. Explicit groups that match nothing are kept (so every rank has the same layout) and
    reported with a warning: an empty group is usually a typo in a pattern.
    """
    explicit = [_group(g.name, g, config, "groups") for g in config.groups]
    explicit_names = {g.name for g in explicit}
    shorthand: dict[str, ClipGroup] = {}  # per-layer or per-parameter groups, in model order
    assignment: dict[str, str] = {}
    for name in param_names:
        spec = next((g for g in config.groups if _matches(name, g.match)), None)
        if spec is not None:
            assignment[name] = spec.name
        elif config.per_parameter:
            if name in explicit_names or name == DEFAULT_GROUP:
                raise ConfigError(
                    f"per_parameter: parameter {name!r} would make a group with the name of an explicit group "
                    f"or 'default'; rename that group"
                )
            shorthand[name] = ClipGroup(name, config.max_norm, config.norm_type, origin="per_parameter")
            assignment[name] = name
        elif config.per_layer is not None and _matches(name, config.per_layer.match):
            prefix = _layer_prefix(name, config.per_layer.depth)
            if prefix in explicit_names or prefix == DEFAULT_GROUP:
                raise ConfigError(
                    f"per_layer: the layer group {prefix!r} (from parameter {name!r}) has the name of an "
                    f"explicit group or 'default'; rename that group or change per_layer.depth"
                )
            shorthand.setdefault(prefix, _group(prefix, config.per_layer, config, "per_layer"))
            assignment[name] = prefix
        else:
            assignment[name] = DEFAULT_GROUP
    default = ClipGroup(DEFAULT_GROUP, config.max_norm, config.norm_type, origin="default")
    groups = (*explicit, *shorthand.values(), default)
    position = {g.name: i for i, g in enumerate(groups)}
    if warn_empty:
        used = set(assignment.values())
        empty = [g.name for g in explicit if g.name not in used]
        if empty:
            warnings.warn(
                f"distclip: clip group(s) {empty} match no parameter; check their 'match' patterns "
                f"against the model's names (e.g. {list(param_names)[:3]})",
                stacklevel=3,
            )
    return GroupTable(groups=groups, index_of={n: position[g] for n, g in assignment.items()})
