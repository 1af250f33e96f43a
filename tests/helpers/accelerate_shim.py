"""Test shim: Accelerate on CPU gloo ranks started by ``distclip.testing.run_ranks``, FSDP included.

Accelerate cannot run FSDP on CPU: with an FSDP (or MULTI_GPU) config and no GPU, every process
runs alone as ``DistributedType.NO`` with world size 1, silently (see
``shared/reference/cpu-backends.md``). These helpers make it work inside a rank whose gloo process
group ``run_ranks`` has already initialised:

1. ``reset_accelerate()``: forked ranks inherit the parent's Accelerate singletons; start fresh.
2. ``fsdp_accelerator(version)``: while the ``Accelerator`` is built, ``PartialState._prepare_backend``
   reports ``("gloo", MULTI_GPU)``, so Accelerate adopts the existing gloo group (it initialises
   nothing itself), and ``ACCELERATE_TORCH_DEVICE=cpu`` makes the device the CPU (FSDP1 then gets
   ``device_id=cpu``, which it needs on CPU). The FSDP plugin turns the type into ``FSDP``.

Tests MUST assert ``accelerator.num_processes == dist.get_world_size() == N`` and the expected
``distributed_type``: that is what fails if the shim (or a new Accelerate) silently falls back
to one process. Used by tests only; never by distclip itself.
"""

from __future__ import annotations

import os
from typing import Any
from unittest import mock


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def cpu_accelerator(**kwargs: Any):
    """Accelerate's own MULTI_CPU mode (DDP over gloo), adopting the rank's process group."""
    from accelerate import Accelerator

    reset_accelerate()
    return Accelerator(cpu=True, **kwargs)


def fsdp_accelerator(version: int, **plugin_kwargs: Any):
    """An ``Accelerator`` in FSDP mode (``version`` 1 or 2) on CPU gloo: the shim described above."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    reset_accelerate()
    if version == 1:
        plugin_kwargs = {"reshard_after_forward": "FULL_SHARD", "use_orig_params": True, **plugin_kwargs}
    plugin = FullyShardedDataParallelPlugin(fsdp_version=version, **plugin_kwargs)
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"

    def gloo_as_multi_gpu(self, cpu=False, sagemaker_dp=False, backend=None):
        return "gloo", DistributedType.MULTI_GPU

    with mock.patch.object(PartialState, "_prepare_backend", gloo_as_multi_gpu):
        return Accelerator(fsdp_plugin=plugin)
