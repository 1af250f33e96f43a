"""DeepSpeed MoE (``deepspeed.moe.layer.MoE``, 4 experts, ep_size 2) through ``distclip.deepspeed.attach``.

2 and 4 gloo ranks, ZeRO 0, 1 and 2 (fp32; bf16 at ZeRO-1/2). The reference is built from every
rank's reduced gradients, gathered after ``engine.backward()``: each dense gradient from its
data-parallel copies (which must agree bitwise), each expert's gradient from the ranks that hold
that expert (its expert-data-parallel group), the experts of expert-parallel rank ``e`` renamed to
their global index (``deepspeed_experts.{e * local + j}``), since every rank calls its own local
experts ``0 .. local-1``. The norms of that full gradient set are taken in float64 by
``tests.helpers.reference`` (no distclip code), and compared with distclip's norms and with the clipped
fp32 gradients the optimizer steps with (read in a step pre-hook of the torch optimizer).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distclip
from distclip.testing import run_ranks
from tests.helpers.checks import assert_grad_close, assert_same_on_all_ranks
from tests.helpers.deepspeed import close, count_clip_collectives, ds_config, error_of
from tests.helpers.reference import reference_clip, rel_err

import deepspeed  # noqa: E402,F401  (a dev dependency: missing, the tests fail)
pytestmark = [pytest.mark.multiprocess, pytest.mark.usefixtures("deepspeed_ops")]

NUM_EXPERTS, EP_SIZE, IN, HIDDEN, SEQ, MICRO = 4, 2, 5, 8, 6, 4
EP_GROUP = f"ep_size_{EP_SIZE}"
GROUPS = [
    {"name": "experts", "match": ["*experts*"], "max_norm": 0.02},  # expert parameters only
    {"name": "gate", "match": ["moe.deepspeed_moe.gate.*"], "max_norm": 0.005},
    {"name": "empty", "match": ["no_such_layer.*"], "max_norm": 1.0},
]
NORM_TYPES = [1.0, 2.0, 3.5, math.inf]
CONFIGS = [{"max_norm": 0.05, "norm_type": p, "groups": GROUPS if grouped else []}
           for p in NORM_TYPES for grouped in (False, True)]
BF16_CONFIGS = [CONFIGS[3], CONFIGS[6]]  # p=2 per group, p=inf uniform
NAIVE_CONFIG = OFFLOAD_CONFIG = CONFIGS[3]  # p = 2, per group
OFFLOAD = {"zero_force_ds_cpu_optimizer": False,
           "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
STEPS, LR = 2, 0.2
NORM_RTOL = 1e-6  # distclip's (fp32) norms vs float64 on the same gradients
GRAD_RTOL = 1e-6  # clipped fp32 gradients vs float64, relative to each tensor's largest element
EXPERT = re.compile(r"deepspeed_experts\.(\d+)\.")


# ---------------------------------------------------------------- in-rank helpers
class MoENet(nn.Module):
    """Linear -> MoE (4 experts, ep_size 2, top-k) -> head; loss MSE + 0.01 * aux."""

    def __init__(self, k: int) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.embed = nn.Linear(IN, HIDDEN)
        expert = nn.Sequential(nn.Linear(HIDDEN, 11), nn.Tanh(), nn.Linear(11, HIDDEN))  # 195 elements: odd
        self.moe = MoE(HIDDEN, expert, num_experts=NUM_EXPERTS, ep_size=EP_SIZE, k=k, capacity_factor=2.0)
        self.head = nn.Linear(HIDDEN, 3)
        with torch.no_grad():  # tokens spread over all four experts
            self.embed.bias.zero_()
            self.moe.deepspeed_moe.gate.wg.weight.mul_(4.0)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x.to(self.embed.weight.dtype)))
        out, aux, _ = self.moe(h)
        pred = self.head(out).float()
        return nn.functional.mse_loss(pred, y) + 0.01 * aux.float()


def moe_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(MICRO, SEQ, IN, generator=g), torch.randn(MICRO, SEQ, 3, generator=g)


def new_moe_engine(stage: int, k: int, **ds_extra: Any):
    """A fresh MoE engine; every local expert perturbed differently (DeepSpeed then broadcasts them
    within their expert-data-parallel group), so that no two experts hold the same weights."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    torch.manual_seed(0)
    model = MoENet(k)
    with torch.no_grad():
        g = torch.Generator().manual_seed(100 + dist.get_rank())
        for p in model.moe.deepspeed_moe.experts.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "dense"})
    optimizer = torch.optim.SGD(groups, lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage, **ds_extra))
    return engine


