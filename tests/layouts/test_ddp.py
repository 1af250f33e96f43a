"""DDP on 2 and 4 gloo ranks against a float64 single-process reference on the concatenated batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.tensor.debug import CommDebugMode
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from distclip.testing import run_ranks
from tests.helpers.checks import (
    assert_grad_close,
    assert_same_on_all_ranks,
    check_against_reference,
)
from tests.helpers.models import batch, global_batch, loss_fn, make_model
from tests.helpers.reference import reference_clip, reference_run, rel_err

pytestmark = pytest.mark.multiprocess

NORM_TYPES = [1.0, 2.0, 3.5, math.inf]
GROUPS = [
    {"name": "embed", "match": ["embed.*"], "max_norm": 0.05},
    {"name": "attn", "match": ["blocks.*.attn.*"], "max_norm": 0.02},
    {"name": "empty", "match": ["no_such_layer.*"], "max_norm": 1.0},  # empty on purpose
]
STEPS = 3
LR = 0.5


def config_for(p: float, grouped: bool) -> dict:
    return {"max_norm": 0.1, "norm_type": p, "groups": GROUPS if grouped else []}


def train_ddp(config: dict, dtype: torch.dtype = torch.float32, comm_hook: bool = True, bucket_cap_mb: float = 0.002):
    """STEPS steps of clip + SGD; per step: norms, clipped grads, which path computed the norm."""
    rank = dist.get_rank()
    model = make_model(dtype=dtype)
    ddp = DDP(model, bucket_cap_mb=bucket_cap_mb)  # tiny buckets: many of them, rebuilt after step 1
    clipper = distclip.GradClipper(ddp, {**config, "comm_hook": comm_hook})
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    records = []
    for step in range(STEPS):
        loss_fn(ddp, *batch(step, rank)).backward()
        report = clipper.clip()
        assert_same_on_all_ranks(report.total_norm, *report.group_norms.values())
        records.append({
            "total": report.total_norm.item(),
            "groups": {k: v.item() for k, v in report.group_norms.items()},
            "coefs": {k: v.item() for k, v in report.coefs.items()},
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
            "source": report.source,
        })
        opt.step()
        opt.zero_grad()
    return records


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("p", NORM_TYPES, ids=lambda p: f"p{p}")
@pytest.mark.parametrize("grouped", [False, True], ids=["uniform", "per_group"])
def test_ddp_matches_float64_reference(world, p, grouped):
    config = config_for(p, grouped)
    results = run_ranks(train_ddp, world, config)
    refs = reference_run(config, world, STEPS, LR)
    for records in results:
        check_against_reference(records, refs, rtol=1e-6, grad_rtol=1e-5)
        assert [r["source"] for r in records] == ["comm_hook"] * STEPS  # also after DDP rebuilt its buckets
    # the test exercises clipping: some coefficient is below 1 at some step
    assert any(c < 1.0 for rec in results[0] for c in rec["coefs"].values())


@pytest.mark.parametrize("p", [2.0, math.inf], ids=lambda p: f"p{p}")
def test_ddp_float64_training_is_exact_to_rounding(p):
    """With float64 on the ranks too, only the fp32 rounding of the reported norm remains."""
    config = config_for(p, grouped=True)
    results = run_ranks(train_ddp, 2, config, torch.float64)
    refs = reference_run(config, 2, STEPS, LR)
    for records in results:
        check_against_reference(records, refs, rtol=1.2e-7, grad_rtol=3e-7)


def hook_vs_post_backward(p: float):
    rank = dist.get_rank()
    out = []
    for hook in (True, False):
        model = make_model()
        ddp = DDP(model, bucket_cap_mb=0.002)
        clipper = distclip.GradClipper(ddp, {**config_for(p, True), "comm_hook": hook})
        steps = []
        for step in range(2):
            loss_fn(ddp, *batch(step, rank)).backward()
            report = clipper.clip()
            steps.append((report.source, report.total_norm.item(), {k: v.item() for k, v in report.group_norms.items()},
                          [q.grad.clone() for q in model.parameters()]))
            ddp.zero_grad()
        out.append(steps)
    return out


@pytest.mark.parametrize("p", NORM_TYPES, ids=lambda p: f"p{p}")
def test_hook_path_equals_post_backward_path(p):
    for hooked, plain in run_ranks(hook_vs_post_backward, 2, p):
        for (src_h, total_h, groups_h, grads_h), (src_p, total_p, groups_p, grads_p) in zip(hooked, plain):
            assert (src_h, src_p) == ("comm_hook", "post_backward")
            assert rel_err(total_h, total_p) <= 1e-6
            for k in groups_h:
                assert rel_err(groups_h[k], groups_p[k]) <= 1e-6 or groups_p[k] == 0
            for a, b in zip(grads_h, grads_p):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def accumulate_with_no_sync(comm_hook: bool):
    """Two micro-steps (the first under no_sync), clip at the sync step only."""
    rank = dist.get_rank()
    model = make_model()
    ddp = DDP(model, bucket_cap_mb=0.002)
    clipper = distclip.GradClipper(ddp, {**config_for(2.0, True), "comm_hook": comm_hook})
    with ddp.no_sync():
        loss_fn(ddp, *batch(0, rank), scale=0.5).backward()
    loss_fn(ddp, *batch(1, rank), scale=0.5).backward()
    report = clipper.clip()
    assert_same_on_all_ranks(report.total_norm)
    return report.source, report.total_norm.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("comm_hook", [True, False])
def test_gradient_accumulation_with_no_sync(comm_hook):
    world = 2
    model = make_model(dtype=torch.float64)
    for step in (0, 1):
        loss_fn(model, *global_batch(step, world), scale=0.5).backward()
    ref = reference_clip({n: p.grad for n, p in model.named_parameters()}, config_for(2.0, True))
    for source, total, grads in run_ranks(accumulate_with_no_sync, world, comm_hook):
        assert source == ("comm_hook" if comm_hook else "post_backward")
        assert rel_err(total, ref["total"]) <= 1e-6
        for name, grad in ref["clipped"].items():
            assert_grad_close(grads[name], grad, 1e-5)


def modified_after_backward():
    """GradScaler.unscale_-like edit after backward: the hook result is stale and must not be used."""
    rank = dist.get_rank()
    model = make_model()
    ddp = DDP(model, bucket_cap_mb=0.002)
    clipper = distclip.GradClipper(ddp, {**config_for(2.0, False), "comm_hook": True})
    loss_fn(ddp, *batch(0, rank)).backward()
    for p in model.parameters():
        p.grad.mul_(0.25)
    expected = distclip.global_grad_norm(list(model.parameters()))  # replicated grads: local norm is global
    report = clipper.clip()
    return report.source, report.total_norm.item(), expected.item()


def test_hook_result_is_not_used_after_gradients_change():
    for source, total, expected in run_ranks(modified_after_backward, 2):
        assert source == "post_backward"
        assert rel_err(total, expected) <= 1e-6


def compressed_hook(inner_name: str, comm_hook: bool | str):
    rank = dist.get_rank()
    model = make_model()
    ddp = DDP(model, bucket_cap_mb=0.002)
    inner = getattr(default_hooks, inner_name)
    clipper = distclip.GradClipper(ddp, {**config_for(2.0, True), "comm_hook": comm_hook}, ddp_comm_hook=inner,
                                   ddp_comm_hook_state=None)
    results = []
    for step in range(2):
        loss_fn(ddp, *batch(step, rank)).backward()
        expected = distclip.global_grad_norm(ddp)  # post-backward on the decompressed gradients
        # the gradients went through the compression: fp16 / bf16 values (times the world's 1/2: exact)
        low = {"fp16": torch.float16, "bf16": torch.bfloat16}[inner_name.split("_")[0]]
        compressed = all(torch.equal(p.grad, p.grad.to(low).float()) for p in model.parameters())
        report = clipper.clip()
        results.append((report.source, report.total_norm.item(), expected.item(), compressed))
        ddp.zero_grad()
    return results, clipper.adapter.hook_status


@pytest.mark.parametrize("inner", ["fp16_compress_hook", "bf16_compress_hook"])
def test_hook_composes_with_compression(inner):
    """Forced on, distclip's hook wraps the compression; under auto on gloo the compression hook is registered as
    given (the gradients are still compressed) and the norm is measured after backward; DDP refuses bf16
    compression without NCCL when registered alone, so there distclip's hook wraps it."""
    auto = ("comm_hook", "refused") if inner == "bf16_compress_hook" else ("post_backward", "registered as given")
    for comm_hook, (path, said) in ((True, ("comm_hook", "")), ("auto", auto)):
        for results, status in run_ranks(compressed_hook, 2, inner, comm_hook):
            for source, total, expected, compressed in results:
                assert source == path and compressed, (comm_hook, source, compressed)
                assert rel_err(total, expected) <= 1e-6
            assert said in status, status


