"""GradClipper(model, config, params=subset): norms over the subset only, exact, only the subset scaled."""

from __future__ import annotations

import fnmatch
import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from distclip.testing import run_ranks
from tests.helpers.checks import assert_grad_close, assert_same_on_all_ranks
from tests.helpers.models import batch, global_batch, loss_fn, make_model
from tests.helpers.reference import reference_clip, rel_err

GROUPS = [{"name": "embed", "match": ["embed.*"], "max_norm": 0.01},
          {"name": "attn", "match": ["blocks.*.attn.*"], "max_norm": 0.02, "norm_type": 1.0}]
SUBSET = ["blocks.1.*", "head.*", "tiny"]  # no embedding: that group is empty within the subset


def in_subset(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in SUBSET)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.5, math.inf], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("by_name", [False, True], ids=["tensors", "names"])
def test_subset_clip_is_exact_and_touches_only_the_subset(p, by_name):
    config = {"max_norm": 0.05, "norm_type": p, "groups": GROUPS}
    model = make_model(dtype=torch.float64)
    loss_fn(model, *batch(0, 0)).backward()
    before = {n: q.grad.clone() for n, q in model.named_parameters()}
    subset = [n if by_name else q for n, q in model.named_parameters() if in_subset(n)]
    report = distclip.GradClipper(model, config, params=subset).clip()
    ref = reference_clip({n: g for n, g in before.items() if in_subset(n)}, config)
    assert rel_err(report.total_norm.item(), ref["total"]) <= 1e-6
    assert set(report.group_norms) == {"embed", "attn", "default"}  # the hidden group of the others is never reported
    assert report.group_norms["embed"].item() == 0.0
    for name, value in ref["groups"].items():
        assert rel_err(report.group_norms[name].item(), value) <= 1e-6 or value == 0.0
    for n, q in model.named_parameters():
        if in_subset(n):
            assert_grad_close(q.grad, ref["clipped"][n], 1e-6)
        else:
            assert torch.equal(q.grad, before[n])
    assert any(c < 1.0 for c in report.coefs.values())


def test_subset_errors_and_frozen_parameters():
    model = make_model()
    model.head.bias.requires_grad_(False)
    loss_fn(model, *batch(0, 0)).backward()
    clipper = distclip.GradClipper(model, {}, params=[model.head.weight, model.head.bias])  # frozen: ignored
    assert clipper.state_dict()["groups"] == ["default"]
    expected = model.head.weight.grad.double().norm().item()
    assert rel_err(clipper.measure().total_norm.item(), expected) <= 1e-6
    with pytest.raises(distclip.ConfigError, match="not parameters of the model"):
        distclip.GradClipper(model, {}, params=[torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(distclip.ConfigError, match="not trainable parameters of this model"):
        distclip.GradClipper(model, {}, params=["no.such.weight"])


def ddp_subset(p: float):
    model = make_model()
    ddp = DDP(model, bucket_cap_mb=0.002)
    config = {"max_norm": 0.05, "norm_type": p, "groups": GROUPS}
    full = distclip.GradClipper(ddp, {**config, "comm_hook": True})  # owns the comm hook (forced on CPU)
    subset = distclip.GradClipper(ddp, config, params=[q for n, q in model.named_parameters() if in_subset(n)])
    loss_fn(ddp, *batch(0, dist.get_rank())).backward()
    with CommDebugMode() as comm:
        report = subset.clip()
    assert_same_on_all_ranks(report.total_norm, *report.group_norms.values())
    assert full.adapter.hook is not None and subset.adapter.hook is None
    return comm.get_total_counts(), report.source, report.total_norm.item(), {n: q.grad.clone() for n, q in model.named_parameters()}


@pytest.mark.multiprocess
@pytest.mark.parametrize("p", [2.0, math.inf], ids=["p2", "pinf"])
def test_subset_under_ddp_one_collective_exact(p):
    config = {"max_norm": 0.05, "norm_type": p, "groups": GROUPS}
    model = make_model(dtype=torch.float64)
    loss_fn(model, *global_batch(0, 2)).backward()
    grads = {n: q.grad for n, q in model.named_parameters()}
    ref = reference_clip({n: g for n, g in grads.items() if in_subset(n)}, config)
    for count, source, total, clipped in run_ranks(ddp_subset, 2, p):
        assert count == 1 and source == "post_backward"
        assert rel_err(total, ref["total"]) <= 1e-6
        for n, g in clipped.items():
            assert_grad_close(g, ref["clipped"][n] if in_subset(n) else grads[n], 1e-5)
