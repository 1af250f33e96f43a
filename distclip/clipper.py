"""The public clipper: :class:`GradClipper` picks the adapter for what the user passed, then clips.

This module sits above the core and the adapters: the core (:mod:`distclip.core`) knows the clip
as four stages over the adapter contract, the adapters (:mod:`distclip.adapters`) know the layouts,
and here the two meet.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping

import torch

from .adapters import adapter_for
from .core.clipper import Clipper
from .core.config import ClipConfig

__all__ = ["GradClipper"]


class GradClipper(Clipper):
    """Exact global-norm gradient clipping, uniform or per layer group, for any supported layout.

    Args:
        model: what holds the gradients: a module (plain, DDP, FSDP1, FSDP2 / DTensor, tensor or expert
            parallel), a DeepSpeed engine (use :func:`distclip.deepspeed.attach`), or parameters / named
            parameters.
        config: a :class:`ClipConfig`, a dict, a YAML path, a preset name (``"demo"``, :mod:`distclip.presets`),
            inline YAML, or None for ``$DISTCLIP_CONFIG`` (else defaults); a string is tried in that order:
            an existing file, then a preset, then inline YAML (:func:`~distclip.core.config.config_from_string`).
        ddp_comm_hook: for DDP, a comm hook (e.g. ``default_hooks.fp16_compress_hook``) that distclip
            wraps instead of the plain all-reduce; ``ddp_comm_hook_state`` is its state (default:
            DDP's process group). Where distclip measures after backward (``comm_hook: false``, or
            ``auto`` without NCCL on CUDA) it is registered as given.
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
        adapter = adapter_for(model, pipeline_group=pipeline_group, tied=tied)  # needs no config
        super().__init__(adapter, config, ddp_comm_hook=ddp_comm_hook, ddp_comm_hook_state=ddp_comm_hook_state,
                         params=params, **overrides)
