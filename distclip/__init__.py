"""distclip: exact, fast, configurable gradient clipping for distributed PyTorch.

``import distclip`` needs torch only; DeepSpeed and Accelerate integrations import lazily.
"""

import importlib
from typing import Any

from ._version import __version__ as __version__  # the one version source (pyproject reads it too)
from .adapters.declared import declare
from .clipper import GradClipper
from .core.config import ClipConfig, GroupSpec, PerLayerSpec, load_config
from .core.names import canonical_name
from .core.report import ClipReport
from .core.sinks import BaseSink, CallbackSink, JSONLSink, MetricSink, TensorBoardSink
from .errors import (
    BadStepError,
    ClipAuditError,
    ClipLogError,
    ConfigError,
    ConfigMismatchError,
    DistclipError,
    LaunchError,
    MissingExtraError,
    NonFiniteGradientError,
    PartialGradientError,
    RankFailed,
    RanksTimedOut,
    SpikeStreakError,
    StaleClippingWarning,
    StateDictError,
    SuggestError,
    UnsupportedDeepSpeedSetup,
    UnsupportedLayoutError,
    UnsupportedModelError,
    UnsupportedVersionError,
    UsageError,
)
from .functional import clip_grad_norm_, global_grad_norm

# The integrations' import paths and distclip.presets (the configs shipped in the package), loaded on first use
# (distclip.deepspeed.attach(engine, config) works after a plain `import distclip`); none imports its framework until
# it is used.
_SUBMODULES = ("accelerate", "deepspeed", "hf_trainer", "lightning", "mpi", "olmo_core", "presets", "testing",
               "torchft", "torchtitan")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "BadStepError",
    "BaseSink",
    "CallbackSink",
    "ClipAuditError",
    "ClipConfig",
    "ClipLogError",
    "ClipReport",
    "ConfigError",
    "ConfigMismatchError",
    "DistclipError",
    "GradClipper",
    "GroupSpec",
    "JSONLSink",
    "LaunchError",
    "MetricSink",
    "MissingExtraError",
    "NonFiniteGradientError",
    "PartialGradientError",
    "PerLayerSpec",
    "RankFailed",
    "RanksTimedOut",
    "SpikeStreakError",
    "StaleClippingWarning",
    "StateDictError",
    "SuggestError",
    "TensorBoardSink",
    "UnsupportedDeepSpeedSetup",
    "UnsupportedLayoutError",
    "UnsupportedModelError",
    "UnsupportedVersionError",
    "UsageError",
    "canonical_name",
    "clip_grad_norm_",
    "declare",
    "global_grad_norm",
    "load_config",
    "presets",
]
