"""ClipConfig: the one distclip configuration, validated, loadable from a dict, YAML or env var.

Every backend (DDP, FSDP, DeepSpeed, Accelerate) reads this same section. Bad input raises a
single :class:`ConfigError` naming the key, the value given and what is allowed; unknown keys
are errors, never silently dropped.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import numbers
import os
import re
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Mapping, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from ..errors import ConfigError
from .presets import NAME as _PRESET_NAME
from .presets import preset_file, preset_hint, preset_names, unknown_preset

ENV_VAR = "DISTCLIP_CONFIG"
DEFAULT_GROUP = "default"
NONFINITE_MODES = ("skip", "error", "zero", "ignore")




_INF_WORDS = {"inf", "infinity", ".inf"}
_MAX_NORM_RULE = "must be a positive number (e.g. 1.0 or '1e-3'), or 'inf' to measure without clipping"
_NORM_TYPE_RULE = "must be a number p > 0 (e.g. 1, 2, 3.5) or 'inf' (also 'max')"
_TOO_LARGE = "the number is too large for a float64 (write 'inf' for no limit)"
_DEPTH_RULE = (
    "must be a whole number greater than or equal to 1: how many leading name components make one "
    "layer (e.g. 2 groups 'blocks.3.attn.weight' under 'blocks.3')"
)


def _one_number(value: Any) -> Any:
    """The Python scalar held by a numpy scalar/array or a torch tensor of exactly one element; else ``value``.

    Read once at set-up (never on the per-step path), so the ``.item()`` host sync is harmless.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"a tensor of shape {tuple(value.shape)} is not one number")
        if value.is_meta or value.dtype is torch.bool or value.is_complex():
            raise ValueError(f"a {value.dtype} tensor{' on meta' if value.is_meta else ''} is not a real number")
        return value.detach().item()
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, (numpy.ndarray, numpy.generic)):
        if value.size != 1:
            raise ValueError(f"an array of shape {value.shape} is not one number")
        return value.item()
    return value


def _real(value: Any, rule: str) -> float:
    """A float from what users write: a real number (not a bool), a numeric string, a one-element array/tensor.

    Raises ValueError(``rule`` plus the reason) otherwise; NaN and out-of-range checks are the caller's.
    """
    try:
        value = _one_number(value)
    except ValueError as err:
        raise ValueError(f"{rule}; {err}") from None
    if isinstance(value, str):
        text = value.strip().lower()
        if text.lstrip("+-") in _INF_WORDS:
            return -math.inf if text.startswith("-") else math.inf
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{rule}; this string is not a number") from None
        if math.isinf(number):
            raise ValueError(f"{rule}; {_TOO_LARGE}")
        return number
    if isinstance(value, bool):
        raise ValueError(f"{rule}; a bool is not a number")
    if not isinstance(value, numbers.Real):
        raise ValueError(f"{rule}; got {type(value).__name__}")
    try:
        number = float(value)
        overflowed = math.isinf(number) and value != number  # e.g. a Fraction or longdouble beyond float64
    except OverflowError:
        overflowed = True
    except (TypeError, ValueError, ArithmeticError) as err:
        raise ValueError(f"{rule}; {type(err).__name__}: {err}") from None
    if overflowed:
        raise ValueError(f"{rule}; {_TOO_LARGE}")
    return number


def _parse_norm_type(value: Any) -> float:
    """Accept any p > 0, or infinity (as a number, or the strings 'inf' / 'infinity' / 'max')."""
    if isinstance(value, str) and value.strip().lower() == "max":
        return math.inf
    p = _real(value, _NORM_TYPE_RULE)
    if math.isnan(p) or p <= 0:
        raise ValueError(_NORM_TYPE_RULE + ("; NaN is not a number" if math.isnan(p) else "; p <= 0 is not a norm"))
    return p


def _parse_max_norm(value: Any) -> float:
    """A positive threshold (inf allowed: measure without clipping)."""
    v = _real(value, _MAX_NORM_RULE)
    if math.isnan(v) or v <= 0:
        raise ValueError(_MAX_NORM_RULE + ("; NaN is not a threshold" if math.isnan(v) else ""))
    return v


