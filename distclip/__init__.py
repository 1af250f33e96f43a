"""distclip: exact, fast, configurable gradient clipping for distributed PyTorch.

``import distclip`` needs torch only; DeepSpeed and Accelerate integrations import lazily.
"""

from . import deepspeed  # distclip.deepspeed.attach(engine, config); imports no DeepSpeed
from .adapters import UnsupportedModelError
from .adapters.declared import declare
from .core.api import clip_grad_norm_, global_grad_norm
from .core.clipper import GradClipper
from .core.audit import StaleClippingWarning
from .core.errors import ClipAuditError, MissingExtraError, NonFiniteGradientError, StateDictError, UsageError
from .core.report import ClipReport
from .core.sinks import BaseSink, CallbackSink, JSONLSink, MetricSink, TensorBoardSink
from .core.config import ClipConfig, ConfigError, GroupSpec, PerLayerSpec, load_config
from .core.names import canonical_name
from .core.reduce import ConfigMismatchError

__version__ = "0.1.0"

__all__ = [
    "BaseSink",
    "CallbackSink",
    "ClipAuditError",
    "ClipConfig",
    "ClipReport",
    "ConfigError",
    "ConfigMismatchError",
    "GradClipper",
    "GroupSpec",
    "JSONLSink",
    "MetricSink",
    "MissingExtraError",
    "NonFiniteGradientError",
    "PerLayerSpec",
    "StaleClippingWarning",
    "StateDictError",
    "TensorBoardSink",
    "UnsupportedModelError",
    "UsageError",
    "canonical_name",
    "clip_grad_norm_",
    "declare",
    "global_grad_norm",
    "load_config",
]
