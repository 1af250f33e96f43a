"""distclip: exact, fast, configurable gradient clipping for distributed PyTorch.

``import distclip`` needs torch only; DeepSpeed and Accelerate integrations import lazily.
"""

from . import deepspeed  # distclip.deepspeed.attach(engine, config); imports no DeepSpeed
from .adapters import UnsupportedModelError
from .adapters.declared import declare
from .core.api import clip_grad_norm_, global_grad_norm
from .core.clipper import GradClipper
from .core.errors import NonFiniteGradientError, StateDictError, UsageError
from .core.report import ClipReport
from .core.config import ClipConfig, ConfigError, GroupSpec, PerLayerSpec, load_config
from .core.names import canonical_name
from .core.reduce import ConfigMismatchError

__version__ = "0.1.0"

__all__ = [
    "ClipConfig",
    "ClipReport",
    "ConfigError",
    "ConfigMismatchError",
    "GradClipper",
    "GroupSpec",
    "NonFiniteGradientError",
    "PerLayerSpec",
    "StateDictError",
    "UnsupportedModelError",
    "UsageError",
    "canonical_name",
    "clip_grad_norm_",
    "declare",
    "global_grad_norm",
    "load_config",
]
