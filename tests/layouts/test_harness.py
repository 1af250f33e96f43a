"""The multi-process harness itself: results, failures with tracebacks, bounded hangs."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from distclip.testing import RankFailed, RanksTimedOut, run_ranks

pytestmark = pytest.mark.multiprocess


def sum_of_ranks(offset: int):
    t = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item()


def test_results_in_rank_order():
    assert run_ranks(sum_of_ranks, 3, 10) == [(r, 3, 33.0) for r in range(3)]


def fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")
    dist.barrier()  # rank 0 would wait here forever without the harness


def test_failing_rank_reports_its_traceback():
    start = time.monotonic()
    with pytest.raises(RankFailed, match="(?s)rank 1 of 2.*ValueError: boom on purpose"):
        run_ranks(fail_on_rank_one, 2, timeout=60)
    assert time.monotonic() - start < 30


def skip_a_collective():
    if dist.get_rank() == 0:
        time.sleep(600)  # never joins


def test_hang_fails_within_the_timeout():
    start = time.monotonic()
    with pytest.raises((RanksTimedOut, RankFailed)):
        run_ranks(skip_a_collective, 2, timeout=8)
    assert time.monotonic() - start < 20
