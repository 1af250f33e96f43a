"""Assertions shared by the multi-process tests (run inside ranks or on their results)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.distributed as dist

from tests.helpers.reference import rel_err


def assert_same_on_all_ranks(*tensors: torch.Tensor) -> None:
    """Bitwise equality across ranks, checked with an all_gather."""
    vec = torch.stack([t.detach().float().reshape(()) for t in tensors])
    gathered = [torch.empty_like(vec) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, vec)
    for r, other in enumerate(gathered):
        assert torch.equal(other, gathered[0]), f"rank {r} got {other.tolist()}, rank 0 {gathered[0].tolist()}"


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Elementwise, relative to the tensor's scale (fp32 backward cancels in tiny elements)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * scale)


def check_against_reference(records: list[dict], refs: list[dict], rtol: float, grad_rtol: float) -> None:
    for step, (rec, ref) in enumerate(zip(records, refs)):
        assert rel_err(rec["total"], ref["total"]) <= rtol, (step, rec["total"], ref["total"])
        for name, value in ref["groups"].items():
            assert rel_err(rec["groups"][name], value) <= rtol or abs(value) < 1e-12, (step, name, rec["groups"][name], value)
        for name, grad in ref["clipped"].items():
            assert_grad_close(rec["grads"][name], grad, grad_rtol)


def launch_once(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Cache a launch's results, and its failure: the tests sharing one launch fail fast, without relaunching."""
    outcome: list[Any] = []

    @functools.wraps(fn)
    def cached() -> Any:
        if not outcome:
            try:
                outcome.append((True, fn()))
            except Exception as err:  # noqa: BLE001  (re-raised to every test that needs it)
                outcome.append((False, err))
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    return cached


def cpu_kernel_flag_read(caller_file: str, args: tuple) -> bool:
    """A flag read by distclip's CPU-only partial kernels (distclip/core/kernels.py) on a CPU tensor.

    On CUDA the partials are torch's foreach norms and that code never runs; on CPU there is no
    device queue to wait on, so such a read is not a host-device synchronisation. Host-sync tests
    let it through and count everything else.
    """
    import os

    import distclip

    kernels = os.path.join(os.path.dirname(distclip.__file__), "core", "kernels.py")
    return caller_file == kernels and bool(args) and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu"


def record_slots(clipper: Any, into: dict[str, torch.Tensor]) -> None:
    """Keep, in ``into``, this rank's float64 partials (``"partials"``) and the reduced float64 slots (``"slots"``)
    of every clip of ``clipper`` (both wrapped in this process only; the reduction for every clipper of it)."""
    import distclip.core.measure as measure_module

    adapter = clipper.adapter
    local_partials = adapter.local_partials

    def recorded(*args: Any) -> tuple[torch.Tensor, str]:
        partials, source = local_partials(*args)
        into["partials"] = partials.clone()
        return partials, source

    adapter.local_partials = recorded
    reduce_slots = getattr(measure_module.reduce_slots, "unwrapped", measure_module.reduce_slots)

    def reduced(partials: torch.Tensor, *args: Any) -> torch.Tensor:
        out = reduce_slots(partials, *args)
        into["slots"] = out.clone()
        return out

    reduced.unwrapped = reduce_slots  # type: ignore[attr-defined]
    measure_module.reduce_slots = reduced


def gathered_equal(t: torch.Tensor) -> bool:
    """Whether every rank holds bitwise this tensor (one all_gather)."""
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return all(torch.equal(g, t) for g in gathered)