def count_collectives(num_groups: int, comm_hook: bool):
    rank = dist.get_rank()
    model = make_model(blocks=3)
    names = [n for n, _ in model.named_parameters()]
    groups = [{"name": f"g{i}", "match": [names[i]], "max_norm": 0.01 * (i + 1)} for i in range(num_groups)]
    ddp = DDP(model, bucket_cap_mb=0.002)
    clipper = distclip.GradClipper(ddp, {"max_norm": 0.1, "groups": groups, "comm_hook": comm_hook})
    counts = []
    for step in range(2):
        loss_fn(ddp, *batch(step, rank)).backward()
        with CommDebugMode() as comm:
            clipper.clip()
        counts.append(comm.get_total_counts())
        ddp.zero_grad()
    return counts, len(clipper.group_names)


@pytest.mark.parametrize("num_groups", [0, 24])
@pytest.mark.parametrize("comm_hook", [True, False])
def test_exactly_one_collective_per_clip(num_groups, comm_hook):
    for counts, total_groups in run_ranks(count_collectives, 2, num_groups, comm_hook):
        assert total_groups == num_groups + 1
        assert counts == [1, 1]


def nonfinite_on_one_rank(mode: str):
    """Rank 1's data yields a non-finite loss; DDP spreads it; every rank must decide the same."""
    rank = dist.get_rank()
    model = make_model()
    ddp = DDP(model, bucket_cap_mb=0.002)
    clipper = distclip.GradClipper(ddp, {**config_for(2.0, True), "nonfinite": mode})
    opt = torch.optim.AdamW(ddp.parameters(), lr=0.1)
    clipper.attach(opt)
    loss_fn(ddp, *batch(0, rank)).backward()  # one healthy step so AdamW has state
    opt.step()
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    state_before = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    loss_fn(ddp, *batch(1, rank), scale=math.nan if rank == 1 else 1.0).backward()
    raised = None
    try:
        opt.step()
    except distclip.NonFiniteGradientError as err:
        raised = str(err)
    report = clipper.last_report
    params_equal_before = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    state_after = opt.state[next(model.parameters())]
    state_unchanged = all(torch.equal(state_before[k], state_after[k]) for k in state_before)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    same_across_ranks = all(torch.equal(g, gathered[0]) for g in gathered)
    grads = [p.grad for p in model.parameters()]
    return {
        "raised": raised,
        "skipped": report.skipped if report is not None else None,
        "params_unchanged": params_equal_before,
        "state_unchanged": state_unchanged,
        "same_across_ranks": same_across_ranks,
        "grads_none": all(g is None for g in grads),
        "grads_zero": all(g is not None and not g.any() for g in grads),
    }


