"""Pick the adapter for whatever the user passed: plain module or parameters, DDP (torch's or torchft's), FSDP1,
FSDP2 / DTensor, DeepSpeed engine."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

from ..compat import pytorch as _compat
from ..compat import torchft as _torchft
from ..core.names import canonical_name, named_trainable_parameters
from ..errors import UnsupportedModelError
from .base import GradAdapter
from .ddp import DDPAdapter
from .mesh_geometry import PipelineStages
from .plain import PlainAdapter
from .zero import deepspeed_adapter, is_deepspeed_engine  # imports no DeepSpeed

__all__ = ["GradAdapter", "PlainAdapter", "DDPAdapter", "adapter_for", "UnsupportedModelError"]




def adapter_for(obj: Any, pipeline_group: Any = None, tied: Any = None) -> GradAdapter:
    """The adapter for a module (plain, DDP, FSDP1, FSDP2), a DeepSpeed engine, a parameter, or an
    iterable of parameters / (name, parameter); with ``pipeline_group``, for this rank's pipeline
    stage(s): a module, a ``torch.distributed.pipelining`` PipelineStage, or a list of them.

    FSDP1: the module is, or contains, a ``FullyShardedDataParallel`` unit. FSDP2 / DTensor: some
    parameter is a DTensor (``fully_shard``, tensor parallel, or DTensor parameters passed directly).
    """
    if pipeline_group is not None:
        from .pipeline import PipelineAdapter

        return PipelineAdapter(obj, pipeline_group, tied)
    if tied:
        raise UnsupportedModelError(
            "distclip: tied= declares weights tied across pipeline stages; pass pipeline_group too")
    if _is_pipeline_stage(obj) or (isinstance(obj, (list, tuple)) and obj and all(
            _is_pipeline_stage(s) or isinstance(s, torch.nn.Module) for s in obj)):
        raise UnsupportedModelError(
            "distclip: pipeline stages need the pipeline process group, so that the norm is summed over the "
            "stages: GradClipper(stage, config, pipeline_group=pp_group) (a ProcessGroup or a 1-D DeviceMesh)")
    return single_adapter(obj)


def single_adapter(obj: Any, stages: PipelineStages | None = None) -> GradAdapter:
    """The adapter of one layout (see :func:`adapter_for`); ``stages``: which pipeline stage each rank
    holds (other stages hold other parameters, never copies)."""
    if _torchft.is_ft_ddp(obj):  # before torch's DDP: a subclass of it, on a dummy process group
        from .torchft import TorchFTDDPAdapter

        return TorchFTDDPAdapter(obj)
    if _torchft.is_pure_ddp(obj):  # a plain module whose gradients are still being all-reduced
        from .torchft import pure_ddp_refusal

        raise UnsupportedModelError(pure_ddp_refusal())
    if isinstance(obj, DistributedDataParallel):
        return DDPAdapter(obj)
    if is_deepspeed_engine(obj):  # before nn.Module: an engine is one
        return deepspeed_adapter(obj)
    if isinstance(obj, torch.nn.Module):
        if _has_fsdp1_unit(obj):
            from .fsdp1 import FSDP1Adapter

            return FSDP1Adapter(obj)
        named = list(named_trainable_parameters(obj))
        return _for_params(named, module=obj, stages=stages)
    if isinstance(obj, torch.Tensor):
        return _unnamed([obj])
    if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes, dict)):
        items = list(obj)
        if all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], torch.Tensor) for x in items):
            return _for_params([(canonical_name(str(n)), p) for n, p in items], stages=stages)
        if all(isinstance(x, torch.Tensor) for x in items):
            return _unnamed(items, stages=stages)
    raise UnsupportedModelError(
        f"distclip cannot clip a {type(obj).__module__}.{type(obj).__qualname__}: pass a torch.nn.Module "
        "(plain, DDP, FSDP1 or FSDP2), a DeepSpeed engine, model.parameters(), or model.named_parameters()"
    )


def _for_params(named: Sequence[tuple[str, torch.Tensor]], module: torch.nn.Module | None = None,
                stages: PipelineStages | None = None) -> GradAdapter:
    _refuse_fsdp1_pieces([p for _, p in named])
    dtensor = _dtensor_type()
    if dtensor is not None and any(isinstance(p, dtensor) for _, p in named):
        from .dtensor import DTensorAdapter

        return DTensorAdapter(named, module=module, stages=stages)
    return PlainAdapter(named)


def _is_pipeline_stage(obj: Any) -> bool:
    """A ``torch.distributed.pipelining`` stage (it holds this rank's module as ``submod``)."""
    return isinstance(getattr(obj, "submod", None), torch.nn.Module) and hasattr(obj, "stage_index")


def _unnamed(params: list[torch.Tensor], stages: PipelineStages | None = None) -> GradAdapter:
    adapter = _for_params([(f"<param {i}>", p) for i, p in enumerate(params)], stages=stages)
    adapter.has_names = False
    return adapter


def _has_fsdp1_unit(module: torch.nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _refuse_fsdp1_pieces(params: list[torch.Tensor]) -> None:
    """FSDP1 original parameters are local shard views: a norm over them alone would be rank-local and wrong."""
    if any(_compat.is_fsdp1_flattened(p) for p in params):
        raise UnsupportedModelError(
            "distclip: these are parameters of an FSDP1 model (local shards): their norm depends on the "
            "sharding. Pass the FSDP-wrapped module itself, e.g. distclip.clip_grad_norm_(fsdp_model, ...)"
        )
