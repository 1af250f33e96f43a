"""``policy: {kind: agc}``: row-wise adaptive gradient clipping, exact under every sharding.

The reference is timm's ``adaptive_clip_grad`` (ported verbatim in :mod:`tests.helpers.timm_agc`), applied
in float64 to the full gradients and parameters: single process on every norm type, and on 2
gloo ranks for DDP, FSDP2, FSDP1 (flat shards splitting rows) and DeepSpeed ZeRO 0-3, gathered
and compared; coefficients bitwise equal on every rank; one collective per clip.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.distributed.tensor.debug import CommDebugMode

import distclip
from distclip.core.config import ConfigError
from distclip.testing import run_ranks
from tests.helpers import REPO
from tests.helpers.timm_agc import adaptive_clip_grad, unitwise_norm

ROOT = REPO
NORM_TYPES = [1.0, 2.0, 3.5, math.inf]  # timm passes any p to torch.norm; distclip takes p > 0 and inf
CLIP_FACTOR, EPS, LOSS_SCALE = 0.015, 1e-3, 0.01  # some rows clipped, some not (asserted)
GRAD_RTOL = 2e-6  # distclip in fp32 vs timm in float64 on the same gradients, relative to each tensor's scale


def agc(p: float = 2.0, **extra: Any) -> dict[str, Any]:
    return {"norm_type": p, "policy": {"kind": "agc", "clip_factor": CLIP_FACTOR, "eps": EPS}, **extra}


class AGCNet(nn.Module):
    """Conv2d (5 filters of 18 elements), Linear 80 -> 7 (7 rows: no world size of 2 divides it), LayerNorm,
    Linear 7 -> 3, their biases, and a 0-d ``scale`` (1-D for DeepSpeed, which refuses 0-d parameters). About
    700 elements: 2-rank shards split rows."""

    def __init__(self, scalar: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 5, 3, padding=1)
        self.fc1 = nn.Linear(80, 7)
        self.norm = nn.LayerNorm(7)
        self.fc2 = nn.Linear(7, 3)
        self.scale = nn.Parameter(torch.tensor(1.5) if scalar else torch.tensor([1.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.fc2(torch.tanh(self.norm(self.fc1(h)))) * self.scale


def make_net(dtype: torch.dtype = torch.float32, scalar: bool = True) -> AGCNet:
    torch.manual_seed(0)
    return AGCNet(scalar).to(dtype)


def data(step: int, rank: int, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7919 * step + rank)
    return torch.randn(size, 2, 4, 4, generator=g), torch.randn(size, 3, generator=g)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return LOSS_SCALE * nn.functional.mse_loss(model(x), y)


def timm_clip(grads: dict[str, torch.Tensor], params: dict[str, torch.Tensor], p: float,
              names: set[str] | None = None, clip_factor: float = CLIP_FACTOR) -> dict[str, torch.Tensor]:
    """timm's adaptive_clip_grad in float64 on these gradients and parameters (only ``names``, when given)."""
    out = {}
    for name, g in grads.items():
        w = params[name].detach().double().clone()
        w.grad = g.detach().double().clone()
        if names is None or name in names:
            adaptive_clip_grad([w], clip_factor, EPS, p)
        out[name] = w.grad
    return out


def timm_ratios(grads: dict[str, torch.Tensor], params: dict[str, torch.Tensor], p: float) -> torch.Tensor:
    """||G_i|| / max(||W_i||, eps) of every row (to check that some clip and some do not)."""
    return torch.cat([(unitwise_norm(grads[n].double(), p) / unitwise_norm(params[n].double(), p).clamp(min=EPS)).flatten()
                      for n in grads])


def timm_coefs(grads: dict[str, torch.Tensor], params: dict[str, torch.Tensor], p: float,
               clip_factor: float = CLIP_FACTOR) -> torch.Tensor:
    """Every row's coefficient by timm's rule (float64), parameters in name order, rows in order: the order
    distclip documents for ``ClipReport.row_coefs``."""
    out = []
    for name in sorted(grads):
        max_norm = unitwise_norm(params[name].double(), p).clamp(min=EPS) * clip_factor
        grad_norm = unitwise_norm(grads[name].double(), p)
        out.append(torch.where(grad_norm < max_norm, 1.0, max_norm / grad_norm.clamp(min=1e-6)).flatten())
    return torch.cat(out)


