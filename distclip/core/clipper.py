"""GradClipper: adapter -> local partials -> ONE collective -> policy -> coefficients -> report."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from ..adapters import adapter_for
from ..adapters.base import GradAdapter
from .attach import Attachment
from .config import ClipConfig, ConfigError, load_config
from .groups import GroupTable, resolve_groups
from .names import canonical_name
from .norms import SlotLayout, local_partials
from .policies import ClipPolicy, build_policy
from .reduce import check_consistency, collective_device, reduce_slots

EPS = 1e-6  # torch's: coefficient = max_norm / (norm + 1e-6)


class NonFiniteGradientError(RuntimeError):
    """The global gradient norm is NaN or inf and ``nonfinite: error`` was asked for (raised on every rank)."""


@dataclass
class ClipReport:
    """What one clip saw and did. Tensors are fp32, identical on every rank, never DTensors.

    Attributes:
        total_norm: pre-clip global norm over every group, in the config's ``norm_type``.
        group_norms: pre-clip norm of each group, in the group's own ``norm_type``.
        coefs: coefficient applied to each group's gradients (0 when the step was skipped or zeroed).
        thresholds: the threshold each group was clipped to.
        skipped: the optimizer step was dropped because the norm was non-finite (``nonfinite: skip``).
        finite: whether every norm was finite (a bool tensor: reading it syncs with the device).
        source: ``comm_hook`` when the norm was computed inside the gradient reduction, else ``post_backward``.
    """

    total_norm: torch.Tensor
    group_norms: dict[str, torch.Tensor]
    coefs: dict[str, torch.Tensor]
    thresholds: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: bool = False
    finite: torch.Tensor | None = None
    source: str = "post_backward"

    def to_floats(self) -> dict[str, Any]:
        """Plain Python numbers for logging (one host sync)."""
        return {
            "total_norm": self.total_norm.item(),
            "group_norms": {k: v.item() for k, v in self.group_norms.items()},
            "coefs": {k: v.item() for k, v in self.coefs.items()},
            "skipped": self.skipped,
        }

    def __str__(self) -> str:
        f = self.to_floats()
        groups = " ".join(f"{k}={v:.4g}(x{f['coefs'][k]:.3g})" for k, v in f["group_norms"].items())
        return f"norm={f['total_norm']:.6g} {groups}" + (" SKIPPED" if self.skipped else "")


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
        **overrides: config settings that take precedence, e.g. ``max_norm=0.5``.

    At construction every rank checks (one all-gather) that all ranks have the same config and
    group layout, and raises :class:`~distclip.reduce.ConfigMismatchError` otherwise.
    """

    def __init__(
        self,
        model: Any,
        config: ClipConfig | Mapping[str, Any] | str | os.PathLike | None = None,
        *,
        ddp_comm_hook: Callable | None = None,
        ddp_comm_hook_state: Any = None,
        params: Iterable[torch.Tensor | str] | None = None,
        **overrides: Any,
    ):
        self.config = load_config(config, **overrides)
        self.adapter: GradAdapter = adapter_for(model)
        if not self.adapter.has_names and (self.config.groups or self.config.per_layer):
            raise ConfigError(
                "per-group clipping needs parameter names, but bare parameters were given: pass the "
                "model itself or model.named_parameters()"
            )
        self.table: GroupTable = resolve_groups(self.config, self.adapter.names)
        self._excluded: int | None = None  # index of the hidden group of parameters outside ``params``
        if params is not None:
            self.table = self.table.restricted_to(self._names_of(params), self.config.norm_type)
            self._excluded = len(self.table.groups) - 1
        self.layout = SlotLayout.build(self.table.groups, self.config.norm_type)
        self.adapter.bind(self.table, self.layout)
        self.policy: ClipPolicy = build_policy(self.config.policy, self.table.groups)
        self.group_names = self.table.names[: self._excluded]  # the hidden group is last: never reported
        self.steps = 0
        self.last_report: ClipReport | None = None
        if self.config.check_consistency:
            check_consistency(self.adapter.reduce_group, self.fingerprint(), self._summary())
        if self.config.comm_hook and self._excluded is None:
            self.adapter.enable_reduction_hook(ddp_comm_hook, ddp_comm_hook_state)

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
        return Attachment(self, optimizer, fold)

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "groups": self.group_names, "steps": self.steps, "policy": self.policy.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state.get("groups", [])) != self.group_names:
            raise ConfigError(
                f"distclip state has groups {state.get('groups')} but this clipper has {self.group_names}: "
                "load it into a clipper built with the same config and model"
            )
        self.steps = int(state.get("steps", 0))
        self.policy.load_state_dict(state.get("policy", {}))

    @property
    def clips_subset(self) -> bool:
        """Whether only some of the model's parameters are clipped (``params=``)."""
        return self._excluded is not None

    def fingerprint(self) -> str:
        return f"{self.config.fingerprint()}-{self.table.fingerprint()}"

    # ---------------------------------------------------------------- internals
    def _summary(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "group_order": self.group_names,
                "group_layout": self.table.fingerprint(), **self.adapter.describe()}

    def _names_of(self, params: Iterable[torch.Tensor | str]) -> list[str]:
        """Canonical names of the parameters to clip (identity lookup among the adapter's parameters)."""
        name_of = self.adapter.tensor_names()
        names, unknown = [], 0
        for p in params:
            if isinstance(p, str):
                names.append(canonical_name(p))
            elif id(p) in name_of:
                names.append(name_of[id(p)])
            elif isinstance(p, torch.Tensor) and p.requires_grad:
                unknown += 1
        if unknown:
            raise ConfigError(
                f"distclip: {unknown} of the parameters to clip are not parameters of the model "
                f"({self.adapter.kind} layout with {len(self.adapter.names)} trainable parameters); pass "
                "parameters of the model the clipper was built for, or their canonical names"
            )
        return names

    def _local_partials(self, pending_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
        group = self.adapter.reduce_group
        partials = self.adapter.reduced_partials() if self._excluded is None else None
        source = "comm_hook"
        if partials is None:
            pieces, groups = self.adapter.counted_pieces()
            if self._excluded is not None:  # the hidden group's slots stay 0: excluded from every norm
                kept = [(t, g) for t, g in zip(pieces, groups) if g != self._excluded]
                pieces, groups = [t for t, _ in kept], [g for _, g in kept]
            device = collective_device(group, pieces[0].device if pieces else self.adapter.device_hint())
            partials, source = local_partials(pieces, groups, self.layout, device), "post_backward"
        scale = self.adapter.grad_scale()  # a loss scale the counted pieces still carry
        if pending_scale is not None:
            scale = pending_scale * scale
        if not (isinstance(scale, float) and scale == 1.0):
            partials = self.layout.unscale(partials, scale)
        return partials, source

    @torch.no_grad()
    def _run(
        self,
        apply: bool,
        pending_scale: torch.Tensor | None = None,
        fold: Callable[[torch.Tensor], None] | None = None,
    ) -> ClipReport:
        """One clip. ``pending_scale``: a loss scale the gradients still carry (divided out of the
        norms). ``fold``: applies the (uniform) coefficients instead of multiplying the gradients."""
        partials, source = self._local_partials(pending_scale)
        reduced = reduce_slots(partials, self.layout.uses_max, self.adapter.reduce_group)
        group_norms = self.layout.group_norms(reduced)
        total_norm = self.layout.total_norm(reduced)
        thresholds = self.policy.thresholds(group_norms)
        norms32 = group_norms.float()
        coefs = torch.clamp(thresholds.float() / (norms32 + EPS), max=1.0)
        finite = torch.isfinite(reduced).all()
        skipped = False
        if apply:
            if fold is not None and self.config.nonfinite == "ignore":
                fold(coefs)
            elif self.config.nonfinite == "ignore":  # no host sync at all: always multiply, as torch does
                self._scale(coefs, range(len(self.group_names)))
            else:
                # The one host sync: the non-finite decision, and which groups are clipped at all
                # (multiplying by exactly 1.0 changes nothing, so unclipped groups are not touched).
                finite_flag, *host_coefs = torch.cat([finite.float().reshape(1), coefs]).tolist()
                clipped = [g for g, c in enumerate(host_coefs) if c < 1.0]
                if finite_flag and fold is not None:
                    if clipped:
                        fold(coefs)
                elif finite_flag:
                    self._scale_by_host_coefs(host_coefs, clipped)
                else:
                    skipped = self._handle_nonfinite(reduced)
                    coefs = torch.zeros_like(coefs)
            self.policy.update(group_norms, finite)
            self.steps += 1
        report = ClipReport(
            total_norm=total_norm.float(),
            group_norms=dict(zip(self.group_names, norms32)),
            coefs=dict(zip(self.group_names, coefs)),
            thresholds=dict(zip(self.group_names, thresholds.float())),
            skipped=skipped,
            finite=finite,
            source=source,
        )
        self.last_report = report
        return report

    def _clipped_grads(self) -> list[list[torch.Tensor]]:
        """Per group, the gradients to scale; none for the hidden group of parameters outside ``params``."""
        grads = self.adapter.scaled_grads()
        if self._excluded is not None:
            grads[self._excluded] = []
        return grads

    def _scale(self, coefs: torch.Tensor, groups: Iterable[int]) -> None:
        """Multiply each chosen group's local gradients by its coefficient (foreach, in place)."""
        per_group = self._clipped_grads()
        for g in groups:
            if not per_group[g]:
                continue
            for (device, _), ([tensors], _) in _group_tensors_by_device_and_dtype([per_group[g]]).items():
                torch._foreach_mul_(tensors, coefs[g].to(device))

    def _scale_by_host_coefs(self, host_coefs: list[float], groups: list[int]) -> None:
        """Same as :meth:`_scale` with coefficients already on the host: one foreach call per
        device and dtype for all groups together (no per-group kernel launches)."""
        per_group = self._clipped_grads()
        tensors = [t for g in groups for t in per_group[g]]
        scalars = [host_coefs[g] for g in groups for _ in per_group[g]]
        if not tensors:
            return
        for (_, _), ([same_kind], indices) in _group_tensors_by_device_and_dtype([tensors], with_indices=True).items():
            torch._foreach_mul_(same_kind, [scalars[i] for i in indices])

    def _handle_nonfinite(self, reduced: torch.Tensor) -> bool:
        """Same decision on every rank (it is taken on the reduced vector). Returns ``skipped``."""
        mode = self.config.nonfinite
        if mode == "error":
            norms = self.layout.group_norms(reduced).tolist()
            bad = {n: v for n, v in zip(self.group_names, norms)}
            raise NonFiniteGradientError(
                f"distclip: non-finite gradient norm (group norms: {bad}) with nonfinite='error'. "
                "Use nonfinite='skip' to drop such steps, or find the source of the NaN/inf."
            )
        if mode == "zero":
            grads = [t for group in self._clipped_grads() for t in group]
            if grads:
                torch._foreach_zero_(grads)
            return False
        self.adapter.drop_grads()
        return True