def test_nonfinite_on_one_rank_skip():
    for r in run_ranks(nonfinite_on_one_rank, 2, "skip"):
        assert r["skipped"] is True and r["raised"] is None
        assert r["params_unchanged"] and r["state_unchanged"] and r["same_across_ranks"]


def test_nonfinite_on_one_rank_error_raises_everywhere():
    for r in run_ranks(nonfinite_on_one_rank, 2, "error"):
        assert r["raised"] is not None and "non-finite" in r["raised"]
        assert r["params_unchanged"] and r["same_across_ranks"]


def test_nonfinite_on_one_rank_zero():
    for r in run_ranks(nonfinite_on_one_rank, 2, "zero"):
        assert r["skipped"] is False and r["grads_zero"] and r["same_across_ranks"]


def mismatched_config(kind: str):
    rank = dist.get_rank()
    ddp = DDP(make_model())
    config = config_for(2.0, True)
    if rank == 1 and kind == "max_norm":
        config = {**config, "max_norm": 0.7}
    if rank == 1 and kind == "groups":
        config = {**config, "groups": GROUPS[:2]}
    try:
        distclip.GradClipper(ddp, config)
    except distclip.ConfigMismatchError as err:
        return str(err)
    return None


@pytest.mark.parametrize("kind", ["max_norm", "groups"])
def test_config_mismatch_across_ranks_is_a_clear_error(kind):
    messages = run_ranks(mismatched_config, 2, kind, timeout=60)
    assert all(m is not None for m in messages), messages
    assert all(kind in m and "rank 1" in m for m in messages), messages