def _parse_depth(value: Any) -> int:
    """A whole number >= 1: an int, an integral float (2.0) or a string of one ("2"); never a bool."""
    try:
        value = _one_number(value)
    except ValueError as err:
        raise ValueError(f"{_DEPTH_RULE}; {err}") from None
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"{_DEPTH_RULE}; this string is not a whole number") from None
    elif isinstance(value, bool):
        raise ValueError(f"{_DEPTH_RULE}; a bool is not a depth")
    elif isinstance(value, numbers.Integral):
        value = int(value)
    elif isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        value = math.trunc(value)  # = int(value) for a Real (typeshed's int() takes no numbers.Real)
    else:
        raise ValueError(f"{_DEPTH_RULE}; got {type(value).__name__} {_show(value)}")
    if value < 1:
        raise ValueError(_DEPTH_RULE)
    return value


def _parse_name(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError(f"must be a string naming the group (quote numbers: name: '1'); got {type(value).__name__}")
    if not value.strip():
        raise ValueError("must be a non-empty group name, e.g. 'embed'")
    return value


def _as_pattern_list(value: Any) -> Any:
    """One glob string, or a list (tuple) of them; anything else (a mapping, a set: no stable order) is refused."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(
        f"must be a glob string or a list of them, e.g. '*embed*' or ['*embed*', 'lm_head.*']; "
        f"got {type(value).__name__}"
    )


NormType = Annotated[float, BeforeValidator(_parse_norm_type)]
MaxNorm = Annotated[float, BeforeValidator(_parse_max_norm)]
Depth = Annotated[int, BeforeValidator(_parse_depth)]
GroupName = Annotated[str, BeforeValidator(_parse_name)]
Patterns = Annotated[list[Annotated[str, Field(min_length=1)]], BeforeValidator(_as_pattern_list), Field(min_length=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _RoleSpec(_Section):
    """The roles a group section can give its groups (``max_norm: null``: measured, never clipped;
    ``in_total: false``: left out of the total norm).

    ``max_norm`` left out takes the top-level one; written as ``null`` it makes the groups measured
    only. The two are told apart by whether the key was given (``model_fields_set``), and
    :meth:`ClipConfig.to_dict` writes an explicit ``null`` back, so the role survives a round trip.
    """

    if TYPE_CHECKING:  # a field of every subclass (declared there: a pydantic field here would be inherited)
        max_norm: float | None

    @property
    def measured_only(self) -> bool:
        """``max_norm: null`` was written: the groups are measured and reported, never clipped."""
        return "max_norm" in self.model_fields_set and self.max_norm is None

    @model_validator(mode="after")
    def _no_policy_when_measured_only(self) -> "_RoleSpec":
        policy = getattr(self, "policy", None)
        if self.measured_only and policy is not None and policy.kind != "fixed":
            raise ValueError(
                f"max_norm: null makes these groups measured only (never clipped), so their policy "
                f"{{kind: {policy.kind}}} would never apply; drop the policy, or give a max_norm "
                "(e.g. inf: no cap) to clip them with it"
            )
        return self


class GroupSpec(_RoleSpec):
    """A named clip group: parameters whose canonical name matches one of the glob patterns."""

    name: GroupName
    match: Patterns
    max_norm: MaxNorm | None = None  # left out: the top-level max_norm; null: measured, never clipped
    norm_type: NormType | None = None
    policy: "PolicySpec | None" = None  # None: the top-level policy
    in_total: bool = True  # false: measured and clipped apart, left out of the total norm


class PerLayerSpec(_RoleSpec):
    """One group per module prefix of ``depth`` name components, e.g. ``blocks.3`` at depth 2."""

    depth: Depth
    match: Patterns = ["*"]
    max_norm: MaxNorm | None = None  # left out: the top-level max_norm; null: measured, never clipped
    norm_type: NormType | None = None
    policy: "PolicySpec | None" = None  # one policy over all the per-layer groups; None: the top-level one
    in_total: bool = True  # false: the per-layer groups are left out of the total norm


# ------------------------------------------------------------------ policies
def _not_bool(value: Any) -> Any:
    """Numbers only: pydantic would otherwise read ``true`` as 1."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


Count = Annotated[int, BeforeValidator(_not_bool), Field(ge=1)]
PositiveFloat = Annotated[float, BeforeValidator(_not_bool), Field(gt=0, allow_inf_nan=False)]
UnitOpen = Annotated[float, BeforeValidator(_not_bool), Field(gt=0, lt=1)]  # (0, 1)
UnitClosed = Annotated[float, BeforeValidator(_not_bool), Field(ge=0, le=1)]  # [0, 1]


class FixedPolicySpec(_Section):
    """Fixed thresholds: each group's ``max_norm``."""

    kind: Literal["fixed"] = "fixed"


class ZClipPolicySpec(_Section):
    """ZClip (arXiv 2504.02507): z-score spike detection on an EMA of the group norm.

    The group's ``max_norm`` caps every threshold (ZClip's ``max_grad_norm``; ``inf``: no cap)
    and is the threshold during warm-up. ``clip_option`` is used in ``zscore`` mode only.
    """

    kind: Literal["zclip"] = "zclip"
    alpha: UnitOpen = 0.97
    z_thresh: PositiveFloat = 2.5
    warmup_steps: Count = 25
    mode: Literal["zscore", "percentile"] = "zscore"
    clip_option: Literal["adaptive_scaling", "mean"] = "adaptive_scaling"
    clip_factor: PositiveFloat = 1.0
    skip_update_on_spike: bool = False
    eps: PositiveFloat = 1e-6


class AutoClipPolicySpec(_Section):
    """AutoClip (arXiv 2007.14469), as the ``autoclip`` package: the ``quantile`` of the last
    ``history_length`` norms, taken BEFORE the current norm joins them (first step unclipped).

    The group's ``max_norm`` caps the threshold (``inf``: no cap, as the package).
    """

    kind: Literal["autoclip"] = "autoclip"
    quantile: UnitClosed = 0.9
    history_length: Count = 1000


class AdaGCPolicySpec(_Section):
    """AdaGC (arXiv 2502.11034): per-group thresholds ``lambda_rel * gamma_i``, gamma an EMA of
    the clipped norm. During ``warmup_steps`` the covered groups are clipped together at their
    ``max_norm`` on the norm over all of them. Meant for ``per_parameter`` groups."""

    kind: Literal["adagc"] = "adagc"
    lambda_rel: PositiveFloat = 1.05
    beta: UnitOpen = 0.98
    warmup_steps: Count = 100


class AGCPolicySpec(_Section):
    """Adaptive gradient clipping (NFNets, arXiv 2102.06171), row-wise against the parameter's own norms.

    A row is one dim-0 slice of a parameter with two or more dimensions (an output row of
    a Linear, an output filter of a conv), the whole tensor for a 0-/1-D parameter; in the group's
    ``norm_type``, with ``m_i = clip_factor * max(||W_i||, eps)``: ``G_i <- G_i * m_i / max(||G_i||, 1e-6)``
    unless ``||G_i|| < m_i`` (timm's ``adaptive_clip_grad``, exactly). The group's ``max_norm`` is
    not used; its norm is still measured. Reported per group: threshold ``clip_factor``,
    coefficient the smallest of its rows' coefficients. Stateless.
    """

    kind: Literal["agc"] = "agc"
    clip_factor: PositiveFloat = 0.01
    eps: PositiveFloat = 1e-3


PolicySpec = Annotated[
    Union[FixedPolicySpec, ZClipPolicySpec, AutoClipPolicySpec, AdaGCPolicySpec, AGCPolicySpec],
    Field(discriminator="kind"),
]
POLICY_KINDS: dict[str, type[BaseModel]] = {
    "fixed": FixedPolicySpec,
    "zclip": ZClipPolicySpec,
    "autoclip": AutoClipPolicySpec,
    "adagc": AdaGCPolicySpec,
    "agc": AGCPolicySpec,
}
GroupSpec.model_rebuild()
PerLayerSpec.model_rebuild()


class SkipSpikesSpec(_Section):
    """Skip a step whose total norm is more than ``sigma_factor`` standard deviations above the
    mean of the last ``window`` accepted steps (once ``min_observations`` of them exist).
    ``max_consecutive``: after that many spike skips in a row, raise :class:`~distclip.SpikeStreakError`
    on every rank (None: skip forever)."""

    window: Annotated[int, BeforeValidator(_not_bool), Field(ge=2)] = 128
    sigma_factor: PositiveFloat = 6.0
    min_observations: Annotated[int, BeforeValidator(_not_bool), Field(ge=2)] = 16
    max_consecutive: Count | None = None

    @model_validator(mode="after")
    def _enough_window(self) -> "SkipSpikesSpec":
        if self.min_observations > self.window:
            raise ValueError(
                f"min_observations = {self.min_observations} exceeds window = {self.window}: the window "
                "never holds that many norms; lower min_observations or widen the window"
            )
        return self


# ------------------------------------------------------------ non-finite steps
NonFiniteMode = Literal["skip", "error", "zero", "ignore"]
_NONFINITE_RULE = ("must be one of 'skip', 'error', 'zero', 'ignore', or a mapping {action: skip, max_consecutive: N} "
                   "(max_consecutive: a whole number >= 1, with action skip or zero)")


class NonFiniteSpec(_Section):
    """``nonfinite: {action: skip, max_consecutive: N}``: the action, and after N non-finite steps in a row
    :class:`~distclip.NonFiniteGradientError` on every rank (``nonfinite: skip`` is the short form)."""

    action: NonFiniteMode = "skip"
    max_consecutive: Count | None = None


def _parse_nonfinite(value: Any) -> Any:
    """The short form (a mode), or a mapping made a :class:`NonFiniteSpec`; one without a limit is its bare mode,
    so that ``{action: skip}`` and ``skip`` are the same config (and fingerprint)."""
    if isinstance(value, NonFiniteSpec):
        value = value.model_dump()
    if isinstance(value, str):
        if value not in NONFINITE_MODES:
            raise ValueError(_NONFINITE_RULE)
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{_NONFINITE_RULE}; got {type(value).__name__}")
    unknown = [k for k in value if k not in NonFiniteSpec.model_fields]
    if unknown:
        raise ValueError(f"{_NONFINITE_RULE}; unknown key {_show(unknown[0])}, allowed keys: action, max_consecutive")
    try:
        spec = NonFiniteSpec.model_validate(dict(value))
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ValueError(f"{_NONFINITE_RULE}; {problems}") from None
    if spec.max_consecutive is None:
        return spec.action
    if spec.action not in ("skip", "zero"):
        raise ValueError(
            f"max_consecutive must go with action skip or zero, not {spec.action!r}: 'error' already raises at the "
            "first non-finite step, and 'ignore' reads no flag to count (torch semantics)"
        )
    return spec


# ------------------------------------------------------------ observability
_PATH_RULE = "must be a file or folder path (a non-empty string), e.g. 'runs/clip.jsonl'"
_AUDIT_RULE = "must be true, false, or a mapping {every: N, stale_after: M, on_mismatch: raise | warn}"


def _parse_path(value: Any) -> str:
    """A path as users write it: a non-empty string or an ``os.PathLike`` (no NUL byte); never a number or a bool."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes) or not isinstance(value, str):
        raise ValueError(f"{_PATH_RULE}; got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{_PATH_RULE}; this one is empty")
    if "\0" in value:
        raise ValueError(f"{_PATH_RULE}; a path cannot hold a NUL character")
    return value


_COMM_HOOK_RULE = ("must be auto (the default: the norm inside the gradient reduction where gradients are reduced by "
                   "NCCL on CUDA, after backward elsewhere), true (always inside the reduction, where the layout "
                   "allows it) or false (always after backward)")
_TRUE_WORDS, _FALSE_WORDS = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _parse_comm_hook(value: Any) -> Any:
    """``auto``, or a bool (also as the words YAML or an environment variable may carry: true/false, on/off, 1/0)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word == "auto":
            return "auto"
        if word in _TRUE_WORDS or word in _FALSE_WORDS:
            return word in _TRUE_WORDS
    elif isinstance(value, int) and value in (0, 1):  # pydantic's bool accepted 0 and 1: so does this key
        return bool(value)
    raise ValueError(f"{_COMM_HOOK_RULE}; got {type(value).__name__} {_show(value)}")


CommHook = Annotated[Union[Literal["auto"], bool], BeforeValidator(_parse_comm_hook)]


def _audit_shorthand(value: Any) -> Any:
    """``audit: true`` is the default audit, ``audit: false`` none; a mapping sets its fields."""
    if value is True:
        return {}
    if value is False or value is None:
        return None
    if isinstance(value, (Mapping, BaseModel)):
        return value
    raise ValueError(f"{_AUDIT_RULE}; got {type(value).__name__} {_show(value)}")


LogPath = Annotated[str, BeforeValidator(_parse_path)]


class LogSpec(_Section):
    """Where the clip metrics (:meth:`ClipReport.to_metrics`) go, every ``every`` clips, from one rank
    (rank 0 of the clipper's reduce group: the numbers are the same on every rank).

    ``jsonl``: a JSON-lines file (one line per write, with ``step``; started afresh). ``tensorboard``:
    a TensorBoard log folder (needs the ``tensorboard`` extra). Sinks added with
    ``GradClipper.add_sink`` also write every ``every`` clips unless given their own.
    """

    every: Count = 1
    jsonl: LogPath | None = None
    tensorboard: LogPath | None = None


class AuditSpec(_Section):
    """Every ``every`` clips, check that every rank applied the same coefficients to the same groups
    (one all-gather of 3 int64 per rank, and two local norm passes over this rank's gradients);
    ``on_mismatch``: raise :class:`~distclip.ClipAuditError` on every rank, or warn. Also warn when a
    group has been clipped on every one, or none, of the last ``stale_after`` clips."""

    every: Count = 100
    stale_after: Count = 1000
    on_mismatch: Literal["raise", "warn"] = "raise"


class ClipConfig(_Section):
    """What to clip, how, and what to do with non-finite gradients.

    Attributes:
        max_norm: threshold of the ``default`` group (all parameters when there are no groups).
        norm_type: p of the norm (any p > 0, or ``inf``); also the p of the reported total norm.
        groups: ordered clip groups; the first match wins; unmatched parameters go to ``default``. A group
            written with ``max_norm: null`` is measured, never clipped; one with ``in_total: false`` is left
            out of the total norm (and of what ``skip_spikes`` watches).
        per_layer: shorthand for one group per module prefix (after the explicit groups).
        nonfinite: ``skip`` (drop this step), ``error`` (raise on every rank), ``zero`` (zero the
            gradients) or ``ignore`` (torch semantics: scale by the non-finite norm); or
            ``{action: skip | zero, max_consecutive: N}``: raise on every rank after N in a row.
        per_parameter: shorthand for one group per parameter tensor, named by its canonical name
            (after the explicit groups; not with ``per_layer``).
        policy: threshold policy of every group without its own ``policy``; ``fixed`` uses each
            group's ``max_norm``; ``zclip``, ``autoclip``, ``adagc`` adapt it; ``agc`` clips each
            row of each parameter against the parameter's own row norm.
        skip_spikes: skip steps whose total norm is a spike (z-score over recent accepted steps); with
            ``max_consecutive``, raise after that many spike skips in a row.
        comm_hook: where the norm is computed: ``auto`` (default) inside the gradient reduction (DDP comm hook,
            FSDP reduce hooks) where gradients are reduced by NCCL on CUDA, after backward elsewhere (CPU, gloo);
            ``true`` inside the reduction wherever the layout allows it; ``false`` always after backward.
            Both paths give the same norm (see docs/guides/comm_hook.md).
        check_consistency: at set-up, verify every rank has the same config and group layout.
        log: where the clip metrics go (JSONL, TensorBoard), and how often.
        audit: a periodic cross-rank check of the coefficients applied, and stale-clipping warnings
            (``true`` for the defaults).
    """

    max_norm: MaxNorm = 1.0
    norm_type: NormType = 2.0
    groups: list[GroupSpec] = []
    per_layer: PerLayerSpec | None = None
    per_parameter: bool = False
    nonfinite: Annotated[Union[NonFiniteMode, NonFiniteSpec], BeforeValidator(_parse_nonfinite)] = "skip"
    policy: PolicySpec = FixedPolicySpec()
    skip_spikes: SkipSpikesSpec | None = None
    comm_hook: CommHook = "auto"
    check_consistency: bool = True
    log: LogSpec | None = None
    audit: Annotated[AuditSpec | None, BeforeValidator(_audit_shorthand)] = None

    @model_validator(mode="after")
    def _unique_group_names(self) -> "ClipConfig":
        seen: set[str] = set()
        for i, group in enumerate(self.groups):
            if group.name == DEFAULT_GROUP:
                raise ValueError(
                    f"groups[{i}].name = 'default' is reserved for unmatched parameters; "
                    "set the top-level max_norm / norm_type for them instead"
                )
            if group.name in seen:
                raise ValueError(f"groups[{i}].name = {group.name!r} is used twice; group names must be unique")
            seen.add(group.name)
        return self

    @model_validator(mode="after")
    def _one_shorthand(self) -> "ClipConfig":
        if self.per_parameter and self.per_layer is not None:
            raise ValueError(
                "per_parameter: true and per_layer both make the groups of the unmatched parameters; "
                "keep one of them (explicit groups still come first)"
            )
        return self

    @property
    def nonfinite_action(self) -> str:
        """What a non-finite step does: ``skip``, ``error``, ``zero`` or ``ignore`` (either form of ``nonfinite``)."""
        return self.nonfinite if isinstance(self.nonfinite, str) else self.nonfinite.action

    @property
    def nonfinite_limit(self) -> int | None:
        """``nonfinite.max_consecutive`` (None: no limit)."""
        return None if isinstance(self.nonfinite, str) else self.nonfinite.max_consecutive

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "ClipConfig":
        """Validate a mapping; raise :class:`ConfigError` naming the bad key, its value and what is allowed."""
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{source}: expected a mapping of distclip settings (e.g. {{max_norm: 1.0}}), "
                f"got {type(data).__name__}: {_show(data)}"
            )
        try:
            return cls.model_validate(dict(data))
        except ValidationError as err:
            raise ConfigError(_explain(err, source)) from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "ClipConfig":
        """Load a YAML (or JSON) file. A file with a top-level ``distclip:`` section uses that section."""
        name = _path_name(path)
        return cls.from_dict(_distclip_section(read_yaml_file(name), name), source=name)

    @classmethod
    def from_env(cls, var: str = ENV_VAR, environ: Mapping[str, str] | None = None) -> "ClipConfig | None":
        """Read ``$DISTCLIP_CONFIG``: a YAML file's path, a preset name or inline YAML (:func:`config_from_string`).

        None when unset or blank.

        ``environ`` (default ``os.environ``) lets a launcher check the environment it gives its ranks.
        """
        raw = (os.environ if environ is None else environ).get(var)
        if raw is None or not raw.strip():
            return None
        return config_from_string(raw, source=f"${var}")

    # ---------------------------------------------------------------- utilities
    def replace(self, **changes: Any) -> "ClipConfig":
        """A validated copy with some settings changed."""
        return ClipConfig.from_dict({**self.to_dict(), **changes}, source="overrides")

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data (unset values left out; a measured-only group keeps its ``max_norm: null``)."""
        return _with_roles(self, self.model_dump(exclude_none=True))

    def fingerprint(self) -> str:
        """Stable hash of the settings: equal on two ranks iff they clip the same way."""
        roles = [g.measured_only for g in self.groups] + [self.per_layer is not None and self.per_layer.measured_only]
        text = json.dumps([_with_roles(self, self.model_dump()), roles], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _with_roles(config: ClipConfig, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a dump of ``config``) with ``max_norm: null`` written for measured-only sections: a dump drops
    the None (or cannot tell it from a max_norm left out), and the role would be lost."""
    sections: list[tuple[GroupSpec | PerLayerSpec, Any]] = [
        (group, data["groups"][i]) for i, group in enumerate(config.groups)]
    if config.per_layer is not None:
        sections.append((config.per_layer, data["per_layer"]))
    for spec, dumped in sections:
        if spec.measured_only:
            dumped["max_norm"] = None
        if spec.in_total:  # the default: left out, as dumps were before roles existed
            dumped.pop("in_total", None)
    return data


