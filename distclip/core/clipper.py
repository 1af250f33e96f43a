"""GradClipper: adapter -> local partials -> ONE collective -> policy -> coefficients -> adapter applies -> report.

Groups with ``policy: {kind: agc}`` are clipped unit-wise (:mod:`distclip.core.unitwise`): their
per-unit sums of gradients and parameters ride in the same collective, after the group slots.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Callable, Iterable, Mapping

import torch

from ..adapters import adapter_for
from ..compat import pytorch as _compat
from ..adapters.base import GradAdapter
from ..adapters.pipeline import PipelineAdapter
from .attach import Attachment
from .audit import Applied, ClipAudit
from .config import ClipConfig, ConfigError, load_config
from .counters import ClipCounters
from .errors import NonFiniteGradientError, StateDictError, UsageError
from .groups import GroupTable, resolve_groups
from .names import canonical_name
from .norms import SlotLayout, local_partials
from .policies import PolicySet, SpikeDetector, build_policies, build_spike_detector
from .reduce import ConfigMismatchError, check_consistency, exchange_bytes, reduce_slots, share_setup_failure
from .report import ClipReport, clipped_mask
from .sinks import MetricsLog
from .unitwise import SlotsWithUnits, UnitPlan, unitwise_specs

STATE_VERSION = 2

__all__ = ["GradClipper", "ClipReport", "NonFiniteGradientError"]


class GradClipper:
    """Exact global-norm gradient clipping, uniform or per layer group, for any supported layout.

    Args:
        model: a module (plain or DDP-wrapped), or parameters / named parameters.
        config: a :class:`ClipConfig`, a dict, a YAML path, or None for ``$DISTCLIP_CONFIG`` (else defaults).
        ddp_comm_hook: for DDP, a comm hook (e.g. ``default_hooks.fp16_compress_hook``) that distclip
            wraps instead of the plain all-reduce; ``ddp_comm_hook_state`` is its state (default:
            DDP's process group).
        params: clip only these parameters of ``model`` (tensors, or canonical names): only they are
            counted in the norms and scaled; the model's other gradients are left alone. The norm is
            still exact under sharding (the model's layout decides what each rank counts), e.g. for
            ``accelerator.clip_grad_norm_`` on a subset of an FSDP model. Frozen tensors are ignored.
        pipeline_group: for pipeline parallelism, the pipeline process group (or 1-D DeviceMesh, e.g.
            torchtitan's ``pp_mesh``); ``model`` is then this rank's stage: a module (plain, DDP,
            FSDP1, FSDP2), a ``torch.distributed.pipelining`` PipelineStage, or a list of them (virtual
            stages). The norm is summed over every stage in the same single collective.
        tied: with ``pipeline_group``, weights tied across stages, e.g. ``[("embed.weight", "head.weight")]``
            (kept in sync by you): the first name is counted once, the others are scaled alike.
        **overrides: config settings that take precedence, e.g. ``max_norm=0.5``.

    At construction every rank checks (one all-gather of one number) that all ranks have the same
    config and group layout, and raises :class:`~distclip.ConfigMismatchError` otherwise.

    Observability: every report carries the running per-group clip counts (kept on the device);
    the config's ``log`` section and :meth:`add_sink` write :meth:`ClipReport.to_metrics` from one
    rank every N clips; ``audit`` checks every N clips that all ranks applied the same coefficients.
    """

    def __init__(
        self,
        model: Any,
        config: ClipConfig | Mapping[str, Any] | str | os.PathLike | None = None,
        *,
        ddp_comm_hook: Callable | None = None,
        ddp_comm_hook_state: Any = None,
        params: Iterable[torch.Tensor | str] | str | None = None,
        pipeline_group: Any = None,
        tied: Iterable[Iterable[str]] | None = None,
        **overrides: Any,
    ):
        self.adapter: GradAdapter = adapter_for(model, pipeline_group=pipeline_group, tied=tied)  # needs no config
        self._pipeline = isinstance(self.adapter, PipelineAdapter)
        self._setup_problems: list[str] = list(self.adapter.setup_problems)  # raised on every rank after the check
        names = self._names_of_every_stage()  # a collective under pipeline parallelism: before anything can fail
        try:
            self._set_up(config, overrides, params, names)
        except Exception as err:
            # A failure on some ranks only (one rank read another YAML): take part in the set-up exchange
            # with it, so that the other ranks raise too instead of waiting in that collective.
            share_setup_failure(self.adapter.reduce_group, err)
            raise
        _compat.track_amp_unscaling()  # GradScaler's unscaling becomes visible (hooks, overflow detection)
        self._check_consistency()
        self.adapter.verify_layout()
        if self.config.comm_hook and self._excluded is None:
            self.adapter.enable_reduction_hook(ddp_comm_hook, ddp_comm_hook_state)

    def _set_up(self, config: Any, overrides: dict[str, Any], params: Iterable[torch.Tensor | str] | str | None,
                names: list[str]) -> None:
        """Everything rank-local: config, groups, slot layout, policies, logging (raises before any collective)."""
        self.config = load_config(config, **overrides)
        if not self.config.check_consistency:
            warnings.warn(
                "distclip: check_consistency: false no longer skips the set-up check (ranks with different values "
                "of it hung); the check costs one all-gather of one number at construction. Drop the key.",
                FutureWarning, stacklevel=3)
        _refuse_meta_parameters(self.adapter)
        if not self.adapter.has_names and (self.config.groups or self.config.per_layer or self.config.per_parameter):
            raise ConfigError(
                "per-group clipping needs parameter names, but bare parameters were given: pass the "
                "model itself or model.named_parameters()"
            )
        self.table: GroupTable = resolve_groups(self.config, names)
        if self._pipeline:
            try:
                self.table = self.table.tied(self.adapter.copies())
            except ConfigError as err:  # raised after the set-up exchange, on every rank (see _check_consistency)
                self._setup_problems.append(str(err))
        self._excluded: int | None = None  # index of the hidden group of parameters outside ``params``
        if params is not None:
            self.table = self.table.restricted_to(self._names_of(params), self.config.norm_type)
            self._excluded = len(self.table.groups) - 1
        self.layout = SlotLayout.build(self.table.groups, self.config.norm_type)
        self.adapter.bind(self.table, self.layout)
        self.policy: PolicySet = build_policies(self.config, self.table.groups)
        self.spikes: SpikeDetector | None = build_spike_detector(self.config)
        self.group_names = self.table.names[: self._excluded]  # the hidden group is last: never reported
        self._visible = list(range(len(self.group_names)))
        self._derived: frozenset[int] = frozenset()  # unit-wise groups whose slots come from their units' sums
        self.units: UnitPlan | None = self._bind_units()
        unitwise = set(self.units.groups) if self.units is not None else set()
        self._group_scaled = [g for g in self._visible if g not in unitwise]  # scaled by a group coefficient
        self.steps = 0
        self.last_report: ClipReport | None = None
        self.counters = ClipCounters(len(self.group_names), streaks=self.config.audit is not None)
        self.log = MetricsLog.from_config(self.config.log, self.adapter.reduce_group, info=self._log_info)
        self.audit: ClipAudit | None = None
        if self.config.audit is not None:
            self.audit = ClipAudit(self.config.audit, self.group_names, self.layout, self.adapter.reduce_group,
                                   measurable=self.adapter.applies_in_place)

    # ------------------------------------------------------------------ public
    def clip(self) -> ClipReport:
        """Measure the exact global (and per-group) norms and clip the gradients in place."""
        return self._run(apply=True)

    def measure(self) -> ClipReport:
        """The exact norms without touching the gradients (also one collective)."""
        return self._run(apply=False)

    def attach(self, optimizer: torch.optim.Optimizer, fold: bool | None = None) -> Attachment:
        """Clip right before every ``optimizer.step()`` (also under GradScaler and LR schedulers).

        A skipped step (non-finite norm, ``nonfinite: skip``) drops the gradients first, so the
        step leaves parameters and optimizer state untouched. The report is in ``last_report``.
        ``fold``: apply a uniform clip through a fused optimizer's ``grad_scale`` instead of a
        separate pass over the gradients (None: whenever possible). ``.remove()`` detaches.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UsageError(
                f"GradClipper.attach expects a torch.optim.Optimizer (e.g. torch.optim.AdamW(model.parameters())), "
                f"got {type(optimizer).__module__}.{type(optimizer).__qualname__}"
            )
        if not _compat.runs_step_hooks(optimizer):
            raise UsageError(
                f"GradClipper.attach: this {type(optimizer).__module__}.{type(optimizer).__qualname__} did not run "
                "torch.optim.Optimizer.__init__, so its step() runs no step hooks and the clip would never happen "
                "(e.g. torchft's OptimizerWrapper). Attach to the optimizer it wraps (for torchft: "
                "distclip.integrations.torchft.attach(clipper, optimizer), which clips after should_commit)"
            )
        return Attachment(self, optimizer, fold)

    def add_sink(self, sink: Any, every: int | None = None, rank: int | None = 0) -> Any:
        """Write every ``every`` clips' :meth:`ClipReport.to_metrics` to ``sink`` (``write(metrics, step)`` /
        ``close()``, e.g. :class:`~distclip.JSONLSink`), from rank ``rank`` of the reduce group (None: every
        rank). ``every`` defaults to the config's ``log.every`` (else 1). Returns the sink."""
        return self.log.add(sink, every=every, rank=rank)

    def close(self) -> None:
        """Close the sinks (flushes TensorBoard); also done at interpreter exit."""
        self.log.close()

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs to continue with the same coefficients (policy state by group name)
        and the same running clip rates."""
        state = {"version": STATE_VERSION, "groups": list(self.group_names), "steps": self.steps,
                 "policy": self.policy.state_dict(), "counts": self.counters.state_dict()}
        if self.spikes is not None:
            state["skip_spikes"] = self.spikes.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a state of another version, group layout or policy is a :class:`StateDictError`."""
        if not isinstance(state, Mapping):
            raise StateDictError(f"distclip state must be the mapping GradClipper.state_dict() returned, got {type(state).__name__}")
        unknown = set(state) - {"version", "groups", "steps", "policy", "skip_spikes", "counts"}
        if unknown:
            raise StateDictError(f"distclip state has unknown keys {sorted(unknown)}: it is not a GradClipper.state_dict()")
        version = state.get("version")
        if version not in (1, STATE_VERSION):
            raise StateDictError(
                f"distclip state has version {version!r}; this distclip reads versions 1 and {STATE_VERSION}. "
                "Save it again with this version of distclip"
            )
        if list(state.get("groups", [])) != self.group_names:
            raise StateDictError(
                f"distclip state has groups {state.get('groups')} but this clipper has {self.group_names}: "
                "load it into a clipper built with the same config and model"
            )
        steps = state.get("steps", 0)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise StateDictError(f"distclip state has steps={steps!r}; expected a non-negative int")
        policy = state.get("policy", {})
        if not isinstance(policy, Mapping):
            raise StateDictError(f"distclip state's 'policy' must be a mapping, got {type(policy).__name__}")
        if version >= 2 or policy:
            kind = policy.get("kind")
            if kind != self.policy.kind:
                raise StateDictError(
                    f"distclip state holds the state of policy {kind!r}, but this clipper's policy is "
                    f"{self.policy.kind!r}: load it into a clipper built with the same config"
                )
        if (self.spikes is None) != ("skip_spikes" not in state):
            raise StateDictError(
                "distclip state and this clipper disagree on skip_spikes (one has it, the other not): load it into "
                "a clipper built with the same config")
        try:  # all checks pass before anything is loaded
            if self.spikes is not None:
                self.spikes._checked(state["skip_spikes"])
            counters = ClipCounters(len(self.group_names), streaks=self.counters.track_streaks)
            if "counts" in state:  # states saved before the counts existed start them afresh
                counters.load_state_dict(state["counts"])
            self.policy.load_state_dict(dict(policy))
        except StateDictError:
            raise
        except ConfigError as err:  # a policy's own check (another kind, shape, group layout): the same error type
            raise StateDictError(str(err)) from err
        if self.spikes is not None:
            self.spikes.load_state_dict(state["skip_spikes"])
        self.steps, self.counters = steps, counters

    @property
    def clips_subset(self) -> bool:
        """Whether only some of the model's parameters are clipped (``params=``)."""
        return self._excluded is not None

    def fingerprint(self) -> str:
        """Equal on every rank iff all clip the same way (under pipeline parallelism: the same slot layout)."""
        layout = self.table.groups_fingerprint() if self._pipeline else self.table.fingerprint()
        units = self.units.fingerprint() if self.units is not None else ""
        return (f"{self.config.fingerprint()}-{layout}-{units}-{sorted(self.adapter.describe().items())}"
                f"-{self._setup_problems}")

    # ---------------------------------------------------------------- internals
    def _check_consistency(self) -> None:
        """The set-up check; ranks whose parameters differ without ``pipeline_group`` are told about it.

        Problems found before it (``_setup_problems``: a tied name no stage has, stages that do not tile
        the world) are part of the fingerprint, so ranks that see different ones get a mismatch error and
        ranks that all see the same get it raised here: every rank raises, none waits in a collective."""
        try:
            check_consistency(self.adapter.reduce_group, self.fingerprint(), self._summary(), *self._stage_fingerprint())
        except ConfigMismatchError as err:
            if self._pipeline or "group_layout:" not in str(err):  # the same text on every rank
                raise
            raise ConfigMismatchError(
                f"{err}\nIf these ranks hold different pipeline stages of one model, pass the pipeline process group: "
                "GradClipper(stage, config, pipeline_group=pp_group) (a ProcessGroup or a 1-D DeviceMesh such as "
                "mesh['pp']), so that the norm is summed over the stages.") from None
        if self._setup_problems:
            raise ConfigError(self._setup_problems[0])

    def _bind_units(self) -> UnitPlan | None:
        """The unit layout of the groups clipped unit-wise (``kind: agc``), mapped onto this rank's pieces."""
        specs = unitwise_specs(self.config, self.table.groups)
        if not specs:
            return None
        if self._pipeline:
            raise ConfigError(
                "distclip: policy kind 'agc' (unit-wise clipping) is not supported with pipeline parallelism yet; "
                "use another policy for the pipelined model")
        plan = UnitPlan.build(self.adapter.names, self.adapter.global_shapes(), self.adapter.group_of, specs,
                              len(self.table.groups))
        self.adapter.bind_units(plan)
        self._slots = SlotsWithUnits(self.layout, plan)
        # A unit-wise group whose p is the config's has one slot, the sum of its units' gradient sums.
        self._derived = frozenset(g for g in specs if self.table.groups[g].norm_type == self.config.norm_type)
        return plan

    def _stage_fingerprint(self) -> tuple[int, str]:
        """(stage key, what must be equal among the ranks holding the same pipeline stage(s))."""
        if not self._pipeline:
            return 0, ""
        return self.adapter.stage_key(), f"{self.table.fingerprint(self.adapter.names)}-{self.adapter.describe_stage()}"

    def _names_of_every_stage(self) -> list[str]:
        """The parameter names the group table is built from: every stage's under pipeline parallelism
        (exchanged once over the pipeline group, in stage order: per-layer groups follow the model), else
        this model's."""
        if not self._pipeline:
            return self.adapter.names
        payloads = exchange_bytes(self.adapter.pipeline_group, json.dumps(self.adapter.names_by_stage()).encode())
        stages = sorted((index, rank, names) for rank, payload in enumerate(payloads)
                        for index, names in json.loads(payload))
        return list(dict.fromkeys(n for _, _, names in stages for n in names))

    def _summary(self) -> dict[str, Any]:
        """What the set-up error compares, key by key (under pipeline parallelism the group layout that all
        ranks share, and each stage's own layout apart)."""
        stage = {"stage_layout": self._stage_fingerprint()[1]} if self._pipeline else {}
        layout = self.table.groups_fingerprint() if self._pipeline else self.table.fingerprint()
        units = {"unit_layout": self.units.fingerprint()} if self.units is not None else {}
        problems = {"setup_problems": self._setup_problems} if self._setup_problems else {}
        return {**self.config.to_dict(), "group_order": self.group_names,
                "group_layout": layout, **self.adapter.describe(), **stage, **units, **problems}

    def _names_of(self, params: Iterable[torch.Tensor | str] | str) -> list[str]:
        """Canonical names of the parameters to clip (identity lookup among the adapter's parameters)."""
        if isinstance(params, (str, torch.Tensor)):
            params = [params]  # one name or one tensor, not its characters or rows
        name_of = self.adapter.tensor_names()
        names, unknown = [], 0
        for p in params:
            if isinstance(p, str):
                names.append(canonical_name(p))
            elif id(p) in name_of:
                names.append(name_of[id(p)])
            elif isinstance(p, torch.Tensor) and p.requires_grad:
                unknown += 1
            elif not isinstance(p, torch.Tensor):
                raise UsageError(f"params must hold parameter tensors or their names, got a {type(p).__name__}: {p!r}")
        if unknown:
            raise ConfigError(
                f"distclip: {unknown} of the parameters to clip are not parameters of the model "
                f"({self.adapter.kind} layout with {len(self.adapter.names)} trainable parameters); pass "
                "parameters of the model the clipper was built for, or their canonical names"
            )
        return names

    def _local_partials(self, pending_scale: torch.Tensor | None) -> tuple[torch.Tensor, str]:
        partials, source = self.adapter.local_partials(self._derived)
        if self._excluded is not None:  # the hidden group is excluded from every norm
            keep = [float(g != self._excluded) for g, _ in self.layout.slots]
            partials = partials * self.layout.constant("visible", partials.device, keep, partials.dtype)
        scale = self.adapter.grad_scale()  # a loss scale the counted pieces still carry
        if pending_scale is not None:
            scale = pending_scale * scale
        if not (isinstance(scale, float) and scale == 1.0):
            partials = self.layout.unscale(partials, scale)
        return partials, source

    def _reduce(self, pending_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, str]:
        """(reduced group slots, reduced unit slots or None, source): ONE collective for both."""
        partials, source = self._local_partials(pending_scale)
        group = self.adapter.reduce_group
        if self.units is None:
            return reduce_slots(partials, self.layout, group), None, source
        units = self.adapter.unit_partials().to(partials.device)
        scale = self.adapter.grad_scale()  # the gradient half carries the loss scale, the parameter half none
        if pending_scale is not None:
            scale = pending_scale * scale
        if not (isinstance(scale, float) and scale == 1.0):
            units = self.units.unscale(units, scale)
        if source == "post_backward" and self._derived:  # these groups were left out of the partials
            partials = self.units.add_group_sums(partials, units, self._derived, self.config.norm_type)
        reduced = reduce_slots(torch.cat([partials, units]), self._slots, group)
        slots, unit_slots = reduced.split([self.layout.num_slots, 2 * self.units.num_units])
        return slots, unit_slots, source

    def _scale(self, coefs: torch.Tensor, unit_coefs: torch.Tensor | None, groups: list[int],
               host_coefs: list[float] | None = None) -> None:
        """Multiply the group-scaled ``groups`` by their coefficients, and the unit-wise ones by their units'."""
        if groups:
            self.adapter.scale(coefs, groups, host_coefs)
        if unit_coefs is not None:
            self.adapter.scale_units(unit_coefs)

    def _applied_partials(self) -> torch.Tensor:
        """For the audit: this rank's slot partials over EVERY local gradient piece APPLY scales (replicas too,
        not only the counted ones), before or after APPLY. Only their ratio is used: no unscaling needed."""
        per_group = self.adapter.scaled_grads()
        tensors = [t for g in per_group for t in g]
        groups = [i for i, g in enumerate(per_group) for _ in g]
        return local_partials(tensors, groups, self.layout, self.adapter.collective_device(tensors))

    def _log_info(self) -> dict[str, Any]:
        """What a sink's ``start`` gets: the config and the groups (``distclip suggest`` rebuilds the config from it)."""
        members: dict[str, list[str]] = {}
        for name, g in self.table.index_of.items():
            members.setdefault(self.table.groups[g].name, []).append(name)
        groups = [{"name": g.name, "origin": g.origin, "max_norm": g.max_norm, "norm_type": g.norm_type,
                   **({"params": members.get(g.name, [])} if g.origin in ("per_layer", "per_parameter") else {})}
                  for g in self.table.groups[: len(self.group_names)]]
        return {"config": self.config.to_dict(), "groups": groups}

    @torch.no_grad()
    def _run(
        self,
        apply: bool,
        pending_scale: torch.Tensor | None = None,
        fold: Callable[[torch.Tensor], None] | None = None,
    ) -> ClipReport:
        """One clip. ``pending_scale``: a loss scale the gradients still carry (divided out of the norms;
        set by GradScaler for fused optimizers). ``fold``: applies the (uniform) coefficients instead of
        multiplying the gradients."""
        audit = self.audit if apply and self.audit is not None and self.audit.due(self.steps + 1) else None
        before = self._applied_partials() if audit is not None and audit.measurable else None
        reduced, reduced_units, source = self._reduce(pending_scale)
        group_norms = self.layout.group_norms(reduced)
        total_norm = self.layout.total_norm(reduced)
        thresholds, coefs = self.policy.coefficients(group_norms, total_norm)
        unit_coefs = None
        finite = torch.isfinite(reduced).all()  # the unit gradient sums hold the same elements as the group slots
        if self.units is not None:  # unit-wise groups report their smallest unit coefficient
            unit_coefs = self.units.coefficients(reduced_units)
            coefs = torch.where(self.units.group_mask(coefs.device), self.units.group_minima(unit_coefs), coefs)
            unit_coefs = unit_coefs.float()
        coefs = coefs.float()  # fp32 values (exact): what multiplies the gradients, as in torch
        spike = self.spikes.skip(group_norms, total_norm) if self.spikes is not None else None
        skipped, reason = False, None
        applied = Applied("none")
        if apply:
            accepted = finite if spike is None else finite & ~spike  # what the policies may learn from
            if self.config.nonfinite == "ignore" and spike is None:  # no host sync at all: always multiply, as torch
                if fold is not None:
                    fold(coefs)
                    applied = Applied("fold", tuple(self._visible))
                else:
                    self._scale(coefs, unit_coefs, self._group_scaled)
                    applied = Applied("scale", tuple(self._group_scaled))
            else:
                # The one host sync: the non-finite and spike decisions, and which groups are clipped at
                # all (multiplying by exactly 1.0 changes nothing, so unclipped groups are not touched).
                flags = [finite.float().reshape(1), (spike if spike is not None else ~finite).float().reshape(1)]
                finite_flag, spike_flag, *host_coefs = torch.cat([*flags, coefs]).tolist()
                if finite_flag and spike_flag:  # a spike: skip the step, like a non-finite one
                    self.adapter.drop_grads()
                    skipped, reason = True, "spike"
                    applied = Applied("drop")
                elif finite_flag:
                    clipped = [g for g in self._group_scaled if host_coefs[g] < 1.0]
                    units_clipped = self.units is not None and any(host_coefs[g] < 1.0 for g in self.units.groups)
                    if clipped and fold is not None:
                        fold(coefs)
                        applied = Applied("fold", tuple(self._visible))
                    elif clipped or units_clipped:
                        self._scale(coefs, unit_coefs if units_clipped else None, clipped, host_coefs)
                        applied = Applied("scale", tuple(clipped))
                elif self.config.nonfinite == "ignore":  # torch semantics, also with skip_spikes on
                    self._scale(coefs, unit_coefs, self._group_scaled)
                    applied = Applied("scale", tuple(self._group_scaled))
                else:
                    skipped, reason = self._handle_nonfinite(reduced, scaler_managed=pending_scale is not None)
                    applied = Applied({"overflow": "leave", "nonfinite": "drop"}.get(reason, "zero"),
                                      () if skipped else tuple(self._visible))
                if skipped or (not finite_flag and self.config.nonfinite == "zero"):
                    coefs = torch.zeros_like(coefs)
                    unit_coefs = None if unit_coefs is None else torch.zeros_like(unit_coefs)
            self.policy.update(group_norms, total_norm, coefs, accepted)
            if self.spikes is not None:
                self.spikes.update(group_norms, total_norm, coefs, accepted)
            self.steps += 1
        visible = len(self.group_names)
        report = ClipReport(
            total_norm=total_norm.float(),
            group_norms=dict(zip(self.group_names, group_norms.float())),
            coefs=dict(zip(self.group_names, coefs)),
            thresholds=dict(zip(self.group_names, thresholds.float())),
            skipped=skipped,
            finite=finite,
            source=source,
            skip_reason=reason,
            unit_coefs=unit_coefs,
        )
        if apply:  # running counts on the device: no host sync
            self.counters.update(clipped_mask(coefs[:visible], finite, skipped))
        report.clip_counts, report.clip_steps = self.counters.current(coefs.device), self.counters.steps
        self.last_report = report
        if apply:
            self.log.observe(report, self.steps)  # reads the device only when a sink is due, on the rank that writes
        if audit is not None:
            after = self._applied_partials() if audit.measures(applied) else None
            audited = coefs[:visible]
            if self.units is not None:  # unit-wise groups: no single factor to measure (their units agree by construction)
                audited = torch.where(self.units.group_mask(coefs.device)[:visible], math.nan, audited)
            audit.check(self.steps, applied, audited, thresholds[:visible], before if after is not None else None,
                        after, self.counters.streaks)
        return report

    def _handle_nonfinite(self, reduced: torch.Tensor, scaler_managed: bool) -> tuple[bool, str | None]:
        """Same decision on every rank (it is taken on the reduced vector). Returns (skipped, reason).

        A non-finite norm of gradients a GradScaler still carries (or has just unscaled) is a
        loss-scale overflow: GradScaler skips that step and backs off by itself, so distclip leaves
        the gradients alone and raises nothing, whatever ``nonfinite`` says.
        """
        if scaler_managed or self.adapter.loss_scaled() or _compat.unscaled_by_grad_scaler(
                g for g in self.adapter.local_grads() if g is not None):
            return True, "overflow"
        mode = self.config.nonfinite
        if mode == "error":
            norms = self.layout.group_norms(reduced).tolist()
            bad = {n: v for n, v in zip(self.group_names, norms) if not math.isfinite(v)}
            p = self.config.norm_type
            raise NonFiniteGradientError(
                f"The total norm of order {p} for gradients from `parameters` is non-finite, so it cannot be "
                f"clipped. distclip: non-finite group norm(s) {bad} with nonfinite='error' (the same on every "
                "rank). To drop such steps use nonfinite='skip'; to scale the gradients by the non-finite norm "
                "anyway, as torch does with `error_if_nonfinite=False`, use nonfinite='ignore'."
            )
        if mode == "zero":
            self.adapter.zero(self._visible)
            return False, None
        self.adapter.drop_grads()
        return True, "nonfinite"


def _refuse_meta_parameters(adapter: GradAdapter) -> None:
    meta = [n for n, p in zip(adapter.names, adapter.params) if p.device.type == "meta"]
    if meta:
        raise UsageError(
            f"distclip: {len(meta)} parameters are on the meta device (e.g. {meta[:3]}): they hold no values or "
            "gradients yet. Materialise the model first (e.g. model.to_empty(device=...) and initialise it), "
            "then build the clipper"
        )

