"""DeepSpeed ZeRO-2 (and ZeRO-3) on 2 gloo ranks (issue 19): a non-finite step attributed to the parameter and
the rank whose partition holds the NaN, inside ``engine.step()``; group roles (measured only, out of the total) against the
float64 reference. One launch; its results are cached and asserted by focused tests.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist

import distclip
from distclip.testing import run_ranks
from tests.helpers.checks import assert_same_on_all_ranks, launch_once
from tests.helpers.deepspeed import close, count_clip_collectives, ds_config, full_params
from tests.helpers.models import batch, loss_fn, make_model
from tests.helpers.reference import reference_run, rel_err

pytestmark = [pytest.mark.multiprocess, pytest.mark.usefixtures("deepspeed_ops")]

LR = 0.5
ROLES = [
    {"name": "embed", "match": "embed.*", "max_norm": None, "in_total": False},
    {"name": "attn", "match": "blocks.*.attn.*", "max_norm": 0.02, "in_total": False},
    {"name": "head", "match": "head.*", "max_norm": None},
]
ROLE_CONFIGS = [{"max_norm": 0.01, "norm_type": p, "groups": ROLES} for p in (1.0, math.inf)]


def new_engine(stage: int = 2):
    import deepspeed

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage))
    return engine


def holds_first_element(param: torch.nn.Parameter, stage: int) -> bool:
    """Whether this rank's partition holds element 0 of ``param``, from DeepSpeed's own bookkeeping (read by the
    test only): ZeRO-2's fragment mapping, ZeRO-3's partition index times partition size."""
    if stage == 3:
        return dist.get_rank(param.ds_process_group) * param.partition_numel() == 0
    mapping = param._hp_mapping
    return mapping is not None and mapping.lp_fragment_address.start == 0 and mapping.lp_fragment_address.numel > 0


def micro_step(engine, step: int) -> None:
    engine.backward(loss_fn(engine, *batch(step, dist.get_rank())))
    engine.step()


def attribution(stage: int) -> dict[str, Any]:
    """A good step, then one where rank 1's gradient of ``head.bias`` gets a NaN at [0] before the reduction:
    the reduce-scatter lands it in the partition holding that element, on one rank only."""
    engine = new_engine(stage)
    clipper = distclip.deepspeed.attach(engine, {"max_norm": 0.1, "nonfinite": {"action": "skip", "max_consecutive": 5}})
    counts = count_clip_collectives(clipper)
    micro_step(engine, 0)
    good = clipper.last_report
    bias = engine.module.head.bias
    holds_first = holds_first_element(bias, stage)
    handle = bias.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), math.nan)) if dist.get_rank() == 1 else None
    before = full_params(engine)
    micro_step(engine, 1)
    if handle is not None:
        handle.remove()
    bad = clipper.last_report
    unchanged = all(torch.equal(before[n], p) for n, p in full_params(engine).items())
    out = {"collectives": list(counts), "good": good.nonfinite_params, "holds_first": holds_first,
           "bad": (bad.skipped, bad.skip_reason, bad.nonfinite_params, bad.nonfinite_ranks, bad.nonfinite_streak),
           "skipped_steps": engine.skipped_steps, "unchanged": unchanged}
    close(engine)
    return out


def roles() -> list[dict[str, Any]]:
    runs = []
    for config in ROLE_CONFIGS:
        engine = new_engine()
        clipper = distclip.deepspeed.attach(engine, config)
        counts = count_clip_collectives(clipper)
        micro_step(engine, 0)
        report = clipper.last_report
        assert_same_on_all_ranks(report.total_norm, *report.group_norms.values(), *report.coefs.values())
        runs.append({"total": report.total_norm.item(), "groups": {k: v.item() for k, v in report.group_norms.items()},
                     "coefs": {k: v.item() for k, v in report.coefs.items()}, "collectives": list(counts),
                     "ggn": engine.get_global_grad_norm().item(), "params": full_params(engine)})
        close(engine)
    return runs


def checks() -> dict[str, Any]:
    return {"attribution": attribution(2), "attribution_zero3": attribution(3), "roles": roles()}


@launch_once
def results() -> list[dict[str, Any]]:
    return run_ranks(checks, 2, timeout=420)


@pytest.mark.parametrize("key", ["attribution", "attribution_zero3"])
def test_zero_attribution_names_the_partition_holder(key):
    out = [r[key] for r in results()]
    assert [o["bad"] for o in out] == [out[0]["bad"]] * 2  # the same on every rank
    holder = [r for r, o in enumerate(out) if o["holds_first"]]
    assert len(holder) == 1, out  # DeepSpeed's mapping: exactly one rank holds head.bias[0]
    skipped, reason, params, ranks, streak = out[0]["bad"]
    assert (skipped, reason, params, ranks, streak) == (True, "nonfinite", ("head.bias",), tuple(holder), 1), out[0]
    for o in out:
        assert o["good"] is None and o["collectives"] == [1, 2], o  # good: one collective; bad: + the all-gather
        assert o["skipped_steps"] == 1 and o["unchanged"], o  # DeepSpeed's own skip


@pytest.mark.parametrize("index", range(len(ROLE_CONFIGS)))
def test_zero2_roles_match_the_float64_reference(index):
    config = ROLE_CONFIGS[index]
    ref = reference_run(config, 2, 1, LR)[0]  # one clip + SGD step in float64, on both ranks' batches
    for run in (r["roles"][index] for r in results()):
        assert run["collectives"] == [1]
        assert rel_err(run["total"], ref["total"]) <= 1e-6 and run["ggn"] == pytest.approx(run["total"], rel=1e-7)
        for g, norm in ref["groups"].items():
            assert rel_err(run["groups"][g], norm) <= 1e-6, g
        assert run["coefs"]["embed"] == 1.0 and run["coefs"]["head"] == 1.0 and run["coefs"]["default"] < 1.0
        for name, value in ref["params"].items():
            scale = value.abs().max().item()
            torch.testing.assert_close(run["params"][name], value, rtol=2e-6, atol=2e-6 * scale)
