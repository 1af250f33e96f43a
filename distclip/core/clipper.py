"""The clip, as four stages over any adapter: MEASURE, DECIDE, APPLY, RECORD.

    measure  (adapter partials, the one collective)             -> Measurement   (core/measure.py)
    decide   (norms, policy, skip, which groups are multiplied)  -> Decision      (core/decide.py)
    apply    (scale, fold, zero, drop, through the adapter)      -> Applied       (core/apply.py)
    record   (report, counters, sinks, audit)                    -> ClipReport    (core/record.py)

:class:`Clipper` sets these up once (config, group table, slot layout, policies, the set-up check
every rank takes part in) and runs them per clip. It works with any object that follows the
adapter contract (:mod:`distclip.core.contract`); the public :class:`distclip.GradClipper` is a
Clipper whose adapter is picked from the model the user passes.

Groups with ``policy: {kind: agc}`` are clipped row-wise (:mod:`distclip.core.rowwise`): their
per-row sums of gradients and parameters ride in the same collective, after the group slots.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Callable, Iterable, Mapping

import torch

from ..compat import pytorch as _compat
from ..errors import ConfigError, ConfigMismatchError, StateDictError, UsageError
from .apply import Fold, apply
from .attach import Attachment, fused_optimizer_blocker
from .attribution import Attributor
from .audit import ClipAudit
from .badsteps import stop_error
from .config import ClipConfig, load_config
from .contract import GradAdapter
from .counters import BadStepStreaks, ClipCounters
from .decide import Rules, decide
from .groups import GroupTable, resolve_groups
from .hook_choice import HookChoice, choose_hook
from .measure import SlotPlan, measure
from .names import canonical_name
from .norms import SlotLayout
from .policies import PolicySet, SpikeDetector, build_policies, build_spike_detector
from .record import Recorder
from .reduce import check_consistency, exchange_bytes, share_setup_failure
from .report import ClipReport
from .rowwise import bind_rows
from .sinks import MetricsLog

STATE_VERSION = 3  # 3: the bad-step streaks; versions 1 and 2 still load (streaks start at 0)

__all__ = ["Clipper", "ClipReport"]


class Clipper:
    """Exact global-norm gradient clipping, uniform or per layer group, over one adapter.

    Users build a :class:`distclip.GradClipper` (which picks the adapter); a framework integration
    with an adapter of its own may build a Clipper directly.

    Args:
        adapter: the gradient layout (:class:`~distclip.core.contract.GradAdapter`).
        config, ddp_comm_hook, ddp_comm_hook_state, params, overrides: as for :class:`distclip.GradClipper`.
    """

    def __init__(
        self,
        adapter: GradAdapter,
        config: ClipConfig | Mapping[str, Any] | str | os.PathLike | None = None,
        *,
        ddp_comm_hook: Callable | None = None,
        ddp_comm_hook_state: Any = None,
        params: Iterable[torch.Tensor | str] | str | None = None,
        **overrides: Any,
    ):
        self.adapter = adapter
        self._pipeline = adapter.pipeline_group is not None
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
        self._check_consistency()  # the hook choice is part of it: every rank takes the same path
        self.adapter.verify_layout()
        self._set_up_hook(ddp_comm_hook, ddp_comm_hook_state)

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
        # row-wise (agc) groups: their rows, and the groups whose slot is the sum of their rows' sums
        self.rows, with_rows, self._derived = bind_rows(self.config, self.table, self.layout, self.adapter)
        rowwise = set(self.rows.groups) if self.rows is not None else set()
        self._group_scaled = [g for g in self._visible if g not in rowwise]  # scaled by a group coefficient
        self.steps = 0
        self.last_report: ClipReport | None = None
        self.counters = ClipCounters(len(self.group_names), streaks=self.config.audit is not None)
        self.log = MetricsLog.from_config(self.config.log, self.adapter.reduce_group, info=self.log_info)
        self.audit: ClipAudit | None = None
        if self.config.audit is not None:
            self.audit = ClipAudit(self.config.audit, self.group_names, self.layout, self.adapter.reduce_group,
                                   measurable=self.adapter.applies_in_place)
        self._plan = SlotPlan(self.layout, self.config.norm_type, self._excluded, self.rows, with_rows, self._derived)
        measured_only = tuple(not g.clipped for g in self.table.groups)
        self._group_scaled = [g for g in self._group_scaled if not measured_only[g]]  # never multiplied
        self._rules = Rules(self.config.nonfinite_action, self.config.norm_type, tuple(self.group_names),
                            tuple(self._group_scaled), measured_only=measured_only if any(measured_only) else ())
        spike_limit = self.config.skip_spikes.max_consecutive if self.config.skip_spikes is not None else None
        self.streaks = BadStepStreaks(self.config.nonfinite_limit, spike_limit)
        self._attribute = Attributor(self.adapter, names)
        self._recorder = Recorder(self.adapter, self.layout, self.group_names, self.rows, self.counters, self.log,
                                  self.audit)
        self.hook_choice: HookChoice = (
            choose_hook(self.config.comm_hook, self.adapter.reduction_venue()) if self._excluded is None
            else HookChoice(False, "post-backward: only a subset of the parameters is clipped (params=)"))

    def _set_up_hook(self, inner: Callable | None, inner_state: Any) -> None:
        """Measure inside the gradient reduction, or after backward, as ``hook_choice`` says (the adapter's
        ``hook_status`` records which and why)."""
        choice = self.hook_choice
        if not choice.enable:
            self.adapter.decline_reduction_hook(choice.reason, inner, inner_state)
        elif self.adapter.enable_reduction_hook(inner, inner_state) and choice.auto:
            self.adapter.hook_status = f"{self.adapter.hook_status} ({choice.reason})"

    # ------------------------------------------------------------------ public
    @_compat.outside_compile  # one graph break inside a compiled region, never a traced clip
    @torch.no_grad()
    def clip(self, *, pending_scale: torch.Tensor | None = None, fold: Fold | None = None) -> ClipReport:
        """Measure the exact global (and per-group) norms and clip the gradients in place: the four stages.

        Args:
            pending_scale: a loss scale the gradients still carry (GradScaler leaves it in place for fused
                optimizers, which divide it out in their step): divided out of the norms, so the thresholds
                apply to the true gradients.
            fold: applies the uniform coefficients instead of multiplying the gradients, e.g. through a
                fused optimizer's ``grad_scale`` (what :meth:`attach` does); used when this clip scales
                all groups alike.
        """
        step = self.steps + 1
        audit, before = self._recorder.audit_before(step)
        measured = measure(self.adapter, self._plan, pending_scale)
        rules = self._rules if fold is None else dataclasses.replace(self._rules, can_fold=True)
        decision = decide(measured, self._plan, rules, self.policy, self.spikes, apply=True,
                          scaler_overflow=lambda: self._scaler_overflow(pending_scale), streaks=self.streaks)
        # a non-finite step only (the flag is already on the host, the same on every rank): one more collective
        attribution = self._attribute() if decision.nonfinite_seen else None
        applied = apply(decision, self.adapter, fold)
        self.steps = step
        report = self.last_report = self._recorder.report(measured, decision, applied, attribution)
        self._recorder.publish(report, decision, applied, step, audit, before)
        if decision.stop is not None:  # on every rank at this clip, after the step was recorded
            limits = (self.streaks.nonfinite_limit, self.streaks.spike_limit)
            raise stop_error(decision, self.group_names, self.config.norm_type, limits, attribution, step)
        return report

    @_compat.outside_compile
    @torch.no_grad()
    def measure(self) -> ClipReport:
        """The exact norms without touching the gradients (also one collective)."""
        measured = measure(self.adapter, self._plan)
        decision = decide(measured, self._plan, self._rules, self.policy, self.spikes, apply=False,
                          scaler_overflow=lambda: False)
        decision = dataclasses.replace(decision, streaks=(self.streaks.nonfinite, self.streaks.spike))  # as they stand
        report = self.last_report = self._recorder.report(measured, decision, None)
        return report

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
        return Attachment(lambda **kw: self.clip(**kw), optimizer, self._fold_blocker(optimizer), fold)

    def _fold_blocker(self, optimizer: torch.optim.Optimizer) -> str | None:
        """Why the coefficient cannot be folded into this optimizer (None when it can)."""
        blocker = fused_optimizer_blocker(optimizer)
        if blocker is not None:
            return blocker
        if self.clips_subset:
            return "only a subset of the parameters is clipped, a fused optimizer's grad_scale would scale them all"
        if self.rows is not None:
            return ("row-wise clipping (policy kind 'agc') has one coefficient per row, a fused optimizer takes one "
                    "grad_scale")
        if len(self.group_names) != 1:
            return "per-group clipping needs one coefficient per group, a fused optimizer takes one grad_scale"
        if not self.adapter.foldable:
            return f"the {self.adapter.kind} layout does not keep gradients in the optimizer's parameters"
        clipped = {id(p) for p in self.adapter.params}
        if any(id(p) not in clipped for group in optimizer.param_groups for p in group["params"]):
            return "the optimizer holds parameters this clipper does not clip"
        return None

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
                 "policy": self.policy.state_dict(), "counts": self.counters.state_dict(),
                 "streaks": self.streaks.state_dict()}
        if self.spikes is not None:
            state["skip_spikes"] = self.spikes.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a state of another version, group layout or policy is a
        :class:`StateDictError`."""
        if not isinstance(state, Mapping):
            raise StateDictError(
                f"distclip state must be the mapping GradClipper.state_dict() returned, got {type(state).__name__}")
        unknown = set(state) - {"version", "groups", "steps", "policy", "skip_spikes", "counts", "streaks"}
        if unknown:
            raise StateDictError(
                f"distclip state has unknown keys {sorted(unknown)}: it is not a GradClipper.state_dict()")
        version = state.get("version")
        if version not in (1, 2, STATE_VERSION):
            raise StateDictError(
                f"distclip state has version {version!r}; this distclip reads versions 1 to {STATE_VERSION}. "
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
            streaks = BadStepStreaks(self.streaks.nonfinite_limit, self.streaks.spike_limit)
            if "streaks" in state:  # versions 1 and 2 have none: the streaks start at 0
                streaks.load_state_dict(state["streaks"])
            self.policy.load_state_dict(dict(policy))
        except StateDictError:
            raise
        except ConfigError as err:  # a policy's own check (another kind, shape, group layout): the same error type
            raise StateDictError(str(err)) from err
        if self.spikes is not None:
            self.spikes.load_state_dict(state["skip_spikes"])
        self.steps, self.counters, self.streaks = steps, counters, streaks
        self._recorder.counters = counters

    @property
    def clips_subset(self) -> bool:
        """Whether only some of the model's parameters are clipped (``params=``)."""
        return self._excluded is not None

    def fingerprint(self) -> str:
        """Equal on every rank iff all clip the same way (under pipeline parallelism: the same slot layout)."""
        layout = self.table.groups_fingerprint() if self._pipeline else self.table.fingerprint()
        rows = self.rows.fingerprint() if self.rows is not None else ""
        return (f"{self.config.fingerprint()}-{layout}-{rows}-{sorted(self.adapter.describe().items())}"
                f"-{self.hook_choice.enable}-{self._setup_problems}")

    # ---------------------------------------------------------------- internals
    def _check_consistency(self) -> None:
        """The set-up check; ranks whose parameters differ without ``pipeline_group`` are told about it.

        Problems found before it (``_setup_problems``: a tied name no stage has, stages that do not tile
        the world) are part of the fingerprint, so ranks that see different ones get a mismatch error and
        ranks that all see the same get it raised here: every rank raises, none waits in a collective."""
        try:
            check_consistency(self.adapter.reduce_group, self.fingerprint(), self._summary(),
                              *self._stage_fingerprint())
        except ConfigMismatchError as err:
            if self._pipeline or "group_layout:" not in str(err):  # the same text on every rank
                raise
            raise ConfigMismatchError(
                f"{err}\nIf these ranks hold different pipeline stages of one model, pass the pipeline process group: "
                "GradClipper(stage, config, pipeline_group=pp_group) (a ProcessGroup or a 1-D DeviceMesh such as "
                "mesh['pp']), so that the norm is summed over the stages.") from None
        if self._setup_problems:
            raise ConfigError(self._setup_problems[0])

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
        rows = {"row_layout": self.rows.fingerprint()} if self.rows is not None else {}
        problems = {"setup_problems": self._setup_problems} if self._setup_problems else {}
        return {**self.config.to_dict(), "group_order": self.group_names, "group_layout": layout,
                "measured_in_reduction": self.hook_choice.enable, **self.adapter.describe(), **stage, **rows,
                **problems}

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

    def log_info(self) -> dict[str, Any]:
        """What a sink's ``start`` gets: the config and the groups (``distclip suggest`` rebuilds the config
        from it)."""
        members: dict[str, list[str]] = {}
        for name, g in self.table.index_of.items():
            members.setdefault(self.table.groups[g].name, []).append(name)
        groups = [{"name": g.name, "origin": g.origin, "max_norm": g.max_norm if g.clipped else None,
                   "norm_type": g.norm_type, **({} if g.in_total else {"in_total": False}),
                   **({"params": members.get(g.name, [])} if g.origin in ("per_layer", "per_parameter") else {})}
                  for g in self.table.groups[: len(self.group_names)]]
        return {"config": self.config.to_dict(), "groups": groups}

    def _scaler_overflow(self, pending_scale: torch.Tensor | None) -> bool:
        """Whether a non-finite norm is a loss-scale overflow: of gradients a GradScaler still carries (or has
        just unscaled), or a DeepSpeed fp16 loss scale. The loss scaler skips that step and backs off by itself,
        so distclip leaves the gradients alone and raises nothing, whatever ``nonfinite`` says."""
        return pending_scale is not None or self.adapter.loss_scaled() or _compat.unscaled_by_grad_scaler(
            g for g in self.adapter.local_grads() if g is not None)


def _refuse_meta_parameters(adapter: GradAdapter) -> None:
    meta = [n for n, p in zip(adapter.names, adapter.params) if p.device.type == "meta"]
    if meta:
        raise UsageError(
            f"distclip: {len(meta)} parameters are on the meta device (e.g. {meta[:3]}): they hold no values or "
            "gradients yet. Materialise the model first (e.g. model.to_empty(device=...) and initialise it), "
            "then build the clipper"
        )