def layout(engine) -> dict[str, Any]:
    """Which experts this rank holds: its expert-parallel rank, and the ranks holding the same experts."""
    return {"rank": dist.get_rank(), "ep_rank": dist.get_rank(engine.expert_parallel_group[EP_GROUP]),
            "holders": sorted(dist.get_process_group_ranks(engine.expert_data_parallel_group[EP_GROUP])),
            "local": NUM_EXPERTS // EP_SIZE}


def reduced_grads(engine) -> dict[str, torch.Tensor]:
    """Every parameter's reduced gradient as this rank sees it after backward (DeepSpeed's own accessor)."""
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p).detach().double().clone() for n, p in engine.module.named_parameters()
            if p.requires_grad}


def capture_clipped(engine) -> list[dict[str, tuple[int, torch.Tensor]]]:
    """Per optimizer step: ``name -> (first element, values)`` of the clipped fp32 gradient elements
    this rank steps with, read in a step pre-hook of the torch optimizer (after distclip has clipped)."""
    steps: list[dict[str, tuple[int, torch.Tensor]]] = []
    names = {id(p): n for n, p in engine.module.named_parameters()}
    if engine.zero_optimization_stage() == 0:
        def at_zero0(optimizer, _args, _kwargs):
            steps.append({names[id(p)]: (0, p.grad.detach().double().flatten().clone())
                          for group in optimizer.param_groups for p in group["params"] if p.grad is not None})

        engine.optimizer.register_step_pre_hook(at_zero0)
        return steps
    zero = engine.optimizer
    flats = zero.single_partition_of_fp32_groups

    def at_zero12(optimizer, _args, _kwargs):  # DeepSpeed steps one ZeRO parameter group at a time
        flat = optimizer.param_groups[0]["params"][0]
        i = next(i for i, f in enumerate(flats) if f is flat)
        if i == 0:
            steps.append({})
        for p in zero.bit16_groups[i]:
            mapping = p._hp_mapping
            if mapping is not None:
                hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
                steps[-1][names[id(p)]] = (lp.start, flat.grad[hp.start:hp.start + hp.numel].double().clone())

    zero.optimizer.register_step_pre_hook(at_zero12)
    return steps


def record(report) -> dict[str, Any]:
    return {"total": report.total_norm.double().item(),
            "groups": {k: v.double().item() for k, v in report.group_norms.items()},
            "coefs": {k: v.item() for k, v in report.coefs.items()}, "skipped": report.skipped}


def clipped_run(stage: int, k: int, config: dict[str, Any], **ds_extra: Any) -> dict[str, Any]:
    engine = new_moe_engine(stage, k, **ds_extra)
    clipper = distclip.deepspeed.attach(engine, config)
    counts = count_clip_collectives(clipper)
    clipped = capture_clipped(engine)
    steps = []
    for step in range(STEPS):
        engine.backward(engine(*moe_batch(step, dist.get_rank())))
        grads = reduced_grads(engine)
        engine.step()
        report = clipper.last_report
        assert_same_on_all_ranks(report.total_norm, *report.group_norms.values(), *report.coefs.values())
        steps.append({**record(report), "grads": grads, "ggn": engine.get_global_grad_norm().item()})
    for step, values in zip(steps, clipped, strict=True):
        step["clipped"] = values
    out = {"steps": steps, "collectives": counts, "clips": clipper.steps, "layout": layout(engine)}
    if stage > 0:  # parameters this rank holds only part of (split between two ranks' partitions)
        out["straddlers"] = sorted(n for n, p in engine.module.named_parameters()
                                   if p._hp_mapping is not None and p._hp_mapping.lp_fragment_address.numel < p.numel())
    close(engine)
    return out