def reference(world: int, p: float, step: int = 0, scalar: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(gradients, parameters) in float64, one process, on every rank's batch (the mean loss ranks average)."""
    model = make_net(torch.float64, scalar)
    xs, ys = zip(*(data(step, r) for r in range(world)))
    loss_of(model, torch.cat(xs).double(), torch.cat(ys).double()).backward()
    return ({n: q.grad.detach().clone() for n, q in model.named_parameters()},
            {n: q.detach().clone() for n, q in model.named_parameters()})


def max_rel_err(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """The largest elementwise error of any tensor, relative to that tensor's largest element."""
    assert set(actual) == set(expected), sorted(set(actual) ^ set(expected))
    return max(((actual[n].double() - expected[n]).abs().max() / expected[n].abs().max().clamp(min=1e-30)).item()
               for n in expected)


# ------------------------------------------------------------------ single process
def test_hand_checkable_value():
    """adaptive.md: W=[[3,4],[0,0]], G=[[30,40],[1,0]], clip_factor 0.01 -> [[0.03,0.04],[1e-5,0]]."""
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    layer.weight.grad = torch.tensor([[30.0, 40.0], [1.0, 0.0]])
    report = distclip.GradClipper(layer, {"policy": {"kind": "agc", "clip_factor": 0.01, "eps": 1e-3}}).clip()
    torch.testing.assert_close(layer.weight.grad, torch.tensor([[0.03, 0.04], [1e-5, 0.0]]), rtol=1e-6, atol=0)
    # row 0: ||G|| 50 > 0.01 * 5 -> 0.05 / 50; row 1: ||W|| 0 -> eps, 0.01 * 1e-3 / 1
    torch.testing.assert_close(report.row_coefs, torch.tensor([1e-3, 1e-5]), rtol=1e-6, atol=0)
    assert report.coefs["default"].item() == pytest.approx(1e-5, rel=1e-6)  # the smallest row coefficient
    assert report.thresholds["default"].item() == pytest.approx(0.01)  # the clip factor
    assert report.group_norms["default"].item() == pytest.approx(math.sqrt(2501), rel=1e-6)  # still measured


@pytest.mark.parametrize("p", NORM_TYPES)
def test_matches_timm_single_process(p):
    model, ref = make_net(), make_net(torch.float64)
    x, y = data(0, 0, size=8)
    loss_of(model, x, y).backward()
    loss_of(ref, x.double(), y.double()).backward()
    grads = {n: q.grad.detach().double().clone() for n, q in model.named_parameters()}
    params = {n: q.detach().double().clone() for n, q in model.named_parameters()}
    ratios = timm_ratios(grads, params, p)
    assert (ratios > CLIP_FACTOR).any() and (ratios < CLIP_FACTOR).any(), ratios  # a real mix
    report = distclip.GradClipper(model, agc(p)).clip()
    clipped = {n: q.grad for n, q in model.named_parameters()}
    # the same fp32 gradients through timm in float64: only distclip's fp32 arithmetic differs
    assert max_rel_err(clipped, timm_clip(grads, params, p)) <= GRAD_RTOL
    # and an independent float64 run of the whole step
    ref_grads = {n: q.grad for n, q in ref.named_parameters()}
    assert max_rel_err(clipped, timm_clip(ref_grads, {n: q.detach() for n, q in ref.named_parameters()}, p)) <= 1e-5
    assert report.row_coefs.numel() == 5 + 1 + 7 + 1 + 1 + 1 + 3 + 1 + 1  # rows of conv, fc1, fc2; 1-D and 0-d whole


def test_negative_control_one_row_per_tensor_is_not_agc():
    """The test can fail: clipping each whole tensor against its whole norm (no rows) differs from timm."""
    model = make_net()
    loss_of(model, *data(0, 0, size=8)).backward()
    grads = {n: q.grad.detach().double().clone() for n, q in model.named_parameters()}
    params = {n: q.detach().double().clone() for n, q in model.named_parameters()}
    for q in model.parameters():  # per tensor: max_norm = clip_factor * max(||W||, eps)
        max_norm = q.detach().norm().clamp(min=EPS) * CLIP_FACTOR
        q.grad.mul_(torch.where(q.grad.norm() < max_norm, 1.0, max_norm / q.grad.norm().clamp(min=1e-6)))
    assert max_rel_err({n: q.grad for n, q in model.named_parameters()}, timm_clip(grads, params, 2.0)) > 0.05


def test_per_group_agc_beside_fixed():
    """One agc group (its norm still measured), one fixed group, default fixed: each clipped its own way."""
    config = {"max_norm": 0.01, "groups": [
        {"name": "weights", "match": ["conv.weight", "fc*.weight"], "policy": {"kind": "agc", "clip_factor": CLIP_FACTOR}},
        {"name": "norm", "match": ["norm.*"], "max_norm": 0.002}]}
    model = make_net()
    loss_of(model, *data(0, 0, size=8)).backward()
    grads = {n: q.grad.detach().double().clone() for n, q in model.named_parameters()}
    params = {n: q.detach().double().clone() for n, q in model.named_parameters()}
    report = distclip.GradClipper(model, config).clip()
    agc_names = {"conv.weight", "fc1.weight", "fc2.weight"}
    expected = timm_clip(grads, params, 2.0, names=agc_names)
    for group, names, max_norm in (("norm", {"norm.weight", "norm.bias"}, 0.002),
                                   ("default", set(grads) - agc_names - {"norm.weight", "norm.bias"}, 0.01)):
        norm = torch.cat([grads[n].flatten() for n in names]).norm().item()
        assert report.group_norms[group].item() == pytest.approx(norm, rel=1e-6)
        assert norm > max_norm  # clipped
        for n in names:
            expected[n] = grads[n] * (max_norm / (norm + 1e-6))
    assert max_rel_err({n: q.grad for n, q in model.named_parameters()}, expected) <= GRAD_RTOL
    weights_norm = torch.cat([grads[n].flatten() for n in agc_names]).norm().item()
    assert report.group_norms["weights"].item() == pytest.approx(weights_norm, rel=1e-6)
    assert report.thresholds["weights"].item() == pytest.approx(CLIP_FACTOR)
    assert report.coefs["weights"].item() == pytest.approx(report.row_coefs.min().item())
    assert report.row_coefs.numel() == 5 + 7 + 3


def test_attach_clips_before_every_step():
    """attach(optimizer) with agc: two SGD steps equal timm + SGD in float64, and nothing folds into a fused AdamW."""
    model, ref = make_net(), make_net(torch.float64)
    clipper = distclip.GradClipper(model, agc())
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1.0)
    clipper.attach(optimizer)
    for step in range(2):
        x, y = data(step, 0, size=8)
        loss_of(model, x, y).backward()
        optimizer.step()
        optimizer.zero_grad()
        loss_of(ref, x.double(), y.double()).backward()
        adaptive_clip_grad(ref.parameters(), CLIP_FACTOR, EPS, 2.0)
        ref_opt.step()
        ref_opt.zero_grad()
        assert clipper.last_report.coefs["default"].item() < 1.0
    got = {n: q.detach() for n, q in model.named_parameters()}
    assert max_rel_err(got, {n: q.detach() for n, q in ref.named_parameters()}) <= 1e-5
    fused = torch.optim.AdamW(make_net().parameters(), fused=True)
    with pytest.raises(ConfigError, match="row-wise"):
        distclip.GradClipper(make_net(), agc()).attach(fused, fold=True)


def test_missing_gradients_and_non_contiguous_gradients():
    """A parameter without a gradient is left alone; a transposed (non-contiguous) gradient is scaled row-wise."""
    model = make_net()
    loss_of(model, *data(0, 0, size=8)).backward()
    model.fc2.bias.grad = None
    model.fc1.weight.grad = model.fc1.weight.grad.t().contiguous().t()  # same values, column-major strides
    assert not model.fc1.weight.grad.is_contiguous()
    grads = {n: q.grad.detach().double().clone() for n, q in model.named_parameters() if q.grad is not None}
    params = {n: q.detach().double().clone() for n, q in model.named_parameters()}
    distclip.GradClipper(model, agc()).clip()
    assert model.fc2.bias.grad is None
    got = {n: q.grad for n, q in model.named_parameters() if q.grad is not None}
    assert max_rel_err(got, timm_clip(grads, params, 2.0)) <= GRAD_RTOL


@pytest.mark.parametrize("p", [2.0, math.inf])
def test_nonfinite_gradient_skips_the_step(p):
    """A NaN in one gradient element of an agc group: the (row-derived) group norm is NaN, the step is skipped."""
    model = make_net()
    loss_of(model, *data(0, 0, size=8)).backward()
    model.fc1.weight.grad[3, 5] = math.nan
    report = distclip.GradClipper(model, agc(p)).clip()
    assert report.skipped and report.skip_reason == "nonfinite"
    assert math.isnan(report.group_norms["default"].item())
    assert all(q.grad is None for q in model.parameters())


def test_group_norm_of_an_agc_group_is_its_norm():
    """The group norm of a row-wise group (taken from its rows' sums) is the group's norm; in another p
    than the config's (its own slots), too."""
    for config, group, p in ((agc(2.0), "default", 2.0), (agc(math.inf), "default", math.inf),
                             ({"groups": [{"name": "w", "match": "*.weight", "norm_type": 3.0, "policy": {"kind": "agc"}}]},
                              "w", 3.0)):
        model = make_net()
        loss_of(model, *data(0, 0, size=8)).backward()
        names = [n for n, _ in model.named_parameters() if group == "default" or n.endswith(".weight")]
        grads = dict(model.named_parameters())
        expected = torch.cat([grads[n].grad.double().flatten() for n in names]).norm(p).item()
        report = distclip.GradClipper(model, config).measure()
        assert report.group_norms[group].item() == pytest.approx(expected, rel=1e-6), (config, group)


def test_config_section():
    cfg = distclip.ClipConfig.from_dict({"policy": {"kind": "agc"}})
    assert (cfg.policy.clip_factor, cfg.policy.eps) == (0.01, 1e-3)  # the paper's lambda, timm's eps
    for bad in ({"clip_factor": 0}, {"eps": -1.0}, {"clip_factor": True}, {"lambda": 0.01}):
        with pytest.raises(ConfigError):
            distclip.ClipConfig.from_dict({"policy": {"kind": "agc", **bad}})
    group = distclip.ClipConfig.from_dict({"groups": [{"name": "w", "match": "*.weight", "policy": {"kind": "agc"}}]})
    assert group.groups[0].policy.kind == "agc"


# ------------------------------------------------------------------ 2 ranks: torch layouts
def full_dtensor(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().double().clone()


def fsdp1_full(model: nn.Module, grads: bool) -> dict[str, torch.Tensor]:
    """Full gradients (or parameters) of an FSDP1 model, gathered from every rank's shard pieces."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from distclip.core.names import canonical_name
    from tests.helpers.fsdp_helpers import all_pieces

    pieces = []
    for prefix, unit in model.named_modules():
        if not isinstance(unit, FSDP) or unit._handle is None:
            continue
        flat = unit._handle.flat_param
        for k, (fqn, info, shape) in enumerate(zip(flat._fqns, flat._shard_param_infos, flat._shapes)):
            if not info.in_shard:
                continue
            a, n = info.offset_in_shard, info.numel_in_shard
            if grads:
                values = flat._params[k].grad.reshape(-1) if unit._handle._use_orig_params else flat.grad[a : a + n]
            else:
                values = flat._local_shard[a : a + n]
            pieces.append((canonical_name(f"{prefix}.{fqn}" if prefix else fqn), info.intra_param_start_idx, values,
                           tuple(shape)))
    return all_pieces(pieces)


def build_layout(name: str):
    """(module, clipper target, full gradients(), full parameters(), plain params to average by hand)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_net()
    if name == "ddp":
        ddp = DDP(model)
        full = lambda: {n: q.grad.detach().double().clone() for n, q in model.named_parameters()}
        values = lambda: {n: q.detach().double().clone() for n, q in model.named_parameters()}
        return ddp, ddp, full, values, []
    if name == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (2,)), ignored_params={model.scale})  # no 0-d in FSDP2
        full = lambda: {n: full_dtensor(q.grad) for n, q in model.named_parameters()}
        values = lambda: {n: full_dtensor(q) for n, q in model.named_parameters()}
        return model, model, full, values, [model.scale]
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    kwargs = {"device_id": torch.device("cpu"), "use_orig_params": name.endswith("orig_params"),
              "sharding_strategy": ShardingStrategy.FULL_SHARD}
    model.fc1 = FSDP(model.fc1, **kwargs)  # two units: fc1's flat shard and the root's both split rows
    fsdp = FSDP(model, ignored_states=[model.scale], **kwargs)  # no 0-d in FSDP1: left to the user, replicated
    scale = lambda t: {"scale": t.detach().double().clone()}
    return (fsdp, fsdp, lambda: {**fsdp1_full(fsdp, True), **scale(model.scale.grad)},
            lambda: {**fsdp1_full(fsdp, False), **scale(model.scale)}, [model.scale])