def load_config(spec: "ClipConfig | Mapping[str, Any] | str | os.PathLike | None" = None,
                **overrides: Any) -> ClipConfig:
    """Resolve a config from an object, a mapping, a string, a path, or (when None) ``$DISTCLIP_CONFIG``.

    A string is resolved by :func:`config_from_string` (an existing file, then a preset name such as
    ``"demo"``, then inline YAML); an ``os.PathLike`` is always a file. Keyword overrides (e.g.
    ``max_norm=0.5``) are applied on top and validated the same way.
    """
    if isinstance(spec, ClipConfig):
        config = spec
    elif isinstance(spec, Mapping):
        config = ClipConfig.from_dict(spec)
    elif isinstance(spec, str):
        config = config_from_string(spec)
    elif isinstance(spec, os.PathLike):
        config = ClipConfig.from_yaml(spec)
    elif spec is None:
        config = ClipConfig.from_env() or ClipConfig()
    else:
        raise ConfigError(
            f"distclip config must be a ClipConfig, a dict, or a path to a YAML file (or a preset name, or "
            f"inline YAML); got {type(spec).__name__}"
        )
    return config.replace(**overrides) if overrides else config


def config_from_string(text: str, source: str | None = None) -> ClipConfig:
    """The config a string names, tried in this order (the first that applies wins):

    1. the path of an existing file (YAML or JSON; relative paths from the working directory);
    2. the name of a preset shipped with distclip, a bare word such as ``demo``
       (:func:`distclip.presets.names`): a bare word that is no preset is an error listing them;
    3. inline YAML: a mapping of settings, e.g. ``{max_norm: 1.0, norm_type: 2}``.

    A file with a top-level ``distclip:`` section, or such inline YAML, uses that section.
    ``source`` names where the string came from (``$DISTCLIP_CONFIG``) in error messages.
    """
    if os.path.isfile(text):  # False (never an error) for inline YAML, however long: no ENAMETOOLONG
        return ClipConfig.from_yaml(text)
    word = text.strip()
    if _PRESET_NAME.fullmatch(word):
        preset = preset_file(word)
        if preset is None:
            raise ConfigError(f"{source or 'distclip config'}={_show(word)} is neither an existing file nor a distclip "
                              f"preset{unknown_preset(word)}; or give a YAML file's path, or inline YAML such as "
                              "'{max_norm: 1.0}'")
        return ClipConfig.from_yaml(preset)
    where = source or "inline distclip config"
    path_like = "\n" not in text and (os.sep in text or word.endswith((".yaml", ".yml", ".json")))
    try:
        data = _load_yaml(text, where)
    except ConfigError:
        if not path_like:
            raise
        data = None
    if isinstance(data, Mapping):
        return ClipConfig.from_dict(_distclip_section(data, where), source=where)
    if source is None and path_like:  # meant as a file: say why it cannot be read (missing, a folder, ...)
        try:
            return ClipConfig.from_yaml(text)
        except ConfigError as err:
            raise ConfigError(f"{err}{preset_hint(text)}") from None
    if not word:
        problem = "is empty"
    elif os.path.isdir(text):
        problem = "is a directory"
    elif path_like:
        problem = "is not an existing file"
    else:
        problem = f"is neither an existing file nor an inline YAML mapping (it reads as a {type(data).__name__})"
    raise ConfigError(
        f"{source or 'distclip config'}={_show(text)} {problem}{preset_hint(text) if path_like else ''}; give a "
        f"YAML file's path, a preset name ({', '.join(preset_names())}) or inline YAML, e.g. "
        f"'{{max_norm: 1.0, norm_type: 2}}'"
    )