def deepspeed_own_norm(stage: int, k: int) -> dict[str, Any]:
    """No distclip: DeepSpeed's own norm of one step (ZeRO-1/2: ``get_global_grad_norm``; ZeRO-0 reports
    none, so its ``clip_grad_norm_`` is called, on copies, as ``engine.step()`` would with clipping on)."""
    from deepspeed.runtime.utils import clip_grad_norm_

    engine = new_moe_engine(stage, k, gradient_clipping=1e9)
    engine.backward(engine(*moe_batch(0, dist.get_rank())))
    grads = reduced_grads(engine)
    if stage == 0:
        copies = [nn.Parameter(p.detach().clone()) for p in engine.module.parameters() if p.requires_grad]
        for c, p in zip(copies, [p for p in engine.module.parameters() if p.requires_grad]):
            c.grad = p.grad.detach().clone()
        norm = float(clip_grad_norm_(copies, max_norm=1e9))
    engine.step()
    if stage > 0:
        norm = float(engine.get_global_grad_norm())
    result = {"norm": norm, "grads": grads, "layout": layout(engine)}
    close(engine)
    return result


def naive_count(stage: int, k: int) -> dict[str, Any]:
    """Negative control: distclip with expert detection switched off (experts counted as replicated)."""
    import distclip.adapters.zero as adapter

    detect = adapter.is_expert_param
    adapter.is_expert_param = lambda param: False
    try:
        return clipped_run(stage, k, NAIVE_CONFIG)
    finally:
        adapter.is_expert_param = detect