def gathered_equal(t: torch.Tensor) -> bool:
    """Bitwise equal on every rank."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return all(torch.equal(o, out[0]) for o in out)


def clip_layout(name: str, config: dict[str, Any]) -> dict[str, Any]:
    module, target, full_grads, full_params, plain = build_layout(name)
    clipper = distclip.GradClipper(target, config)
    loss_of(module, *data(0, dist.get_rank())).backward()
    for q in plain:  # parameters FSDP does not manage: averaged by the user, as DDP would
        dist.all_reduce(q.grad)
        q.grad.div_(dist.get_world_size())
    pre, params = full_grads(), full_params()
    measured = distclip.GradClipper(target, {**config, "comm_hook": False}).measure()  # the post-backward path
    with CommDebugMode() as comm:
        report = clipper.clip()
    return {"pre": pre, "params": params, "post": full_grads(), "collectives": comm.get_total_counts(),
            "row_coefs": report.row_coefs.clone(), "coefs_equal": gathered_equal(report.row_coefs),
            "coefs": {k: v.item() for k, v in report.coefs.items()}, "source": report.source,
            "groups": {k: v.item() for k, v in report.group_norms.items()}, "total": report.total_norm.item(),
            "post_backward": (measured.source, {k: v.item() for k, v in measured.group_norms.items()},
                              measured.row_coefs.clone()),
            **row_layout(clipper.adapter)}


def row_layout(adapter) -> dict[str, Any]:
    """How this rank's counted pieces meet the rows: do some start or end inside a row of a multi-row
    parameter, and how many elements of each parameter this rank counts (what the test asserts it exercised)."""
    plan, spans = adapter.row_plan, adapter._row_count_map.spans
    blocks = {s.param: plan.by_param[s.param] for s in spans}
    split = any(b.rows > 1 and (s.offset % b.row_size or s.numel % b.row_size) for s, b in ((s, blocks[s.param]) for s in spans))
    counted: dict[str, int] = {}
    for s in spans:
        counted[blocks[s.param].name] = counted.get(blocks[s.param].name, 0) + s.numel
    return {"splits_rows": split, "counted": counted}


def timm_on_local_shards() -> dict[str, torch.Tensor]:
    """Negative control: timm's function on an FSDP1 model's local (1-D, flat-shard) parameters, as a user
    calling it on ``model.parameters()`` would: each rank's row pieces and shard pieces, normed alone."""
    module, _, full_grads, _, _ = build_layout("fsdp1_orig_params")
    loss_of(module, *data(0, dist.get_rank())).backward()
    adaptive_clip_grad([q for q in module.parameters() if q.grad is not None], CLIP_FACTOR, EPS, 2.0)
    return full_grads()


