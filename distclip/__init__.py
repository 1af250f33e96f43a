"""distclip: exact, fast, configurable gradient clipping for distributed PyTorch.

``import distclip`` needs torch only; DeepSpeed and Accelerate integrations import lazily.
"""

from . import deepspeed  # distclip.deepspeed.attach(engine, config); imports no DeepSpeed
from .adapters.declared import declare
from .core.api import clip_grad_norm_, global_grad_norm
from .core.clipper import GradClipper
from .errors import StaleClippingWarning
from .errors import (ClipAuditError, ClipLogError, ConfigError, ConfigMismatchError, DistclipError, LaunchError,
                     MissingExtraError, NonFiniteGradientError, PartialGradientError, RankFailed, RanksTimedOut,
                     StateDictError, SuggestError, UnsupportedDeepSpeedSetup, UnsupportedLayoutError,
                     UnsupportedModelError, UnsupportedVersionError, UsageError)
from .core.report import ClipReport
from .core.sinks import BaseSink, CallbackSink, JSONLSink, MetricSink, TensorBoardSink
from .core.config import ClipConfig, GroupSpec, PerLayerSpec, load_config
from .core.names import canonical_name

__version__ = "0.1.0"

__all__ = [
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
]