def moe_checks(stages: tuple[int, ...], configs: list[dict[str, Any]], k: int, bf16: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    extra = {"bf16": {"enabled": True}} if bf16 else {}
    for stage in stages:
        out[stage] = {"runs": [clipped_run(stage, k, config, **extra) for config in configs]}
        if not bf16:
            out[stage]["deepspeed_own"] = deepspeed_own_norm(stage, k)
            if stage == 0:
                out[stage]["naive"] = naive_count(stage, k)
            if stage == 2:  # optimizer offload: the reduced gradients sit in the fp32 partitions
                out[stage]["offload"] = [clipped_run(stage, k, OFFLOAD_CONFIG, **OFFLOAD)]
    return out


# ------------------------------------------------------------- reconstruction
def global_name(name: str, where: dict[str, Any]) -> str:
    """The job-wide name of a parameter: local expert j of expert-parallel rank e is expert e * local + j."""
    return EXPERT.sub(lambda m: f"deepspeed_experts.{where['ep_rank'] * where['local'] + int(m.group(1))}.", name)


def full_gradients(per_rank: list[tuple[dict[str, Any], dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Every gradient of the job once: copies (data-parallel, or one expert's holders) must agree bitwise."""
    full: dict[str, torch.Tensor] = {}
    for where, grads in per_rank:
        for name, grad in grads.items():
            key = global_name(name, where)
            if key in full:
                assert torch.equal(full[key], grad), f"the copies of {key} differ (rank {where['rank']})"
            else:
                full[key] = grad
    experts = {int(m.group(1)) for key in full if (m := EXPERT.search(key))}
    assert experts == set(range(NUM_EXPERTS)), experts
    return full


def full_clipped(per_rank: list[tuple[dict[str, Any], dict[str, tuple[int, torch.Tensor]]]],
                 shapes: dict[str, torch.Size], partitioned: bool) -> dict[str, torch.Tensor]:
    """The clipped gradients assembled from the ranks: ZeRO-0 copies agree bitwise; ZeRO-1/2 fragments
    of one parameter's holders cover each of its elements exactly once."""
    values: dict[str, torch.Tensor] = {}
    cover: dict[str, torch.Tensor] = {}
    for where, fragments in per_rank:
        for name, (start, frag) in fragments.items():
            key = global_name(name, where)
            numel = shapes[key].numel()
            buf = values.setdefault(key, torch.zeros(numel, dtype=torch.float64))
            seen = cover.setdefault(key, torch.zeros(numel, dtype=torch.int64))
            part = slice(start, start + frag.numel())
            if partitioned or not seen[part].any():
                buf[part] = frag
            else:
                assert torch.equal(buf[part], frag), f"the copies of clipped {key} differ (rank {where['rank']})"
            seen[part] += 1
    for key, seen in cover.items():
        holders = 1 if partitioned else int(seen.max())
        assert bool((seen == holders).all()), f"{key}: elements held {seen.unique().tolist()} times"
    assert set(values) == set(shapes), set(shapes) ^ set(values)
    return {key: buf.reshape(shapes[key]) for key, buf in values.items()}


def check_run(results: list[dict[str, Any]], stage: int, config: dict[str, Any], index: int,
              kind: str = "runs") -> dict[str, float]:
    """One config's steps on every rank against the float64 reference; returns the largest errors."""
    worst = {"norm": 0.0, "grad": 0.0}
    for step in range(STEPS):
        runs = [res[stage][kind][index] for res in results]
        recs = [run["steps"][step] for run in runs]
        grads = full_gradients([(run["layout"], rec["grads"]) for run, rec in zip(runs, recs)])
        ref = reference_clip(grads, config)
        where = (len(results), stage, config["norm_type"], bool(config["groups"]), step)
        for rec in recs:  # identical on every rank (also checked bitwise in the ranks)
            assert (rec["total"], rec["groups"], rec["coefs"]) == (recs[0]["total"], recs[0]["groups"], recs[0]["coefs"])
            assert rec["ggn"] == rec["total"] and not rec["skipped"]
        errors = [rel_err(recs[0]["total"], ref["total"])]
        errors += [rel_err(recs[0]["groups"][g], v) if v != 0.0 else recs[0]["groups"][g] for g, v in ref["groups"].items()]
        assert max(errors) <= NORM_RTOL, (where, recs[0]["total"], ref["total"], recs[0]["groups"], ref["groups"])
        clipped = full_clipped([(run["layout"], rec["clipped"]) for run, rec in zip(runs, recs)],
                               {k: v.shape for k, v in grads.items()}, partitioned=stage > 0)
        for name, expected in ref["clipped"].items():
            assert_grad_close(clipped[name], expected, GRAD_RTOL)
            scale = expected.abs().max().item()
            if scale > 0:
                worst["grad"] = max(worst["grad"], (clipped[name] - expected).abs().max().item() / scale)
        worst["norm"] = max(worst["norm"], *errors)
    return worst


@functools.lru_cache(maxsize=None)
def moe_results(world: int, bf16: bool = False) -> list[dict[str, Any]]:
    if bf16:
        return run_ranks(moe_checks, world, (1, 2), BF16_CONFIGS, 1, True, timeout=420)
    return run_ranks(moe_checks, world, (0, 1, 2), CONFIGS, 1 if world == 2 else 2, timeout=600)


# ----------------------------------------------------------------------- tests
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_moe_norms_and_clipped_gradients_match_float64_reference(world, stage):
    """p in {1, 2, 3.5, inf}, uniform and per group (an experts-only group, a gate group, an empty one):
    norms rel 1e-6, clipped fp32 gradients rel 1e-6 of each tensor's scale, on every rank alike."""
    results = moe_results(world)
    layouts = [res[stage]["runs"][0]["layout"] for res in results]
    assert len({(w["ep_rank"], tuple(w["holders"])) for w in layouts}) == EP_SIZE  # experts really differ by rank
    assert all(len(w["holders"]) == world // EP_SIZE for w in layouts)
    first = [res[stage]["runs"][0] for res in results]
    grads = full_gradients([(run["layout"], run["steps"][0]["grads"]) for run in first])
    assert all(bool(g.any()) for name, g in grads.items() if EXPERT.search(name))  # every expert got tokens
    if stage > 0 and world == 4:  # experts partitioned over their 2 holders, one split between both
        straddlers = set.intersection(*(set(run["straddlers"]) for run in first))
        assert any(EXPERT.search(name) for name in straddlers), straddlers
    worst = [check_run(results, stage, config, i) for i, config in enumerate(CONFIGS)]
    assert any(c < 1.0 for res in results for run in res[stage]["runs"] for s in run["steps"] for c in s["coefs"].values())
    print(f"world {world} ZeRO-{stage}: max rel error norm {max(w['norm'] for w in worst):.2e}, "
          f"clipped grads {max(w['grad'] for w in worst):.2e}")


@pytest.mark.parametrize("world", [2, 4])
def test_moe_zero2_optimizer_offload_matches_float64_reference(world):
    results = moe_results(world)
    worst = check_run(results, 2, OFFLOAD_CONFIG, 0, kind="offload")
    assert all(res[2]["offload"][0]["collectives"] == [1] * STEPS for res in results)
    print(f"world {world} ZeRO-2 offload: max rel error norm {worst['norm']:.2e}, clipped grads {worst['grad']:.2e}")


@pytest.mark.parametrize("stage", [1, 2])
def test_moe_bf16_matches_float64_reference_of_the_reduced_gradients(stage):
    results = moe_results(2, bf16=True)
    worst = [check_run(results, stage, config, i) for i, config in enumerate(BF16_CONFIGS)]
    print(f"bf16 ZeRO-{stage}: max rel error norm {max(w['norm'] for w in worst):.2e}, "
          f"clipped grads {max(w['grad'] for w in worst):.2e}")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_moe_exactly_one_collective_per_clip(world, stage):
    for res in moe_results(world):
        for run in res[stage]["runs"]:
            assert run["collectives"] == [1] * STEPS and run["clips"] == STEPS


@pytest.mark.parametrize("world", [2, 4])
def test_negative_control_experts_counted_as_replicated_is_wrong(world):
    """Without expert detection (every parameter taken as replicated over the data-parallel group) the
    ZeRO-0 norm is still one all-reduce and the same on every rank, but not the norm of the job's
    gradients: each rank counts a slice of its own experts, so some experts' elements are missed."""
    results = moe_results(world)
    runs = [res[0]["naive"] for res in results]
    for step in range(STEPS):
        recs = [run["steps"][step] for run in runs]
        grads = full_gradients([(run["layout"], rec["grads"]) for run, rec in zip(runs, recs)])
        ref = reference_clip(grads, NAIVE_CONFIG)
        assert len({rec["total"] for rec in recs}) == 1 and runs[0]["collectives"] == [1] * STEPS
        naive = recs[0]
        total, experts = rel_err(naive["total"], ref["total"]), rel_err(naive["groups"]["experts"], ref["groups"]["experts"])
        print(f"world {world} step {step}: naive total {naive['total']:.6f} vs exact {ref['total']:.6f} (rel {total:.3f}); "
              f"experts group {naive['groups']['experts']:.6f} vs {ref['groups']['experts']:.6f} (rel {experts:.3f})")
        assert total > 1e-2 and experts > 0.1, (total, experts)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_own_norm_for_comparison(world, stage):
    """DeepSpeed's own L2 norm of a step, next to the reference of the same gradients: at ZeRO-1/2 it
    sums every partition over the data-parallel group, an independent check of the reference's
    reconstruction (agrees to fp32 rounding); at ZeRO-0 (``deepspeed.runtime.utils.clip_grad_norm_``)
    it averages the per-rank norms instead, which is only recorded here."""
    results = moe_results(world)
    own = [res[stage]["deepspeed_own"] for res in results]
    grads = full_gradients([(o["layout"], o["grads"]) for o in own])
    exact = reference_clip(grads, {"norm_type": 2.0})["total"]
    print(f"world {world} ZeRO-{stage}: DeepSpeed's own norm {own[0]['norm']:.6f} vs exact {exact:.6f} "
          f"(rel {rel_err(own[0]['norm'], exact):.2e})")
    if stage > 0:
        assert rel_err(own[0]["norm"], exact) <= NORM_RTOL


# ------------------------------------------- DeepSpeed's TestClipGradNorm.test_gather, ported
class GatherNet(nn.Module):
    """``test_gather``'s parameters inside an engine: ``param1`` (dense) and, per rank, the weight of that
    rank's one expert (an MoE layer with 2 experts over ep_size 2: a different expert on each rank)."""

    def __init__(self) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.param1 = nn.Parameter(torch.zeros(1))
        self.moe = MoE(1, nn.Linear(1, 1, bias=False), num_experts=2, ep_size=2)
        self.moe.deepspeed_moe.gate.wg.weight.requires_grad_(False)  # only test_gather's two parameters train


def gather_ranks() -> dict[str, Any]:
    """``param1.grad = [1]`` on both ranks, the expert's grad ``[rank + 1]`` (DeepSpeed's test: ``param2``
    with ``allreduce = False``), set after backward would have reduced them; then ``engine.step()``."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    from deepspeed.runtime.utils import clip_grad_norm_ as deepspeed_clip

    model = GatherNet()
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "dense"})
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(groups, lr=1.0), config=ds_config(0))
    clipper = distclip.deepspeed.attach(engine, {"max_norm": 0.1})
    counts = count_clip_collectives(clipper)
    clipped = capture_clipped(engine)
    param1, param2 = engine.module.param1, engine.module.moe.deepspeed_moe.experts.deepspeed_experts[0].weight
    param1.grad = torch.tensor([1.0])
    param2.grad = torch.tensor([[dist.get_rank() + 1.0]])

    def copies() -> list[nn.Parameter]:
        out = []
        for p in (param1, param2):
            c = nn.Parameter(p.detach().clone())
            c.grad = p.grad.detach().clone()
            out.append(c)
        out[1].allreduce = False
        return out

    deepspeed_norm = float(deepspeed_clip(copies(), max_norm=0.1))  # DeepSpeed's test, on copies
    bare = distclip.clip_grad_norm_(copies(), 0.1).item()  # bare tensors: rank-local (torch semantics)
    engine.step()
    report = clipper.last_report
    assert_same_on_all_ranks(report.total_norm, *report.coefs.values())
    result = {"total": report.total_norm.double().item(), "collectives": counts, "clipped": clipped[0],
              "layout": {"rank": dist.get_rank(), "ep_rank": dist.get_rank(engine.expert_parallel_group["ep_size_2"]),
                         "holders": sorted(dist.get_process_group_ranks(engine.expert_data_parallel_group["ep_size_2"])),
                         "local": 1},
              "deepspeed": deepspeed_norm, "bare": bare}
    close(engine)
    return result


def test_deepspeed_test_gather_through_the_engine():
    """DeepSpeed's ``test_gather`` (2 ranks): the dense gradient [1] is the same on both ranks, the
    expert gradients [1] and [2] belong to different experts, so the job's gradient is (1, 1, 2) and
    its norm sqrt(6) = 2.4495, the same bitwise on both ranks. DeepSpeed's ``clip_grad_norm_`` returns
    the mean of the two per-rank norms, (sqrt(2) + sqrt(5)) / 2 = 1.8251: equal on both ranks, which
    is all its test asserts, but not this norm. distclip's functional API on bare tensors is rank-local
    (1.4142 and 2.2361): bare tensors carry no layout, so the engine is the honest equivalent."""
    results = run_ranks(gather_ranks, 2, timeout=180)
    exact = math.sqrt(1.0 + 1.0 + 4.0)
    coef = 0.1 / (exact + 1e-6)
    assert [r["total"] for r in results] == [results[0]["total"]] * 2
    assert rel_err(results[0]["total"], exact) <= NORM_RTOL, results[0]["total"]
    assert all(r["collectives"] == [1] for r in results)
    expert = "moe.deepspeed_moe.experts.deepspeed_experts.{}.weight"
    shapes = {"param1": torch.Size([1]), expert.format(0): torch.Size([1, 1]), expert.format(1): torch.Size([1, 1])}
    clipped = full_clipped([(r["layout"], r["clipped"]) for r in results], shapes, partitioned=False)
    expected = {"param1": 1.0 * coef, expert.format(0): 1.0 * coef, expert.format(1): 2.0 * coef}
    for name, value in expected.items():
        assert rel_err(clipped[name].item(), value) <= GRAD_RTOL, (name, clipped[name].item(), value)
    print(f"test_gather: distclip {[r['total'] for r in results]} (exact {exact:.6f}); DeepSpeed's clip_grad_norm_ "
          f"{[r['deepspeed'] for r in results]}; distclip on bare tensors {[r['bare'] for r in results]}")


# ------------------------------------------------------------------------ refusals
def refusal_checks() -> dict[str, str | None]:
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    out: dict[str, str | None] = {}
    engine = new_moe_engine(0, 1)
    expert = next(p for p in engine.module.parameters() if getattr(p, "allreduce", True) is False)
    expert.group_name = "ep_size_7"
    out["unknown_group"] = error_of(lambda: distclip.deepspeed.attach(engine))
    close(engine)

    torch.manual_seed(0)
    model = MoENet(1)
    dense, moe = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "dense"})
    dense["params"].append(moe["params"].pop())  # an expert in the dense group: DeepSpeed partitions it over all ranks
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD([dense, moe], lr=LR), config=ds_config(2))
    out["expert_in_dense_group"] = error_of(lambda: distclip.deepspeed.attach(engine))
    close(engine)
    return out


@functools.lru_cache(maxsize=None)
def refusal_results() -> list[dict[str, str | None]]:
    return run_ranks(refusal_checks, 2, timeout=180)


def test_unsupported_moe_layouts_are_refused_with_what_is_wrong():
    for r in refusal_results():
        assert r["unknown_group"].startswith("UnsupportedDeepSpeedSetup"), r["unknown_group"]
        assert "['ep_size_7']" in r["unknown_group"] and "expert-data-parallel group" in r["unknown_group"]
        assert r["expert_in_dense_group"].startswith("UnsupportedDeepSpeedSetup"), r["expert_in_dense_group"]
        assert "group 0 mixes expert parameters" in r["expert_in_dense_group"]
        assert "split_params_into_different_moe_groups_for_optimizer" in r["expert_in_dense_group"]
