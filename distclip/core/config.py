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
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

ENV_VAR = "DISTCLIP_CONFIG"
DEFAULT_GROUP = "default"
NONFINITE_MODES = ("skip", "error", "zero", "ignore")


class ConfigError(ValueError):
    """Invalid distclip configuration. The message names the key, the value and what is allowed."""


def _parse_norm_type(value: Any) -> float:
    """Accept any p > 0, or infinity (as a number, or the strings 'inf' / 'infinity' / 'max')."""
    if isinstance(value, str) and value.strip().lower() in {"inf", "+inf", "infinity", "max"}:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a number p > 0 (e.g. 2.0) or 'inf'")
    p = float(value)
    if math.isnan(p) or p <= 0:
        raise ValueError("must be a number p > 0 (e.g. 1, 2, 3.5) or 'inf'; p <= 0 is not a norm")
    return p


def _parse_max_norm(value: Any) -> float:
    """A positive threshold (inf allowed: measure without clipping)."""
    if isinstance(value, str) and value.strip().lower() in {"inf", "+inf", "infinity"}:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a positive number (e.g. 1.0)")
    v = float(value)
    if math.isnan(v) or v <= 0:
        raise ValueError("must be a positive number (e.g. 1.0); use 'inf' to measure without clipping")
    return v


def _as_pattern_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