# --------------------------------------------------------------------- helpers
def read_yaml_file(path: str | os.PathLike, what: str = "distclip config file") -> Any:
    """The parsed content of a UTF-8 YAML (or JSON) file; :class:`ConfigError` saying what is wrong otherwise."""
    name = _path_name(path)
    try:
        mode = os.stat(name).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"{what} {_show(name)} does not exist") from None
    except (OSError, ValueError) as err:  # a name too long, a NUL byte, no permission on a folder
        raise ConfigError(f"{what} {_show(name)} cannot be opened: {_reason(err)}") from None
    if stat.S_ISDIR(mode):
        raise ConfigError(f"{what} {_show(name)} is a directory; give the path of a YAML file")
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{what} {_show(name)} is not a regular file (or does not exist); give a YAML file")
    try:
        data = Path(name).read_bytes()
    except OSError as err:
        raise ConfigError(f"{what} {_show(name)} cannot be read: {_reason(err)}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{what} {_show(name)} is not UTF-8 text (byte {_show(data[err.start:err.start + 1])} at offset "
            f"{err.start}); save it as UTF-8"
        ) from None
    return _load_yaml(text, name)


def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {_printable(str(err))}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as err:  # e.g. a date 2024-02-30, deep nesting
        raise ConfigError(f"{source}: YAML that cannot be read: {type(err).__name__}: {_printable(str(err))}") from None


