"""Run a function on N gloo ranks in child processes, for tests (ours and yours).

``run_ranks(fn, world_size, *args)`` starts ``world_size`` processes (fork by default), gives each
an initialised gloo process group (``file://`` store: no port collisions), calls
``fn(*args, **kwargs)`` on every rank and returns the per-rank results, in rank order.

* A rank that raises fails the call with that rank's traceback (:class:`RankFailed`).
* A hang fails the call within ``timeout`` seconds (:class:`RanksTimedOut`); collectives also
  time out after ``collective_timeout`` seconds, so a mismatched collective errors instead of hanging.
* Ranks are daemons and are killed on failure: pytest never waits on a stuck rank.
* Teardown destroys the process group cleanly after a barrier (cpu-backends: without it, ranks
  holding DDP/FSDP/DeepSpeed wrappers at exit can abort with rc 134).
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .errors import RankFailed, RanksTimedOut

__all__ = ["run_ranks", "RankFailed", "RanksTimedOut"]


def _rank_main(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    workdir: str,
    collective_timeout: float,
    env: dict[str, str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    os.environ.update({**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size)})
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{workdir}/store",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=collective_timeout),
    )
    result = fn(*args, **kwargs)
    torch.save(result, f"{workdir}/result-{rank}.pt")
    del result
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 180.0,
    collective_timeout: float = 60.0,
    start_method: str = "fork",
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return the results in rank order.

    Results travel through ``torch.save``, so tensors and plain Python objects are fine.
    """
    with tempfile.TemporaryDirectory(prefix="distclip-ranks-") as workdir:
        context = mp.start_processes(
            _rank_main,
            args=(fn, world_size, workdir, collective_timeout, dict(env or {}), args, kwargs),
            nprocs=world_size,
            join=False,
            daemon=True,
            start_method=start_method,
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    alive = [r for r, p in enumerate(context.processes) if p.is_alive()]
                    raise RanksTimedOut(
                        f"ranks {alive} of {world_size} still running after {timeout:.0f} s "
                        f"(a hang: a rank skipped a collective, or waits on one the others never issue)"
                    )
        except mp.ProcessRaisedException as err:
            raise RankFailed(f"rank {err.error_index} of {world_size} failed:\n{err}") from None
        except mp.ProcessExitedException as err:
            raise RankFailed(f"rank {err.error_index} of {world_size} died: {err}") from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join(5)
        return [torch.load(Path(workdir) / f"result-{r}.pt", weights_only=False) for r in range(world_size)]