NormType = Annotated[float, BeforeValidator(_parse_norm_type)]
MaxNorm = Annotated[float, BeforeValidator(_parse_max_norm)]
Patterns = Annotated[list[Annotated[str, Field(min_length=1)]], BeforeValidator(_as_pattern_list), Field(min_length=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GroupSpec(_Section):
    """A named clip group: parameters whose canonical name matches one of the glob patterns."""

    name: Annotated[str, Field(min_length=1)]
    match: Patterns
    max_norm: MaxNorm | None = None
    norm_type: NormType | None = None
    policy: "PolicySpec | None" = None  # None: the top-level policy


class PerLayerSpec(_Section):
    """One group per module prefix of ``depth`` name components, e.g. ``blocks.3`` at depth 2."""

    depth: Annotated[int, Field(ge=1)]
    match: Patterns = ["*"]
    max_norm: MaxNorm | None = None
    norm_type: NormType | None = None
    policy: "PolicySpec | None" = None  # one policy over all the per-layer groups; None: the top-level one


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


PolicySpec = Annotated[
    Union[FixedPolicySpec, ZClipPolicySpec, AutoClipPolicySpec, AdaGCPolicySpec], Field(discriminator="kind")
]
POLICY_KINDS: dict[str, type[BaseModel]] = {
    "fixed": FixedPolicySpec,
    "zclip": ZClipPolicySpec,
    "autoclip": AutoClipPolicySpec,
    "adagc": AdaGCPolicySpec,
}
GroupSpec.model_rebuild()
PerLayerSpec.model_rebuild()


class SkipSpikesSpec(_Section):
    """Skip a step whose total norm is more than ``sigma_factor`` standard deviations above the
    mean of the last ``window`` accepted steps (once ``min_observations`` of them exist)."""

    window: Annotated[int, BeforeValidator(_not_bool), Field(ge=2)] = 128
    sigma_factor: PositiveFloat = 6.0
    min_observations: Annotated[int, BeforeValidator(_not_bool), Field(ge=2)] = 16

    @model_validator(mode="after")
    def _enough_window(self) -> "SkipSpikesSpec":
        if self.min_observations > self.window:
            raise ValueError(
                f"min_observations = {self.min_observations} exceeds window = {self.window}: the window "
                "never holds that many norms; lower min_observations or widen the window"
            )
        return self


class ClipConfig(_Section):
    """What to clip, how, and what to do with non-finite gradients.

    Attributes:
        max_norm: threshold of the ``default`` group (all parameters when there are no groups).
        norm_type: p of the norm (any p > 0, or ``inf``); also the p of the reported total norm.
        groups: ordered clip groups; the first match wins; unmatched parameters go to ``default``.
        per_layer: shorthand for one group per module prefix (after the explicit groups).
        nonfinite: ``skip`` (drop this step), ``error`` (raise on every rank), ``zero`` (zero the
            gradients) or ``ignore`` (torch semantics: scale by the non-finite norm).
        per_parameter: shorthand for one group per parameter tensor, named by its canonical name
            (after the explicit groups; not with ``per_layer``).
        policy: threshold policy of every group without its own ``policy``; ``fixed`` uses each
            group's ``max_norm``; ``zclip``, ``autoclip``, ``adagc`` adapt it.
        skip_spikes: skip steps whose total norm is a spike (z-score over recent accepted steps).
        comm_hook: compute the norm inside DDP's gradient reduction (comm hook) when possible.
        check_consistency: at set-up, verify every rank has the same config and group layout.
    """

    max_norm: MaxNorm = 1.0
    norm_type: NormType = 2.0
    groups: list[GroupSpec] = []
    per_layer: PerLayerSpec | None = None
    per_parameter: bool = False
    nonfinite: Literal["skip", "error", "zero", "ignore"] = "skip"
    policy: PolicySpec = FixedPolicySpec()
    skip_spikes: SkipSpikesSpec | None = None
    comm_hook: bool = True
    check_consistency: bool = True

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

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "ClipConfig":
        """Validate a mapping; raise :class:`ConfigError` naming the bad key, its value and what is allowed."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping of distclip settings, got {type(data).__name__}: {data!r}")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as err:
            raise ConfigError(_explain(err, source)) from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "ClipConfig":
        """Load a YAML (or JSON) file. A file with a top-level ``distclip:`` section uses that section."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"distclip config file {str(path)!r} does not exist (or is not a file)")
        return cls.from_dict(_distclip_section(_load_yaml(path.read_text(), str(path)), str(path)), source=str(path))

    @classmethod
    def from_env(cls, var: str = ENV_VAR) -> "ClipConfig | None":
        """Read ``$DISTCLIP_CONFIG``: a path to a YAML file, or inline YAML. None when unset."""
        raw = os.environ.get(var)
        if raw is None or not raw.strip():
            return None
        if Path(raw).is_file():
            return cls.from_yaml(raw)
        data = _load_yaml(raw, f"${var}")
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"${var}={raw!r} is neither an existing file nor inline YAML mapping; "
                f"set it to a config path or e.g. '{{max_norm: 1.0, norm_type: 2}}'"
            )
        return cls.from_dict(_distclip_section(data, f"${var}"), source=f"${var}")

    # ---------------------------------------------------------------- utilities
    def replace(self, **changes: Any) -> "ClipConfig":
        """A validated copy with some settings changed."""
        return ClipConfig.from_dict({**self.to_dict(), **changes}, source="overrides")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)

    def fingerprint(self) -> str:
        """Stable hash of the settings: equal on two ranks iff they clip the same way."""
        text = json.dumps(self.model_dump(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_config(spec: "ClipConfig | Mapping[str, Any] | str | os.PathLike | None" = None, **overrides: Any) -> ClipConfig:
    """Resolve a config from an object, a mapping, a YAML path, or (when None) ``$DISTCLIP_CONFIG``.

    Keyword overrides (e.g. ``max_norm=0.5``) are applied on top and validated the same way.
    """
    if isinstance(spec, ClipConfig):
        config = spec
    elif isinstance(spec, Mapping):
        config = ClipConfig.from_dict(spec)
    elif isinstance(spec, (str, os.PathLike)):
        config = ClipConfig.from_yaml(spec)
    elif spec is None:
        config = ClipConfig.from_env() or ClipConfig()
    else:
        raise ConfigError(
            f"distclip config must be a ClipConfig, a dict, or a path to a YAML file; got {type(spec).__name__}"
        )
    return config.replace(**overrides) if overrides else config


# --------------------------------------------------------------------- helpers
def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None


def _distclip_section(data: Any, source: str) -> Any:
    if isinstance(data, Mapping) and "distclip" in data:
        return data["distclip"]
    if data is None:
        return {}
    return data


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in POLICY_KINDS:  # the discriminated-union tag adds no information
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the section that holds ``loc``'s last key."""
    model: type[BaseModel] = ClipConfig
    if "policy" in loc[:-1]:  # top-level, a group's or per_layer's policy: the kind follows the key
        kind = loc[loc.index("policy") + 1]
        model = POLICY_KINDS.get(kind, FixedPolicySpec)
    elif len(loc) > 1:
        sections = {"groups": GroupSpec, "per_layer": PerLayerSpec, "skip_spikes": SkipSpikesSpec}
        model = sections.get(loc[0], ClipConfig)
    return list(model.model_fields)


def _explain(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = e["loc"]
        where = _format_loc(loc)
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            lines.append(
                f"{where}: unknown key (value {e['input']!r}); allowed keys here: {', '.join(allowed)}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
            )
        elif e["type"] == "union_tag_invalid":
            lines.append(f"{where}: unknown policy kind {e['input'].get('kind')!r}; allowed: {', '.join(POLICY_KINDS)}")
        elif e["type"] == "missing":
            lines.append(f"{where}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{where} = {e['input']!r}: {msg}" if loc else msg)
    return f"invalid distclip config ({source}):\n  " + "\n  ".join(lines)