PER_GROUP_FACTOR = 0.03  # the infinity-norm ratios of this model are larger: still a mix of clipped and not
PER_GROUP = {"max_norm": 0.01, "norm_type": 2.0, "groups": [  # agc in p = inf beside p = 2: a mixed slot vector
    {"name": "rows", "match": ["conv.*", "fc1.*"], "norm_type": "inf",
     "policy": {"kind": "agc", "clip_factor": PER_GROUP_FACTOR, "eps": EPS}},
    {"name": "head", "match": ["fc2.*"], "max_norm": 0.002}]}
TORCH_LAYOUTS = ["ddp", "fsdp2", "fsdp1", "fsdp1_orig_params"]
TORCH_RUNS = [(layout, p) for layout in TORCH_LAYOUTS for p in (2.0, math.inf)] + [("fsdp1", "per_group")]


def torch_layout_checks() -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for layout, p in TORCH_RUNS:
        out[(layout, p)] = clip_layout(layout, PER_GROUP if p == "per_group" else agc(p))
    out["negative"] = timm_on_local_shards()
    out["host"] = host_sync_counts()
    out["refusals"] = refusals()
    return out


def host_sync_counts() -> dict[str, Any]:
    """After warm-up, the agc clip builds no tensor from host data; with nonfinite: ignore it never syncs."""
    from tests.helpers.host_sync import count_distclip_calls

    out = {}
    for layout in ("ddp", "fsdp2", "fsdp1"):
        for mode in ("ignore", "skip"):
            module, target, _, _, plain = build_layout(layout)
            optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
            distclip.GradClipper(target, agc(nonfinite=mode)).attach(optimizer)
            for step in range(5):  # two warm-up steps: plans, device constants, DDP's bucket rebuild
                with count_distclip_calls() as seen:
                    loss_of(module, *data(step, dist.get_rank())).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if step >= 2:
                    out.setdefault((layout, mode), []).append(dict(seen))
    return out


