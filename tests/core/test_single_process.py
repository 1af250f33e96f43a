"""Single-process semantics: PyTorch's own clipping case, groups, non-finite policies, API shape."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import distclip
from distclip import canonical_name
from tests.helpers.models import batch, loss_fn, make_model
from tests.helpers.reference import reference_clip, rel_err

# PyTorch's test_clip_grad_norm: Linear(10, 10), weight grad arange(1, 101), bias grad ones / 1000.
TORCH_CASE = {0.5: 451287.34, 1.5: 1179.3579, 2.0: 581.67859, 4.0: 212.79240, math.inf: 100.0}


def torch_case() -> torch.nn.Linear:
    layer = torch.nn.Linear(10, 10)
    layer.weight.grad = torch.arange(1.0, 101).view(10, 10)
    layer.bias.grad = torch.ones(10) / 1000
    return layer


@pytest.mark.parametrize("p", list(TORCH_CASE), ids=lambda p: f"p{p}")
def test_pytorch_reference_case(p):
    layer = torch_case()
    before = [g.grad.clone() for g in layer.parameters()]
    norm = distclip.clip_grad_norm_(layer, 2.0, norm_type=p)
    assert type(norm) is torch.Tensor and norm.dtype == torch.float32 and norm.dim() == 0
    assert rel_err(norm.item(), TORCH_CASE[p]) <= 1e-6
    after = [g.grad for g in layer.parameters()]
    assert rel_err(distclip.global_grad_norm(layer, p).item(), 2.0) <= 1e-5  # post-clip norm is max_norm
    ratios = torch.cat([(a / b).flatten() for a, b in zip(after, before)])
    torch.testing.assert_close(ratios, torch.full_like(ratios, ratios[0].item()))  # one factor for every element
    assert ratios[0].item() == pytest.approx(2.0 / (norm.item() + 1e-6), rel=1e-6)


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_matches_torch_bitwise_on_plain_module(p):
    ours, theirs = make_model(), make_model()
    for m in (ours, theirs):
        loss_fn(m, *batch(0, 0)).backward()
    norm = distclip.clip_grad_norm_(ours, 0.1, p)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.1, p)
    assert rel_err(norm.item(), expected.item()) <= 1e-6
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


def test_hand_checkable_value():
    param = torch.nn.Parameter(torch.zeros(1))
    param.grad = torch.tensor([2.0])
    assert distclip.clip_grad_norm_([param], 1.0).item() == 2.0
    assert param.grad.item() == 0.9999995231628418


def test_global_grad_norm_does_not_modify():
    layer = torch_case()
    before = layer.weight.grad.clone()
    assert distclip.global_grad_norm(layer).item() == pytest.approx(581.67859, rel=1e-6)
    assert torch.equal(layer.weight.grad, before)


def test_per_group_clipping_single_process():
    config = {"max_norm": 0.1, "groups": [
        {"name": "embed", "match": "embed.*", "max_norm": 0.01},
        {"name": "attn", "match": ["blocks.*.attn.*"], "max_norm": 0.02, "norm_type": 1.0},
    ]}
    model = make_model()
    loss_fn(model, *batch(0, 0)).backward()
    ref = reference_clip({n: p.grad for n, p in model.named_parameters()}, config)
    report = distclip.GradClipper(model, config).clip()
    assert list(report.group_norms) == ["embed", "attn", "default"]
    assert rel_err(report.total_norm.item(), ref["total"]) <= 1e-6
    for name, value in ref["groups"].items():
        assert rel_err(report.group_norms[name].item(), value) <= 1e-6
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad.double(), ref["clipped"][name], rtol=1e-6, atol=1e-12)
    assert all(c.item() < 1 for c in report.coefs.values())


def test_per_layer_shorthand():
    model = make_model(blocks=3)
    clipper = distclip.GradClipper(model, {"max_norm": 1.0, "groups": [{"name": "embed", "match": "embed.*"}],
                                           "per_layer": {"depth": 2, "match": "blocks.*", "max_norm": 0.5}})
    assert clipper.group_names == ["embed", "blocks.0", "blocks.1", "blocks.2", "default"]
    loss_fn(model, *batch(0, 0)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    report = clipper.clip()
    for i in range(3):
        members = [g for n, g in grads.items() if n.startswith(f"blocks.{i}.")]
        expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in members])).item()
        assert rel_err(report.group_norms[f"blocks.{i}"].item(), expected) <= 1e-6
        assert report.thresholds[f"blocks.{i}"].item() == 0.5


def test_mixed_norm_types_per_group_and_total():
    model = make_model()
    loss_fn(model, *batch(0, 0)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    config = {"norm_type": 2.0, "groups": [{"name": "embed", "match": "embed.*", "norm_type": "inf"},
                                           {"name": "head", "match": "head.*", "norm_type": 3.5}]}
    report = distclip.GradClipper(model, config).measure()
    ref = reference_clip(grads, config)
    assert rel_err(report.total_norm.item(), ref["total"]) <= 1e-6
    for name in ("embed", "head", "default"):
        assert rel_err(report.group_norms[name].item(), ref["groups"][name]) <= 1e-6


def test_bf16_gradients_accumulate_in_fp32():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16)) for _ in range(4)]
    for p in params:
        p.grad = torch.randn(4096).to(torch.bfloat16)
    exact = torch.linalg.vector_norm(torch.cat([p.grad.double() for p in params])).item()
    ours = distclip.global_grad_norm(params)
    assert ours.dtype == torch.float32
    assert rel_err(ours.item(), exact) <= 1e-6  # a bf16 result would be off by ~1e-3


# ------------------------------------------------------------------ non-finite
def poisoned(value: float) -> torch.nn.Linear:
    layer = torch_case()
    layer.weight.grad[0, 0] = value
    return layer


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_ignore_follows_torch(value):
    ours, theirs = poisoned(value), poisoned(value)
    norm = distclip.clip_grad_norm_(ours, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
    assert torch.equal(norm.isnan(), expected.isnan()) and torch.equal(norm.isinf(), expected.isinf())
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True)


def test_nonfinite_error():
    with pytest.raises(distclip.NonFiniteGradientError, match="non-finite"):
        distclip.clip_grad_norm_(poisoned(math.nan), 1.0, error_if_nonfinite=True)
    with pytest.raises(distclip.NonFiniteGradientError):
        distclip.GradClipper(poisoned(math.inf), nonfinite="error").clip()


def test_nonfinite_zero():
    layer = poisoned(math.nan)
    report = distclip.GradClipper(layer, nonfinite="zero").clip()
    assert not report.skipped and not bool(report.finite)
    assert all(not p.grad.any() for p in layer.parameters())


def test_nonfinite_skip_leaves_params_and_optimizer_state_untouched():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    clipper = distclip.GradClipper(model, nonfinite="skip")
    clipper.attach(opt)
    loss_fn(model, *batch(0, 0)).backward()
    opt.step()
    opt.zero_grad()
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model.embed.weight].items()}
    loss_fn(model, *batch(1, 0), scale=math.inf).backward()
    opt.step()
    assert clipper.last_report.skipped
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(torch.equal(state[k], v) for k, v in opt.state[model.embed.weight].items())
    loss_fn(model, *batch(2, 0)).backward()  # training goes on normally afterwards
    opt.step()
    assert not clipper.last_report.skipped
    assert not all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


def test_attach_clips_before_step_and_works_with_lr_scheduler():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    clipper = distclip.GradClipper(model, max_norm=0.01)
    handle = clipper.attach(opt)
    loss_fn(model, *batch(0, 0)).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        opt.step()
        scheduler.step()
    assert clipper.last_report is not None and clipper.steps == 1
    assert distclip.global_grad_norm(model).item() == pytest.approx(0.01, rel=1e-4)
    handle.remove()
    loss_fn(model, *batch(1, 0)).backward()
    opt.step()
    assert clipper.steps == 1


# ------------------------------------------------------------------ API shape
def test_empty_and_gradless_inputs():
    assert distclip.clip_grad_norm_([], 1.0).item() == 0.0
    model = make_model()
    assert distclip.clip_grad_norm_(model, 1.0).item() == 0.0  # no backward yet: no gradients
    assert distclip.clip_grad_norm_(model, 1.0, norm_type="inf").item() == 0.0
    empty = torch.nn.Parameter(torch.zeros(0))
    empty.grad = torch.zeros(0)
    assert distclip.clip_grad_norm_([empty], 1.0, norm_type=math.inf).item() == 0.0


def test_shared_parameters_counted_once():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    assert distclip.global_grad_norm([p, p]).item() == 5.0


def test_unsupported_object_is_a_clear_error():
    with pytest.raises(distclip.UnsupportedModelError, match="cannot clip a builtins.int"):
        distclip.GradClipper(42)
    with pytest.raises(distclip.UnsupportedModelError, match="named_parameters"):
        distclip.clip_grad_norm_(["not a tensor"], 1.0)


def test_groups_need_names():
    with pytest.raises(distclip.ConfigError, match="named_parameters"):
        distclip.GradClipper(list(make_model().parameters()), groups=[{"name": "a", "match": "*"}])
    clipper = distclip.GradClipper(make_model().named_parameters(), groups=[{"name": "e", "match": "embed.*"}])
    assert clipper.group_names == ["e", "default"]


def test_empty_group_warns():
    with pytest.warns(UserWarning, match="match no parameter"):
        distclip.GradClipper(make_model(), groups=[{"name": "typo", "match": "embd.*"}])


def test_state_dict_round_trip():
    config = {"groups": [{"name": "e", "match": "embed.*"}]}
    clipper = distclip.GradClipper(make_model(), config)
    clipper.steps = 7
    other = distclip.GradClipper(make_model(), config)
    other.load_state_dict(clipper.state_dict())
    assert other.steps == 7
    with pytest.raises(distclip.ConfigError, match="groups"):
        distclip.GradClipper(make_model()).load_state_dict(clipper.state_dict())


@pytest.mark.parametrize("raw, expected", [
    ("module.layers.0.weight", "layers.0.weight"),
    ("module._fsdp_wrapped_module.layers.0._fsdp_wrapped_module.attn.weight", "layers.0.attn.weight"),
    ("_orig_mod.blocks.1._checkpoint_wrapped_module.mlp.bias", "blocks.1.mlp.bias"),
    ("module.module.x", "x"),
    ("embed.module.weight", "embed.module.weight"),  # an inner 'module' is the user's own
])
def test_canonical_names(raw, expected):
    assert canonical_name(raw) == expected


def test_wrapped_names_match_groups():
    model = torch.compile(make_model(), backend="eager")  # adds _orig_mod.
    clipper = distclip.GradClipper(model, groups=[{"name": "embed", "match": "embed.*"}])
    assert "embed.weight" in clipper.adapter.names and "_orig_mod.embed.weight" not in clipper.adapter.names
    assert clipper.table.index_of["embed.weight"] == 0


def test_unclipped_groups_are_not_rewritten():
    """A coefficient of exactly 1 changes nothing, so those gradients are not touched (no extra pass)."""
    model = make_model()
    loss_fn(model, *batch(0, 0)).backward()
    config = {"max_norm": 1e-6, "groups": [{"name": "embed", "match": "embed.*", "max_norm": 1e6}]}
    versions = {n: p.grad._version for n, p in model.named_parameters()}
    report = distclip.GradClipper(model, config).clip()
    assert report.coefs["embed"].item() == 1.0 and report.coefs["default"].item() < 1.0
    for name, param in model.named_parameters():
        changed = param.grad._version != versions[name]
        assert changed == (not name.startswith("embed.")), name
    # 'ignore' never synchronises with the host, so it multiplies every group, as torch does
    versions = {n: p.grad._version for n, p in model.named_parameters()}
    distclip.GradClipper(model, {**config, "nonfinite": "ignore"}).clip()
    assert all(p.grad._version != versions[n] for n, p in model.named_parameters())


def _train_fused(fold, scaler: bool = False, steps: int = 3, config=None):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    clipper = distclip.GradClipper(model, config or {"max_norm": 0.05})
    attachment = clipper.attach(opt, fold=fold)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if scaler else None
    norms = []
    for step in range(steps):
        loss = loss_fn(model, *batch(step, 0))
        if grad_scaler:
            grad_scaler.scale(loss).backward()
            grad_scaler.step(opt)  # fused: grads stay scaled until the kernel, which receives grad_scale
            grad_scaler.update()
        else:
            loss.backward()
            opt.step()
        norms.append(clipper.last_report.total_norm.item())
        assert not hasattr(opt, "grad_scale")  # nothing left behind between steps
        opt.zero_grad()
    return attachment, norms, [p.detach().clone() for p in model.parameters()]


def test_fold_into_fused_optimizer_matches_multiplying():
    folded, norms_f, params_f = _train_fused(fold=None)
    plain, norms_p, params_p = _train_fused(fold=False)
    assert folded.fold and not plain.fold
    for a, b in zip(norms_f, norms_p):
        assert rel_err(a, b) <= 1e-6
    for a, b in zip(params_f, params_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fold", [None, False])
def test_grad_scaler_fused_path_clips_the_true_gradients(fold):
    """GradScaler leaves fused optimizers' gradients scaled: the norm must be of the unscaled ones."""
    _, norms_scaled, params_scaled = _train_fused(fold=fold, scaler=True)
    _, norms_plain, params_plain = _train_fused(fold=False, scaler=False)
    for a, b in zip(norms_scaled, norms_plain):
        assert rel_err(a, b) <= 1e-5
    for a, b in zip(params_scaled, params_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fold_refused_with_a_reason():
    model = make_model()
    fused = torch.optim.AdamW(model.parameters(), fused=True)
    grouped = distclip.GradClipper(model, groups=[{"name": "e", "match": "embed.*"}])
    with pytest.raises(distclip.ConfigError, match="per-group"):
        grouped.attach(fused, fold=True)
    assert not grouped.attach(fused).fold  # auto: falls back to multiplying
    with pytest.raises(distclip.ConfigError, match="not a fused"):
        distclip.GradClipper(model).attach(torch.optim.AdamW(model.parameters()), fold=True)
    partial = distclip.GradClipper(list(model.embed.named_parameters()))
    with pytest.raises(distclip.ConfigError, match="does not clip"):
        partial.attach(fused, fold=True)


def test_fold_refused_for_a_subset():
    model = make_model()
    fused = torch.optim.AdamW(model.parameters(), fused=True)
    subset = distclip.GradClipper(model, params=list(model.embed.parameters()))
    with pytest.raises(distclip.ConfigError, match="subset"):
        subset.attach(fused, fold=True)