def _distclip_section(data: Any, source: str) -> Any:
    if isinstance(data, Mapping) and "distclip" in data:
        return data["distclip"] if data["distclip"] is not None else {}
    if data is None:
        return {}
    return data


def _path_name(path: Any) -> str:
    try:
        return os.fsdecode(path)
    except TypeError:
        raise ConfigError(f"a distclip config path must be a str or os.PathLike, got {type(path).__name__}") from None


def _reason(err: BaseException) -> str:
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


def _printable(text: str) -> str:
    """``text`` with lone surrogates (undecodable bytes from a file or the environment) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _show(value: Any, limit: int = 120) -> str:
    """A short ``repr`` for messages: never raises, never prints a whole huge value."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"<an int of {len(str(abs(value))) if value.bit_length() < 10_000 else 'thousands of'} digits>"
    try:
        text = _printable(repr(value))
    except Exception:  # a deeply nested value, an object whose __repr__ fails
        return f"<a {type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit - 30]}...{text[-12:]} ({len(text)} characters)"


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i > 0 and loc[i - 1] == "policy" and part in POLICY_KINDS:  # the union's tag adds no information
            continue
        elif isinstance(part, str) and _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:  # an empty key, spaces, dots, control characters: quoted so the message reads unambiguously
            out += f"[{_show(part)}]"
    return out or "<root>"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the section that holds ``loc``'s last key."""
    model: type[BaseModel] = ClipConfig
    if "policy" in loc[:-1]:  # top-level, a group's or per_layer's policy: the kind follows the key
        kind = loc[loc.index("policy") + 1]
        model = POLICY_KINDS.get(kind, FixedPolicySpec)
    elif len(loc) > 1:
        sections: dict[str, type[BaseModel]] = {
            "groups": GroupSpec, "per_layer": PerLayerSpec, "skip_spikes": SkipSpikesSpec,
            "log": LogSpec, "audit": AuditSpec, "nonfinite": NonFiniteSpec}
        model = sections.get(loc[0], ClipConfig)
    return list(model.model_fields)