def refusals() -> dict[str, str]:
    """What row-wise clipping refuses, with the message it gives."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    out = {}
    model = make_net()
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)), ignored_params={model.scale},
                shard_placement_fn=lambda q: Shard(1) if q.ndim >= 2 and q.shape[1] % 2 == 0 else None)  # rows split
    for key, cfg in (("shard1", agc()), ("shard1_other_policy", {"groups": [
            {"name": "vectors", "match": ["*.bias", "norm.*", "scale"], "policy": {"kind": "agc"}}]})):
        try:
            distclip.GradClipper(model, cfg)
            out[key] = "accepted"
        except ConfigError as err:
            out[key] = str(err)
    try:
        distclip.GradClipper(make_net(), agc(), pipeline_group=dist.group.WORLD)
        out["pipeline"] = "accepted"
    except ConfigError as err:
        out["pipeline"] = str(err)
    return out


@functools.lru_cache(maxsize=None)
def torch_results() -> dict[Any, Any]:
    results = run_ranks(torch_layout_checks, 2, timeout=500)
    return results


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout, p", TORCH_RUNS, ids=[f"{layout}-p{p}" for layout, p in TORCH_RUNS])
def test_two_ranks_match_timm(layout, p):
    ranks = torch_results()
    rec = ranks[0][(layout, p)]
    norm_type = 2.0 if p == "per_group" else p
    agc_names = None if p != "per_group" else {n for n in rec["pre"] if n.startswith(("conv.", "fc1."))}
    # what the ranks hold, through timm in float64 (the per-group run: agc in p = inf on its group only)
    expected = (timm_clip(rec["pre"], rec["params"], norm_type) if p != "per_group" else
                timm_clip(rec["pre"], rec["params"], math.inf, names=agc_names, clip_factor=PER_GROUP_FACTOR))
    if p == "per_group":  # the fixed groups, the plain way
        for names, max_norm in (({"fc2.weight", "fc2.bias"}, 0.002), ({"norm.weight", "norm.bias", "scale"}, 0.01)):
            norm = torch.cat([rec["pre"][n].flatten() for n in names]).norm().item()
            for n in names:
                expected[n] = rec["pre"][n] * min(1.0, max_norm / (norm + 1e-6))
    err = max_rel_err(rec["post"], expected)
    print(f"agc {layout} p={p}: max error vs timm on the gathered float64 gradients {err:.2e}")
    assert err <= GRAD_RTOL, (layout, p, err)
    for r in ranks:  # every rank ends with the same full gradients, and the same coefficients bitwise
        assert r[(layout, p)]["coefs_equal"]
        assert torch.equal(r[(layout, p)]["row_coefs"], rec["row_coefs"])
        assert r[(layout, p)]["collectives"] == 1, (layout, p, r[(layout, p)]["collectives"])
    coefs = rec["row_coefs"]
    assert (coefs < 1).any() and (coefs == 1).any(), coefs  # some rows clipped, some not
    if p != "per_group":  # the norms are still measured, exactly
        flat = torch.cat([g.flatten() for g in rec["pre"].values()])
        assert rec["groups"]["default"] == pytest.approx(flat.norm(norm_type).item(), rel=1e-6)
        assert rec["total"] == pytest.approx(flat.norm(norm_type).item(), rel=1e-6)
    else:
        flat = torch.cat([rec["pre"][n].flatten() for n in sorted(agc_names)])
        assert rec["groups"]["rows"] == pytest.approx(flat.norm(math.inf).item(), rel=1e-6)
    source, groups, post_coefs = rec["post_backward"]  # the same from the post-backward path (group norms
    assert source == "post_backward" and torch.equal(post_coefs, coefs)  # of agc groups from their rows)
    assert all(groups[k] == pytest.approx(v, rel=1e-6) for k, v in rec["groups"].items()), (groups, rec["groups"])
    factor = PER_GROUP_FACTOR if p == "per_group" else CLIP_FACTOR
    pre = {n: g for n, g in rec["pre"].items() if agc_names is None or n in agc_names}
    torch.testing.assert_close(coefs.double(), timm_coefs(pre, rec["params"], math.inf if p == "per_group" else p, factor),
                               rtol=1e-6, atol=0)  # in the documented order
    # the layout really is what this test is about
    if layout == "fsdp2":  # whole rows on each rank, 7 rows of fc1 as 4 + 3, 1-D parameters split
        assert not any(r[(layout, p)]["splits_rows"] for r in ranks)
        assert sorted(r[(layout, p)]["counted"]["fc1.weight"] for r in ranks) == [3 * 80, 4 * 80]
        assert sorted(r[(layout, p)]["counted"]["fc1.bias"] for r in ranks) == [3, 4]
    else:  # DDP's 1/world slices and FSDP1's flat shards start and end inside rows
        assert any(r[(layout, p)]["splits_rows"] for r in ranks)
    if p != "per_group":  # against an independent float64 run of the same step on all ranks' data
        ref_grads, ref_params = reference(2, norm_type)
        independent = max_rel_err(rec["post"], timm_clip(ref_grads, ref_params, norm_type))
        print(f"agc {layout} p={p}: max error vs an independent float64 step {independent:.2e}")
        assert independent <= 1e-5


@pytest.mark.multiprocess
def test_negative_control_timm_on_fsdp1_local_shards_is_wrong():
    ranks = torch_results()
    rec = ranks[0][("fsdp1_orig_params", 2.0)]
    wrong = max_rel_err(ranks[0]["negative"], timm_clip(rec["pre"], rec["params"], 2.0))
    print(f"agc negative control (timm on FSDP1 local shards): max error {wrong:.2e}")
    assert wrong > 0.05


@pytest.mark.multiprocess
def test_no_host_tensors_on_the_agc_path():
    for r in torch_results():
        for (layout, mode), steps in r["host"].items():
            for counts in steps:
                built = {k: v for k, v in counts.items() if k in ("torch.tensor", "torch.as_tensor")}
                assert not built, (layout, mode, built)
                syncs = {k: v for k, v in counts.items() if k not in built}
                assert syncs == ({} if mode == "ignore" else {"Tensor.tolist": 1}), (layout, mode, syncs)


@pytest.mark.multiprocess
def test_refused_layouts_say_what_is_supported():
    out = torch_results()[0]["refusals"]
    assert "'conv.weight'" in out["shard1"] and "Shard(1)" in out["shard1"] and "Shard(0)" in out["shard1"]
    assert out["shard1_other_policy"] == "accepted"  # the sharded weights are not clipped row-wise there
    assert "pipeline" in out["pipeline"]


# ------------------------------------------------------------------ 2 ranks: DeepSpeed
DS_STAGES = [0, 1, 2, 3, "2-offload", "3-offload"]  # offload: the reduced gradients sit in the fp32 partitions
DS_LR = 100.0  # large updates: the clipped gradient is (before - after) / lr, read to fp32 precision


def deepspeed_checks() -> dict[Any, Any]:
    import deepspeed

    from tests.helpers.deepspeed import count_clip_collectives, full_params

    out: dict[Any, Any] = {}
    for stage in DS_STAGES:
        for p in (2.0, math.inf):
            model = make_net(scalar=False)
            optimizer = torch.optim.SGD(model.parameters(), lr=DS_LR)
            zero = {"stage": int(str(stage)[0])}
            offload = {"zero_force_ds_cpu_optimizer": False} if str(stage).endswith("offload") else {}
            if offload:
                zero["offload_optimizer"] = {"device": "cpu"}
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
                "train_micro_batch_size_per_gpu": 4, "zero_optimization": zero,
                "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, **offload})
            if offload:
                opt = engine.optimizer
                assert getattr(opt, "cpu_offload", False) or getattr(opt, "offload_optimizer", False)
            clipper = distclip.deepspeed.attach(engine, agc(p))
            counts = count_clip_collectives(clipper)
            before = full_params(engine)
            engine.backward(loss_of(engine, *data(0, dist.get_rank())))
            engine.step()
            after = full_params(engine)
            report = clipper.last_report
            out[(stage, p)] = {"update": {n: (before[n] - after[n]) / DS_LR for n in before}, "params": before,
                               "collectives": counts, "row_coefs": report.row_coefs.clone(),
                               "coefs_equal": gathered_equal(report.row_coefs), "skipped": report.skipped,
                               "norm": report.group_norms["default"].item(), **row_layout(clipper.adapter)}
            engine.destroy()
    out["fp16"] = fp16_zero2()
    return out


def fp16_zero2() -> dict[str, Any]:
    """fp16 ZeRO-2: the counted gradients carry the loss scale (256), the fp32 master parameters none."""
    import deepspeed

    from tests.helpers.deepspeed import full_params, precision

    model = make_net(scalar=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=DS_LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9, **precision("fp16")})
    clipper = distclip.deepspeed.attach(engine, agc())
    scale = float(engine.optimizer.loss_scale)
    before = full_params(engine)
    engine.backward(loss_of(engine, *(t.half() for t in data(0, dist.get_rank()))))
    engine.step()
    after = full_params(engine)
    report = clipper.last_report
    out = {"loss_scale": scale, "row_coefs": report.row_coefs.clone(), "params": before, "skipped": report.skipped,
           "update": {n: (before[n] - after[n]) / DS_LR for n in before}}
    engine.destroy()
    return out


@functools.lru_cache(maxsize=None)
def deepspeed_results() -> list[dict[Any, Any]]:
    return run_ranks(deepspeed_checks, 2, timeout=600, env={"DS_ACCELERATOR": "cpu"})


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", DS_STAGES)
@pytest.mark.parametrize("p", [2.0, math.inf])
def test_deepspeed_matches_timm(stage, p, deepspeed_ops):
    ranks = deepspeed_results()
    rec = ranks[0][(stage, p)]
    ref_grads, ref_params = reference(2, p, scalar=False)
    for n in ref_params:  # the engine started from the same weights
        torch.testing.assert_close(rec["params"][n], ref_params[n], rtol=0, atol=1e-7)
    err = max_rel_err(rec["update"], timm_clip(ref_grads, ref_params, p))
    print(f"agc ZeRO-{stage} p={p}: max error of the update vs timm + SGD in float64 {err:.2e}")
    assert err <= 2e-5, (stage, p, err)
    assert not rec["skipped"]
    coefs = rec["row_coefs"]
    assert (coefs < 1).any() and (coefs == 1).any(), coefs
    for r in ranks:
        assert r[(stage, p)]["coefs_equal"] and torch.equal(r[(stage, p)]["row_coefs"], coefs)
        assert r[(stage, p)]["collectives"] == [1], (stage, p, r[(stage, p)]["collectives"])
    torch.testing.assert_close(coefs.double(), timm_coefs(ref_grads, ref_params, p), rtol=1e-5, atol=0)
    expected_norm = torch.cat([g.flatten() for g in ref_grads.values()]).norm(p).item()
    assert rec["norm"] == pytest.approx(expected_norm, rel=1e-5)  # the group norm, from the rows' sums
    # ZeRO-0's 1/world slices, ZeRO-1/2's partition boundary and ZeRO-3's per-parameter partitions split rows
    assert any(r[(stage, p)]["splits_rows"] for r in ranks)


@pytest.mark.multiprocess
def test_deepspeed_fp16_row_norms_divide_out_the_loss_scale(deepspeed_ops):
    """fp16 ZeRO-2: coefficients and update as timm's on float64 data from the same fp16 weights, to fp16's
    precision; counting the loss scale (256) in the gradient norms would clip every row ~256x harder."""
    rec = deepspeed_results()[0]["fp16"]
    assert rec["loss_scale"] == 256.0 and not rec["skipped"]
    model = make_net(torch.float16, scalar=False).double()
    xs, ys = zip(*(data(0, r) for r in range(2)))
    loss_of(model, torch.cat(xs).half().double(), torch.cat(ys).half().double()).backward()
    grads = {n: q.grad for n, q in model.named_parameters()}
    params = {n: q.detach() for n, q in model.named_parameters()}
    expected = timm_coefs(grads, params, 2.0)
    err = ((rec["row_coefs"].double() - expected).abs() / expected).max().item()
    print(f"agc ZeRO-2 fp16: max relative error of the row coefficients vs float64 {err:.2e}")
    assert err <= 2e-2
    assert max_rel_err(rec["update"], timm_clip(grads, params, 2.0)) <= 5e-2




# ------------------------------------------------------------------ the mapping itself

@st.composite
def spans_of_a_parameter(draw):
    shape = draw(st.sampled_from([(), (1,), (6,), (1, 5), (4, 3), (5, 2, 3), (3, 1)]))
    numel = math.prod(shape)
    cuts = sorted(draw(st.lists(st.integers(0, numel), max_size=4)))
    bounds = [0, *cuts, numel]
    return shape, [(a, b - a) for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=150, deadline=None)
@given(spans_of_a_parameter(), st.sampled_from([1.0, 2.0, 3.0, math.inf]))
def test_piece_map_sends_every_element_to_its_row(case, p):
    """Any split of a parameter's flat order into runs (as shards cut it): the sums per row and the scaling
    are those of the rows, element by element (brute force: element k belongs to row k // row length)."""
    from distclip.core.rowwise import RowPlan, RowwiseSpec, Span

    shape, runs = case
    plan = RowPlan.build(["w"], [shape], [0], {0: RowwiseSpec(p, 0.5, 1e-3)}, 1)
    block = plan.blocks[0]
    values = torch.randn(max(1, math.prod(shape)), dtype=torch.float64).reshape(shape)
    flat = values.reshape(-1)
    pieces = plan.piece_map([Span(0, a, n) for a, n in runs])
    sums = pieces.sums([flat[a : a + n].clone() for a, n in runs], torch.device("cpu"))
    rows = flat.reshape(block.rows, block.row_size).abs()
    expected = rows.amax(dim=1) if math.isinf(p) else rows.pow(p).sum(dim=1)
    torch.testing.assert_close(sums, expected, rtol=1e-12, atol=0)
    coefs = torch.arange(1, block.rows + 1, dtype=torch.float32) / 8
    scaled = [flat[a : a + n].clone() for a, n in runs]
    pieces.scale_(scaled, coefs)
    expected_scaled = (flat.reshape(block.rows, block.row_size) * coefs.double()[:, None]).reshape(-1)
    torch.testing.assert_close(torch.cat(scaled) if scaled else flat[:0], expected_scaled, rtol=1e-7, atol=0)
