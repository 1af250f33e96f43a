"""A slot vector mixing SUM (finite p) and MAX (p = inf) slots, reduced both ways, on 4 gloo ranks.

Up to ``GATHER_LIMIT`` gathered values the ranks all-gather the vector and fold it in rank order (one
collective); beyond (thousands of ranks, or the row slots of row-wise clipping) a SUM and a MAX
all-reduce of the slots each, so that no rank receives world x slots values. Here the limit is set to 0
in the ranks to take the second path at 4 ranks: both must give the float64 reference's norms (total and
per group), the same clipped gradients, the same values on every rank, and carry NaN to every rank.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from distclip.core import reduce as reduce_module
from distclip.testing import run_ranks
from tests.helpers.checks import assert_same_on_all_ranks
from tests.helpers.models import batch, global_batch, loss_fn, make_model
from tests.helpers.reference import reference_clip, rel_err

pytestmark = pytest.mark.multiprocess

WORLD = 4
CONFIGS = [  # each mixes SUM and MAX slots
    {"max_norm": 0.1, "norm_type": 2.0, "groups": [{"name": "embed", "match": ["embed.*"], "max_norm": 0.05,
                                                    "norm_type": "inf"}]},
    {"max_norm": 0.1, "norm_type": "inf", "groups": [{"name": "attn", "match": ["blocks.*.attn.*"], "max_norm": 0.02,
                                                      "norm_type": 1.5}]},
    {"max_norm": 0.1, "norm_type": 1.0, "groups": [{"name": "embed", "match": ["embed.*"], "max_norm": 0.05,
                                                    "norm_type": "inf"},
                                                   {"name": "head", "match": ["head.*"], "max_norm": 0.2}]},
]
PATHS = {"all_gather": None, "two_all_reduces": 0}  # GATHER_LIMIT in the ranks (None: the default)
DEFAULT_LIMIT = reduce_module.GATHER_LIMIT


def _collectives(fn):
    """``fn()`` and its collectives by kind ("allgather", "allreduce")."""
    with CommDebugMode() as comm:
        out = fn()
    counts: dict[str, int] = {}
    for op, n in comm.get_comm_counts().items():
        kind = "allgather" if "allgather" in str(op) or "all_gather" in str(op) else "allreduce" \
            if "allreduce" in str(op) or "all_reduce" in str(op) else str(op)
        counts[kind] = counts.get(kind, 0) + n
    return out, counts


def mixed_runs() -> dict:
    out: dict = {}
    for path, limit in PATHS.items():
        reduce_module.GATHER_LIMIT = limit if limit is not None else DEFAULT_LIMIT
        for c, config in enumerate(CONFIGS):
            model = make_model()
            ddp = DDP(model)
            loss_fn(ddp, *batch(0, dist.get_rank())).backward()
            clipper = distclip.GradClipper(ddp, config, comm_hook=False)
            report, counts = _collectives(clipper.clip)
            assert_same_on_all_ranks(report.total_norm, *report.group_norms.values())
            out[(path, c)] = {"total": report.total_norm.item(),
                              "groups": {k: v.item() for k, v in report.group_norms.items()},
                              "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
                              "collectives": counts}
        # NaN in a MAX group's gradient (as DDP leaves it: on every replica): one rank counts that element,
        # the others learn it through the reduction
        model = make_model()
        ddp = DDP(model)
        loss_fn(ddp, *batch(0, dist.get_rank())).backward()
        model.embed.weight.grad[3, 5] = math.nan
        report = distclip.GradClipper(ddp, {**CONFIGS[0], "nonfinite": "ignore"}, comm_hook=False).clip()
        out[(path, "nan")] = {"total": report.total_norm.item(), "embed": report.group_norms["embed"].item(),
                              "default": report.group_norms["default"].item()}
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(mixed_runs, WORLD, timeout=240)


def reference(config: dict) -> dict:
    model = make_model(dtype=torch.float64)
    loss_fn(model, *global_batch(0, WORLD)).backward()
    grads = {n: p.grad / 1.0 for n, p in model.named_parameters()}
    return reference_clip(grads, {**config, "norm_type": float(config["norm_type"]),
                                  "groups": [{**g, "norm_type": float(g.get("norm_type", config["norm_type"]))}
                                             for g in config["groups"]]})


@pytest.mark.parametrize("path", list(PATHS))
def test_mixed_slots_match_the_float64_reference(results: list[dict], path: str) -> None:
    for c, config in enumerate(CONFIGS):
        ref = reference(config)
        for rank, res in enumerate(results):
            rec = res[(path, c)]
            assert rel_err(rec["total"], ref["total"]) <= 1e-6, (path, c, rank, rec["total"], ref["total"])
            for name, value in ref["groups"].items():
                assert rel_err(rec["groups"][name], value) <= 1e-6, (path, c, rank, name, rec["groups"][name], value)
            for name, grad in ref["clipped"].items():
                torch.testing.assert_close(rec["grads"][name].double(), grad, rtol=1e-5,
                                           atol=1e-5 * grad.abs().max().item())
            expected = {"allgather": 1} if path == "all_gather" else {"allreduce": 2}
            assert rec["collectives"] == expected, (path, c, rec["collectives"])


def test_both_paths_agree_and_carry_nan_to_every_rank(results: list[dict]) -> None:
    for res in results:
        for c in range(len(CONFIGS)):
            gathered, reduced = res[("all_gather", c)], res[("two_all_reduces", c)]
            assert rel_err(reduced["total"], gathered["total"]) <= 1e-12
            assert all(rel_err(reduced["groups"][k], v) <= 1e-12 for k, v in gathered["groups"].items())
        for path in PATHS:
            nan = res[(path, "nan")]
            assert math.isnan(nan["total"]) and math.isnan(nan["embed"]), (path, nan)
            assert math.isfinite(nan["default"]), (path, nan)  # the SUM slots of the other groups stay finite