# What a section or list item holds, added to pydantic's own type errors ("Input should be a valid list").
_EXPECTED = {
    "groups": "a list of groups, e.g. [{name: embed, match: '*embed*', max_norm: 0.1}]",
    "groups[]": "a mapping {name: ..., match: ..., max_norm: ..., norm_type: ..., in_total: ...} (only name and "
                "match required)",
    "in_total": "true or false",
    "match[]": "a non-empty glob string, e.g. '*embed*'",
    "per_layer": "a mapping {depth: N, match: ..., max_norm: ..., norm_type: ...} (only depth required)",
    "policy": "a mapping with a 'kind' key",
    "comm_hook": "auto, true or false",
    "check_consistency": "true or false",
    "log": "a mapping {every: N, jsonl: PATH, tensorboard: DIR} (each optional)",
    "audit": "true, false, or a mapping {every: N, stale_after: M, on_mismatch: raise | warn}",
}


def _expected(loc: tuple[Any, ...]) -> str:
    """What is allowed at ``loc``, for pydantic's built-in errors (distclip's validators say it themselves)."""
    keys = [part for part in loc if isinstance(part, str)]
    if not keys:
        return ""
    key = keys[-1] + ("[]" if isinstance(loc[-1], int) else "")
    return _EXPECTED.get(key, "")


def _explain(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = e["loc"]
        where = _format_loc(loc)
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            lines.append(
                f"{where}: unknown key (value {_show(e['input'])}); allowed keys here: {', '.join(allowed)}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
            )
        elif e["type"] == "invalid_key":
            parent = _format_loc(loc[:-1])
            lines.append(
                f"{parent}: key {_show(e['input'])} ({type(e['input']).__name__}) is not a string; "
                f"allowed keys here: {', '.join(_allowed_keys(loc))}"
            )
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            kind = e["input"].get("kind") if isinstance(e["input"], Mapping) else None
            problem = f"unknown policy kind {_show(kind)}" if e["type"] == "union_tag_invalid" else "no 'kind' key"
            lines.append(f"{where}: {problem}; allowed kinds: {', '.join(POLICY_KINDS)} (e.g. {{kind: fixed}})")
        elif e["type"] == "missing":
            lines.append(f"{where}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            expected = _expected(loc) if e["type"] != "value_error" else ""
            msg += f"; expected {expected}" if expected else ""
            lines.append(f"{where} = {_show(e['input'])}: {msg}" if loc else msg)
    return f"invalid distclip config ({source}):\n  " + "\n  ".join(lines)
