"""Threshold policies at the policy level: hand-checkable values, parity with the reference packages
(``zclip``, ``autoclip``), masked updates, checkpoint continuation, and no host sync.

The references are the published packages themselves (``pip install --no-deps zclip autoclip``),
driven on real gradients; AdaGC and skip_spikes, which have no package, are checked against plain
Python loops written from the papers' formulas (no distclip code).
"""

from __future__ import annotations

import io
import math
import random
import statistics
from collections import deque
from typing import Any

import pytest
import torch

from distclip import ClipConfig, ConfigError
from distclip.core.config import (
    AdaGCPolicySpec,
    AutoClipPolicySpec,
    SkipSpikesSpec,
    ZClipPolicySpec,
)
from distclip.core.groups import ClipGroup, resolve_groups
from distclip.core.policies import (
    AdaGCPolicy,
    AutoClipPolicy,
    ClipPolicy,
    FixedPolicy,
    PolicySet,
    SpikeDetector,
    ZClipPolicy,
    build_policies,
    build_policy,
    build_spike_detector,
)

F64 = torch.float64
TRUE, FALSE = torch.tensor(True), torch.tensor(False)


def groups_of(n: int, max_norm: float = math.inf, norm_type: float = 2.0) -> list[ClipGroup]:
    return [ClipGroup(f"g{i}", max_norm, norm_type) for i in range(n)]


def norms_tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64).reshape(-1)


def total_of(norms: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(norms)


def step(policy, values, accepted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One clip as the clipper runs it: coefficients, then update with the coefficients applied."""
    norms = norms_tensor(values)
    total = total_of(norms)
    thresholds, coefs = policy.coefficients(norms, total)
    policy.update(norms, total, coefs, torch.tensor(accepted))
    return thresholds, coefs


def spiky_norms(steps: int, seed: int, spikes: dict[int, float]) -> list[float]:
    """Norms near 1 with noise and a slow drift, multiplied by ``spikes[step]`` at the spike steps."""
    rng = random.Random(seed)
    return [(1.0 + 0.01 * t + 0.15 * rng.gauss(0, 1) ** 2) * spikes.get(t, 1.0) for t in range(steps)]


SPIKES = {4: 10.0, 14: 8.0, 30: 20.0, 31: 3.0, 45: 50.0, 46: 1.5, 60: 5.0}


def rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


# ----------------------------------------------------------------------------- hand-checkable values
@pytest.mark.parametrize("quantile, expected", [(0.1, 1.4), (0.9, 61.6), (0.5, 3.0), (0.0, 1.0), (1.0, 100.0)])
def test_autoclip_quantile_of_history(quantile, expected):
    policy = AutoClipPolicy(AutoClipPolicySpec(quantile=quantile), groups_of(1))
    first, _ = step(policy, [1.0])
    assert first.item() == math.inf  # threshold taken before the norm joins the history: first step unclipped
    for value in [2.0, 3.0, 4.0, 100.0]:
        step(policy, [value])
    thresholds, coefs = policy.coefficients(norms_tensor([200.0]), torch.tensor(200.0, dtype=F64))
    assert thresholds.item() == pytest.approx(expected, rel=1e-12)
    assert coefs.item() == pytest.approx(expected / (200.0 + 1e-6), rel=1e-12)


def zclip_after_warmup(mean: float, var: float, **spec: Any) -> ZClipPolicy:
    policy = ZClipPolicy(ZClipPolicySpec(warmup_steps=3, **spec), groups_of(1))
    state = policy.state_dict()
    state.update(count=torch.tensor(3), mean=norms_tensor([mean]), var=norms_tensor([var]))
    policy.load_state_dict(state)
    return policy


def test_zclip_adaptive_threshold_and_ema_update():
    policy = zclip_after_warmup(1.0, 0.25)
    thresholds, coefs = step(policy, [3.0])
    # z = 2 / (0.5 + 1e-6) ~ 4; threshold = mu + z_thresh^2 sigma / z = 1 + 6.25 * 0.5 / 4
    assert thresholds.item() == pytest.approx(1.78125, rel=1e-6)
    assert coefs.item() == pytest.approx(1.78125 / 3.0, rel=1e-6)
    state = policy.state_dict()
    assert state["mean"].item() == pytest.approx(1.0234375, rel=1e-6)  # fed the clipped value, not 3
    assert state["var"].item() == pytest.approx(0.2597285, rel=1e-6)  # with the already-updated mean


def test_zclip_no_spike_feeds_the_norm_itself():
    policy = zclip_after_warmup(1.0, 0.25, alpha=0.5)
    thresholds, coefs = step(policy, [1.5])  # z ~ 1 < 2.5: not a spike; max_norm inf: no cap
    assert thresholds.item() == math.inf and coefs.item() == 1.0
    assert policy.state_dict()["mean"].item() == 1.25
    assert policy.state_dict()["var"].item() == pytest.approx(0.5 * 0.25 + 0.5 * 0.25 ** 2)


def test_adagc_per_group_threshold_and_gamma_update():
    policy = AdaGCPolicy(AdaGCPolicySpec(warmup_steps=1), groups_of(1, max_norm=1.0))
    state = policy.state_dict()
    state.update(count=torch.tensor(1), gamma=norms_tensor([1.0]))
    policy.load_state_dict(state)
    thresholds, coefs = step(policy, [2.0])
    assert thresholds.item() == pytest.approx(1.05)  # lambda_rel * gamma
    assert coefs.item() == pytest.approx(0.525, rel=1e-6)  # h = 1.05 * 1 / 2; clipped norm 1.05
    assert policy.state_dict()["gamma"].item() == pytest.approx(1.001, rel=1e-6)  # 0.98 * 1 + 0.02 * 1.05


def test_fixed_policy_is_torch_semantics():
    policy = FixedPolicy(None, [ClipGroup("a", 2.0, 2.0), ClipGroup("b", math.inf, 2.0)])
    thresholds, coefs = step(policy, [4.0, 5.0])
    assert thresholds.tolist() == [2.0, math.inf]
    # torch's own arithmetic: fp32, as clip_grad_norm_ computes max_norm / (norm + 1e-6) for fp32 gradients
    torch_coef = (torch.tensor(2.0) / (torch.tensor(4.0) + 1e-6)).clamp(max=1.0).item()
    assert coefs.tolist() == [torch_coef, 1.0] and torch_coef != 2.0 / (4.0 + 1e-6)
    assert thresholds.dtype == coefs.dtype == F64


# ------------------------------------------------------------------------------ parity: zclip package
class ZClipReference:
    """The ``zclip`` package's ``ZClip.step`` on a one-tensor float64 model, recording what it did."""

    def __init__(self, monkeypatch, **kwargs: Any):
        import zclip
        self.ref = zclip.ZClip(**kwargs)
        self.model = torch.nn.Linear(4, 2, bias=False).double()
        self.threshold = math.nan
        applied = self.ref._apply_clipping

        def record_apply(model, clip_val, total_norm):
            self.threshold = applied(model, clip_val, total_norm)
            return self.threshold

        monkeypatch.setattr(self.ref, "_apply_clipping", record_apply)

    def step(self, grad: torch.Tensor) -> dict[str, float]:
        weight = self.model.weight
        weight.grad = grad.clone()
        self.threshold = self.ref.max_grad_norm if self.ref.max_grad_norm is not None else math.inf  # warm-up
        norm = self.ref.step(self.model)
        coef = (weight.grad.flatten()[0] / grad.flatten()[0]).item()
        return {"norm": norm, "coef": coef, "clipped": weight.grad.norm().item(), "threshold": self.threshold,
                "mean": self.ref.mean, "var": self.ref.var}


def gradients(norms: list[float], shape=(2, 4), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in norms:
        direction = torch.randn(shape, generator=g, dtype=F64)
        out.append(direction * (n / direction.norm()))
    return out


ZCLIP_CASES = [
    dict(mode="zscore", clip_option="adaptive_scaling"),
    dict(mode="zscore", clip_option="adaptive_scaling", clip_factor=0.7),
    dict(mode="zscore", clip_option="adaptive_scaling", clip_factor=1.3, z_thresh=2.0, alpha=0.9),
    dict(mode="zscore", clip_option="mean"),
    dict(mode="percentile"),
    dict(mode="percentile", z_thresh=1.0),
]


def zclip_case_id(case: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("skip_update_on_spike", [False, True], ids=["ema_on_spike", "skip_update_on_spike"])
@pytest.mark.parametrize("cap", [None, 2.5], ids=["no_cap", "cap2.5"])
@pytest.mark.parametrize("case", ZCLIP_CASES, ids=zclip_case_id)
def test_zclip_matches_package(monkeypatch, case, cap, skip_update_on_spike):
    warmup = 10
    ref = ZClipReference(monkeypatch, warmup_steps=warmup, max_grad_norm=cap, skip_update_on_spike=skip_update_on_spike, **case)
    spec = ZClipPolicySpec(warmup_steps=warmup, skip_update_on_spike=skip_update_on_spike, **case)
    policy = ZClipPolicy(spec, groups_of(1, max_norm=math.inf if cap is None else cap))
    worst = zclip_parity(ref, policy, spiky_norms(70, seed=1, spikes=SPIKES), warmup)
    assert max(worst.values()) <= 1e-9, worst


def zclip_parity(ref: ZClipReference, policy: ZClipPolicy, norms: list[float], warmup: int) -> dict[str, float]:
    """Run both on the same gradients; the worst relative difference of each recorded quantity."""
    worst = dict.fromkeys(["coef", "clipped", "threshold", "mean", "var"], 0.0)
    clipped_steps = 0
    for t, grad in enumerate(gradients(norms)):
        expected = ref.step(grad)
        norm = norms_tensor([expected["norm"]])  # the very norm the package measured
        thresholds, coefs = policy.coefficients(norm, norm[0])
        policy.update(norm, norm[0], coefs, TRUE)
        worst["coef"] = max(worst["coef"], rel(coefs.item(), expected["coef"]))
        worst["clipped"] = max(worst["clipped"], rel(coefs.item() * expected["norm"], expected["clipped"]))
        if expected["coef"] < 1.0:  # the package clipped: its effective threshold is ours
            clipped_steps += 1
            worst["threshold"] = max(worst["threshold"], rel(thresholds.item(), expected["threshold"]))
        else:  # not clipped: ours is a threshold the norm does not exceed
            assert thresholds.item() >= expected["norm"], t
        if t >= warmup - 1:
            state = policy.state_dict()
            worst["mean"] = max(worst["mean"], rel(state["mean"].item(), expected["mean"]))
            worst["var"] = max(worst["var"], rel(state["var"].item(), expected["var"]))
    assert clipped_steps >= 3  # the data does exercise clipping
    return worst


def test_zclip_matches_package_with_defaults(monkeypatch):
    """Package defaults (max_grad_norm 1.0 = the default max_norm, warm-up 25) on norms near 0.5."""
    ref = ZClipReference(monkeypatch)
    policy = build_policy(ClipConfig.from_dict({"policy": {"kind": "zclip"}}).policy, groups_of(1, max_norm=1.0))
    norms = [0.5 * n for n in spiky_norms(80, seed=2, spikes={30: 6.0, 50: 1.8, 70: 30.0})]
    worst = zclip_parity(ref, policy, norms, warmup=25)
    assert max(worst.values()) <= 1e-9, worst


def test_zclip_per_group_is_independent_packages(monkeypatch):
    """Three groups under one policy = three independent package instances."""
    seeds = [3, 4, 5]
    refs = [ZClipReference(monkeypatch, warmup_steps=6, max_grad_norm=None) for _ in seeds]
    policy = ZClipPolicy(ZClipPolicySpec(warmup_steps=6), groups_of(3))
    series = [gradients(spiky_norms(40, seed=s, spikes={8 + s: 9.0, 20 + s: 4.0}), seed=s) for s in seeds]
    for t in range(40):
        expected = [ref.step(g[t]) for ref, g in zip(refs, series)]
        norms = norms_tensor([e["norm"] for e in expected])
        _, coefs = policy.coefficients(norms, total_of(norms))
        policy.update(norms, total_of(norms), coefs, TRUE)
        for i, e in enumerate(expected):
            assert rel(coefs[i].item(), e["coef"]) <= 1e-9


# --------------------------------------------------------------------------- parity: autoclip package
class RecordedClip:
    """``torch.nn.utils.clip_grad_norm_`` as the package calls it, recording (threshold, pre-clip norm)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[float, float]] = []
        original = torch.nn.utils.clip_grad_norm_

        def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
            norm = original(parameters, max_norm, *args, **kwargs)
            self.calls.append((float(max_norm), norm.item()))
            return norm

        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_grad_norm_)


def three_param_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()


def set_grads(model: torch.nn.Module, t: int, scale: float) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    grads = []
    for i, p in enumerate(model.parameters()):
        grad = torch.randn(p.shape, generator=g, dtype=F64) * scale * (1 + i)
        p.grad = grad.clone()
        grads.append(grad)
    return grads


@pytest.mark.parametrize("history_length", [7, 1000])
@pytest.mark.parametrize("quantile", [0.1, 0.5, 0.9])
def test_autoclip_global_matches_package(monkeypatch, quantile, history_length):
    import autoclip.torch as autoclip
    model = three_param_model()
    clipper = autoclip.QuantileClip(model.parameters(), quantile=quantile, history_length=history_length,
                                    global_threshold=True)
    recorded = RecordedClip(monkeypatch)
    config = ClipConfig.from_dict({"max_norm": "inf", "policy": {"kind": "autoclip", "quantile": quantile,
                                                                 "history_length": history_length}})
    table = resolve_groups(config, [n for n, _ in model.named_parameters()])
    policy = build_policies(config, table.groups)  # one group: 'default'
    scales = spiky_norms(50, seed=6, spikes=SPIKES)
    clipped_steps = 0
    for t, scale in enumerate(scales):
        before = set_grads(model, t, scale)
        clipper.step()
        (ref_threshold, ref_norm), = recorded.calls[-1:]
        ref_coef = (next(model.parameters()).grad.flatten()[0] / before[0].flatten()[0]).item()
        norms = norms_tensor([ref_norm])
        thresholds, coefs = policy.coefficients(norms, norms[0])
        policy.update(norms, norms[0], coefs, TRUE)
        assert rel(thresholds.item(), ref_threshold) <= 1e-12, t
        assert rel(coefs.item(), ref_coef) <= 1e-12, t
        clipped_steps += ref_coef < 1
    assert clipped_steps >= 5


@pytest.mark.parametrize("quantile, history_length", [(0.9, 1000), (0.25, 5)])
def test_autoclip_per_parameter_matches_package(monkeypatch, quantile, history_length):
    import autoclip.torch as autoclip
    model = three_param_model()
    names = [n for n, _ in model.named_parameters()]
    clipper = autoclip.QuantileClip(model.parameters(), quantile=quantile, history_length=history_length)
    recorded = RecordedClip(monkeypatch)
    config = ClipConfig.from_dict({"max_norm": "inf", "per_parameter": True,
                                   "policy": {"kind": "autoclip", "quantile": quantile, "history_length": history_length}})
    table = resolve_groups(config, names)
    assert table.names == [*names, "default"]
    policy = build_policies(config, table.groups)
    for t, scale in enumerate(spiky_norms(40, seed=7, spikes=SPIKES)):
        before = set_grads(model, t, scale)
        recorded.calls.clear()
        clipper.step()
        assert len(recorded.calls) == len(names)
        ref_coefs = [(p.grad.flatten()[0] / b.flatten()[0]).item() for p, b in zip(model.parameters(), before)]
        norms = norms_tensor([n for _, n in recorded.calls] + [0.0])  # the empty 'default' group last
        thresholds, coefs = policy.coefficients(norms, total_of(norms))
        policy.update(norms, total_of(norms), coefs, TRUE)
        for i, (ref_threshold, _) in enumerate(recorded.calls):
            assert rel(thresholds[i].item(), ref_threshold) <= 1e-12, (t, names[i])
            assert rel(coefs[i].item(), ref_coefs[i]) <= 1e-12, (t, names[i])


def test_autoclip_cap_is_the_group_max_norm():
    policy = AutoClipPolicy(AutoClipPolicySpec(quantile=1.0), groups_of(1, max_norm=2.0))
    assert step(policy, [5.0])[0].item() == 2.0  # empty history: only the cap
    assert step(policy, [1.0])[0].item() == 2.0  # quantile 5 capped at 2
    assert step(policy, [0.5])[0].item() == 2.0
    policy = AutoClipPolicy(AutoClipPolicySpec(quantile=0.0), groups_of(1, max_norm=2.0))
    step(policy, [1.5])
    assert step(policy, [3.0])[0].item() == 1.5


# ------------------------------------------------------------------ AdaGC vs the paper's loop
def adagc_loop(rows: list[list[float]], max_norm: float, lambda_rel: float, beta: float, warmup: int) -> list[list[float]]:
    """The AdaGC rule in plain Python floats (L2 norms), with distclip's zero-norm rule."""
    gamma = [math.inf] * len(rows[0])
    out = []
    for t, norms in enumerate(rows):
        if t < warmup:
            total = math.sqrt(sum(n * n for n in norms))
            coefs = [min(1.0, max_norm / (total + 1e-6))] * len(norms)
        else:
            coefs = [min(1.0, lambda_rel * g / (n + 1e-6)) for g, n in zip(gamma, norms)]
        for i, (n, c) in enumerate(zip(norms, coefs)):
            if n == 0:
                continue  # no gradient reached this group: gamma stays
            if t < warmup or gamma[i] == math.inf:
                gamma[i] = min(gamma[i], c * n) if t < warmup else c * n
            else:
                gamma[i] = beta * gamma[i] + (1 - beta) * c * n
        out.append(coefs)
    return out


def test_adagc_matches_plain_loop():
    rng = random.Random(8)
    steps, G = 40, 4
    rows = [[(0.3 + i) * (1 + 0.2 * rng.random()) * (12.0 if (t, i) in {(15, 1), (25, 3), (26, 0)} else 1.0)
             for i in range(G)] for t in range(steps)]
    for t in range(8):
        rows[t][2] = 0.0  # a tensor no gradient reaches during warm-up
    rows[30][1] = 0.0
    expected = adagc_loop(rows, max_norm=2.0, lambda_rel=1.05, beta=0.9, warmup=5)
    policy = AdaGCPolicy(AdaGCPolicySpec(warmup_steps=5, beta=0.9), groups_of(G, max_norm=2.0))
    clipped = 0
    for t, row in enumerate(rows):
        thresholds, coefs = step(policy, row)
        for i in range(G):
            assert rel(coefs[i].item(), expected[t][i]) <= 1e-12, (t, i)
            assert coefs[i].item() == pytest.approx(min(1.0, thresholds[i].item() / (row[i] + 1e-6)), rel=1e-12)
        clipped += sum(c < 1 for c in expected[t])
    assert clipped >= 5
    assert all(c == 1.0 for c in expected[8][2:3])  # the late tensor is not zeroed


def test_adagc_needs_one_max_norm_and_norm_type():
    config = ClipConfig.from_dict({"groups": [{"name": "emb", "match": "0.*", "max_norm": 0.5}], "per_parameter": True,
                                   "policy": {"kind": "adagc"}})
    table = resolve_groups(config, ["0.weight", "0.bias", "2.weight"])
    with pytest.raises(ConfigError, match=r"different max_norm values \[0.5, 1.0\].*own policy"):
        build_policies(config, table.groups)
    fixed = ClipConfig.from_dict({**config.to_dict(), "groups": [{"name": "emb", "match": "0.*", "max_norm": 0.5,
                                                                 "policy": {"kind": "fixed"}}]})
    policies = build_policies(fixed, resolve_groups(fixed, ["0.weight", "0.bias", "2.weight"]).groups)
    assert [type(p).__name__ for p in policies.policies] == ["FixedPolicy", "AdaGCPolicy"]


# ------------------------------------------------------------------------------------ skip_spikes
def spike_loop(norms: list[float], window: int, sigma: float, min_obs: int) -> list[bool]:
    """OLMo-core's rule in plain Python: skip when x - mean > sigma * stdev of the accepted window."""
    history: deque[float] = deque(maxlen=window)
    skips = []
    for x in norms:
        skip = (len(history) >= min_obs and math.isfinite(x)
                and x - statistics.fmean(history) > sigma * statistics.stdev(history))
        skips.append(skip)
        if not skip and math.isfinite(x):
            history.append(x)
    return skips


@pytest.mark.parametrize("window, sigma, min_obs", [(128, 6.0, 16), (10, 3.0, 4), (6, 2.0, 6)])
def test_skip_spikes_matches_plain_loop(window, sigma, min_obs):
    norms = spiky_norms(150, seed=9, spikes={3: 50.0, 20: 30.0, 21: 25.0, 60: 4.0, 90: 100.0, 91: 100.0})
    norms[40], norms[70] = math.nan, math.inf
    expected = spike_loop(norms, window, sigma, min_obs)
    detector = SpikeDetector(SkipSpikesSpec(window=window, sigma_factor=sigma, min_observations=min_obs))
    got = []
    for x in norms:
        total = torch.tensor(x, dtype=F64)
        skip = detector.skip(total.reshape(1), total)
        assert skip.dtype == torch.bool and skip.dim() == 0
        detector.update(total.reshape(1), total, torch.ones(1, dtype=F64), ~skip & torch.isfinite(total))
        got.append(bool(skip))
    assert got == expected
    assert not got[3]  # before min_observations nothing is skipped (and that spike joins the window)
    if window <= 10:  # once step 3 has left the window: a spike right after a spike is still judged
        assert got[20] and got[21] and got[90] and got[91]  # on the clean window, not widened by the first


def test_skip_spikes_is_built_from_config():
    assert build_spike_detector(ClipConfig()) is None
    detector = build_spike_detector(ClipConfig.from_dict({"skip_spikes": {}}))
    assert (detector.spec.window, detector.spec.sigma_factor, detector.spec.min_observations) == (128, 6.0, 16)


# ------------------------------------------------------------------ masked updates and state
def make_policy(kind: str, G: int = 3) -> Any:
    groups = groups_of(G, max_norm=3.0)
    return {
        "fixed": lambda: FixedPolicy(None, groups),
        "zclip": lambda: ZClipPolicy(ZClipPolicySpec(warmup_steps=5), groups),
        "zclip_pct": lambda: ZClipPolicy(ZClipPolicySpec(warmup_steps=5, mode="percentile", skip_update_on_spike=True), groups),
        "autoclip": lambda: AutoClipPolicy(AutoClipPolicySpec(history_length=6), groups),
        "adagc": lambda: AdaGCPolicy(AdaGCPolicySpec(warmup_steps=5), groups),
        "spikes": lambda: SpikeDetector(SkipSpikesSpec(window=8, min_observations=3, sigma_factor=2.0)),
        "set": lambda: mixed_policy_set(),
    }[kind]()


def mixed_policy_set() -> PolicySet:
    config = ClipConfig.from_dict({
        "max_norm": 3.0, "policy": {"kind": "adagc", "warmup_steps": 4},
        "groups": [{"name": "a", "match": "a*", "policy": {"kind": "zclip", "warmup_steps": 3}},
                   {"name": "b", "match": "b*"}],
        "per_layer": {"depth": 1, "match": "l*", "policy": {"kind": "autoclip", "history_length": 4}},
    })
    return build_policies(config, resolve_groups(config, ["a.w", "b.w", "l1.w", "l2.w", "c.w"]).groups)


KINDS = ["fixed", "zclip", "zclip_pct", "autoclip", "adagc", "spikes", "set"]


def run(policy, rows: list[list[float]], accepted: list[bool] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Steps of a policy (or the spike detector: then 'thresholds' is the skip flag)."""
    out = []
    for t, row in enumerate(rows):
        norms = norms_tensor(row)
        total = total_of(norms)
        ok = torch.tensor(True if accepted is None else accepted[t])
        if isinstance(policy, SpikeDetector):
            skip = policy.skip(norms, total)
            coefs = torch.ones_like(norms)
            policy.update(norms, total, coefs, ok & ~skip)
            out.append((skip, coefs))
        else:
            thresholds, coefs = policy.coefficients(norms, total)
            policy.update(norms, total, coefs, ok)
            out.append((thresholds, coefs))
    return out


def rows_for(G: int, steps: int, seed: int) -> list[list[float]]:
    rng = random.Random(seed)
    return [[(1 + 0.3 * rng.random()) * (20.0 if rng.random() < 0.1 else 1.0) for _ in range(G)] for _ in range(steps)]


def state_bits(state: Any) -> Any:
    """The state with every tensor as its raw bytes (bitwise comparison, NaN-safe)."""
    if isinstance(state, torch.Tensor):
        return (state.dtype, tuple(state.shape), state.reshape(-1).contiguous().view(torch.uint8).tolist())
    if isinstance(state, dict):
        return {k: state_bits(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [state_bits(v) for v in state]
    return state


def width_of(policy) -> int:
    return len(policy.names) if isinstance(policy, PolicySet) else 3


@pytest.mark.parametrize("kind", KINDS)
def test_rejected_or_nonfinite_steps_leave_state_bitwise_unchanged(kind):
    policy = make_policy(kind)
    G = width_of(policy)
    for warmup_phase in (True, False):
        run(policy, rows_for(G, 2 if warmup_phase else 10, seed=10))
        before = state_bits(policy.state_dict())
        run(policy, [[1e3] * G, [0.5] * G], accepted=[False, False])  # skipped steps, accepted=False
        nonfinite = [[math.nan] + [1.0] * (G - 1), [math.inf] * G, [1.0] * (G - 1) + [-math.inf]]
        run(policy, nonfinite)  # accepted=True but a non-finite norm: still never enters the state
        assert state_bits(policy.state_dict()) == before, f"{kind}: state changed (warm-up phase: {warmup_phase})"


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_resume_continues_bitwise(kind):
    original = make_policy(kind)
    G = width_of(original)
    rows = rows_for(G, 30, seed=11)
    run(original, rows[:12], accepted=[t != 7 for t in range(12)])
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    saved_bits = state_bits(original.state_dict())
    resumed = make_policy(kind)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    a, b = run(original, rows[12:]), run(resumed, rows[12:])
    for (ta, ca), (tb, cb) in zip(a, b):
        assert torch.equal(ta, tb) and torch.equal(ca, cb)
    assert state_bits(original.state_dict()) == state_bits(resumed.state_dict())
    assert saved_bits != state_bits(original.state_dict()) or kind == "fixed"  # the state did move on
    fresh = make_policy(kind)
    run(fresh, rows[12:])
    if kind != "fixed":  # the loaded state is what made the difference
        assert state_bits(fresh.state_dict()) != state_bits(resumed.state_dict())


def test_state_dict_is_a_copy():
    policy = make_policy("autoclip")
    run(policy, rows_for(3, 3, seed=12))
    state = policy.state_dict()
    kept = state_bits(state)
    run(policy, rows_for(3, 3, seed=13))
    assert state_bits(state) == kept


@pytest.mark.parametrize("change, message", [
    (lambda s: {**s, "kind": "autoclip"}, r"kind 'autoclip', not 'zclip'"),
    (lambda s: {**s, "version": 7}, r"version 7"),
    (lambda s: {**s, "num_groups": 2}, r"saved for 2 groups but this policy covers 3"),
    (lambda s: {**s, "warmup": torch.zeros(3, 9, dtype=F64)}, r"'warmup' has shape \(3, 9\)"),
    (lambda s: {k: v for k, v in s.items() if k != "mean"}, r"'mean' is missing"),
])
def test_loading_a_foreign_state_is_a_config_error(change, message):
    policy = make_policy("zclip")
    state = policy.state_dict()
    with pytest.raises(ConfigError, match=message):
        policy.load_state_dict(change(state))


def test_policy_set_state_is_keyed_by_group_name_and_checked():
    policies = mixed_policy_set()
    assert policies.names == ["a", "b", "l1", "l2", "default"]
    run(policies, rows_for(5, 6, seed=14))
    state = policies.state_dict()
    assert state["groups"] == ["a", "b", "l1", "l2", "default"]
    assert {k: (v["kind"], v["groups"]) for k, v in state["policies"].items()} == {
        "a": ("zclip", ["a"]), "b": ("adagc", ["b", "default"]), "l1": ("autoclip", ["l1", "l2"])}
    other = ClipConfig.from_dict({"max_norm": 3.0, "policy": {"kind": "adagc", "warmup_steps": 4},
                                  "groups": [{"name": "a", "match": "a*", "policy": {"kind": "autoclip", "history_length": 4}},
                                             {"name": "b", "match": "b*"}],
                                  "per_layer": {"depth": 1, "match": "l*", "policy": {"kind": "autoclip", "history_length": 4}}})
    same_layout = build_policies(other, resolve_groups(other, ["a.w", "b.w", "l1.w", "l2.w", "c.w"]).groups)
    before = state_bits(same_layout.state_dict())
    with pytest.raises(ConfigError, match="kind 'zclip', not 'autoclip'"):
        same_layout.load_state_dict(state)
    assert state_bits(same_layout.state_dict()) == before  # all or nothing: no policy was half loaded
    regrouped = ClipConfig.from_dict({"max_norm": 3.0, "policy": {"kind": "adagc", "warmup_steps": 4},
                                      "groups": [{"name": "a", "match": "a*", "policy": {"kind": "zclip", "warmup_steps": 3}},
                                                 {"name": "b", "match": "b*", "policy": {"kind": "adagc", "warmup_steps": 4}}],
                                      "per_layer": {"depth": 1, "match": "l*", "policy": {"kind": "autoclip", "history_length": 4}}})
    with pytest.raises(ConfigError, match="policy layout"):
        build_policies(regrouped, resolve_groups(regrouped, ["a.w", "b.w", "l1.w", "l2.w", "c.w"]).groups).load_state_dict(state)
    with pytest.raises(ConfigError, match=r"groups \['a', 'b', 'l1', 'l2', 'default'\] but this clipper has"):
        build_policies(ClipConfig(), groups_of(2)).load_state_dict(state)
    with pytest.raises(ConfigError, match="PolicySet"):
        policies.load_state_dict(state["policies"]["a"])


def test_policy_set_gives_each_group_its_own_policy():
    policies = mixed_policy_set()
    zclip, adagc, autoclip = policies.policies
    assert [g.name for g in zclip.groups] == ["a"] and [g.name for g in adagc.groups] == ["b", "default"]
    assert [g.name for g in autoclip.groups] == ["l1", "l2"]
    alone = {"a": make_like(zclip), "bd": make_like(adagc), "l": make_like(autoclip)}
    for row in rows_for(5, 12, seed=15):
        norms = norms_tensor(row)
        total = total_of(norms)
        thresholds, coefs = policies.coefficients(norms, total)
        policies.update(norms, total, coefs, TRUE)
        for key, index in {"a": [0], "bd": [1, 4], "l": [2, 3]}.items():
            sub = norms[index]
            t, c = alone[key].coefficients(sub, total)
            alone[key].update(sub, total, c, TRUE)
            assert torch.equal(thresholds[index], t) and torch.equal(coefs[index], c)


def make_like(policy: ClipPolicy) -> ClipPolicy:
    return type(policy)(policy.spec, policy.groups)


def test_all_fixed_groups_share_one_fixed_policy_and_the_excluded_group_is_never_clipped():
    config = ClipConfig.from_dict({"max_norm": 0.5, "groups": [{"name": "e", "match": "e*", "max_norm": 2.0}],
                                   "policy": {"kind": "zclip"}})
    table = resolve_groups(config, ["e.w", "x.w"]).restricted_to(["e.w"], 2.0)
    policies = build_policies(config, table.groups)
    assert [(type(p).__name__, [g.name for g in p.groups]) for p in policies.policies] == [
        ("ZClipPolicy", ["e", "default"]), ("FixedPolicy", ["<not clipped>"])]
    thresholds, _ = policies.coefficients(norms_tensor([1.0, 1.0, 9.0]), torch.tensor(9.0, dtype=F64))
    assert thresholds.tolist() == [2.0, 0.5, math.inf]
    plain = build_policies(ClipConfig(), resolve_groups(ClipConfig(), ["w"]).groups)
    assert len(plain.policies) == 1 and isinstance(plain.policies[0], FixedPolicy)


# ------------------------------------------------------------------------------------ no host sync
SYNCING = ["item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"]


@pytest.mark.parametrize("kind", KINDS)
def test_no_host_sync_and_no_new_host_tensors_per_step(monkeypatch, kind):
    policy = make_policy(kind)
    G = width_of(policy)
    rows = rows_for(G, 12, seed=16)
    run(policy, rows[:1])  # first use: state moves to the norms' device, index tensors are cached
    inputs = [(norms_tensor(r), total_of(norms_tensor(r))) for r in rows[1:]]
    calls: list[str] = []

    def counting(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"host sync: Tensor.{name}")
        return call

    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    monkeypatch.setattr(torch, "tensor", counting("torch.tensor"))
    monkeypatch.setattr(torch, "as_tensor", counting("torch.as_tensor"))
    try:
        for t, (norms, total) in enumerate(inputs):
            if isinstance(policy, SpikeDetector):
                skip = policy.skip(norms, total)
                policy.update(norms, total, norms, ~skip)
            else:
                _, coefs = policy.coefficients(norms, total)
                policy.update(norms, total, coefs, TRUE if t % 3 else FALSE)
    finally:
        monkeypatch.undo()
    assert calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.set_sync_debug_mode")
@pytest.mark.parametrize("kind", KINDS)
def test_no_device_sync_on_cuda(kind):
    policy = make_policy(kind)
    G = width_of(policy)
    rows = [norms_tensor(r).cuda() for r in rows_for(G, 12, seed=17)]
    accepted = torch.tensor(True, device="cuda")

    def one(norms):
        total = torch.linalg.vector_norm(norms)
        if isinstance(policy, SpikeDetector):
            policy.update(norms, total, norms, accepted & ~policy.skip(norms, total))
        else:
            _, coefs = policy.coefficients(norms, total)
            policy.update(norms, total, coefs, accepted)

    one(rows[0])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for norms in rows[1:]:
            one(norms)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert policy.state_dict()  # state stayed on the device, readable afterwards


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("data, fragments", [
    ({"policy": {"kind": "zclip", "alpha": 1.0}}, ["policy.alpha", "less than 1"]),
    ({"policy": {"kind": "zclip", "alpha": 0}}, ["policy.alpha", "greater than 0"]),
    ({"policy": {"kind": "zclip", "z_thresh": -1}}, ["policy.z_thresh", "greater than 0"]),
    ({"policy": {"kind": "zclip", "warmup_steps": 0}}, ["policy.warmup_steps", "greater than or equal to 1"]),
    ({"policy": {"kind": "zclip", "warmup_steps": True}}, ["policy.warmup_steps", "not a boolean"]),
    ({"policy": {"kind": "zclip", "mode": "pct"}}, ["policy.mode", "'zscore'", "'percentile'"]),
    ({"policy": {"kind": "zclip", "clip_option": "max"}}, ["policy.clip_option", "'adaptive_scaling'", "'mean'"]),
    ({"policy": {"kind": "zclip", "clip_factor": "nan"}}, ["policy.clip_factor", "'nan'"]),
    ({"policy": {"kind": "zclip", "clip_factor": "inf"}}, ["policy.clip_factor", "finite"]),
    ({"policy": {"kind": "zclip", "skip_update_on_spike": "often"}}, ["policy.skip_update_on_spike", "bool"]),
    ({"policy": {"kind": "zclip", "eps": 0}}, ["policy.eps", "greater than 0"]),
    ({"policy": {"kind": "zclip", "zthresh": 2}}, ["policy.zthresh", "unknown key", "did you mean 'z_thresh'"]),
    ({"policy": {"kind": "autoclip", "quantile": 1.5}}, ["policy.quantile", "less than or equal to 1"]),
    ({"policy": {"kind": "autoclip", "quantile": 90}}, ["policy.quantile", "90"]),
    ({"policy": {"kind": "autoclip", "history_length": 0}}, ["policy.history_length", "greater than or equal to 1"]),
    ({"policy": {"kind": "autoclip", "history": 5}}, ["policy.history", "did you mean 'history_length'"]),
    ({"policy": {"kind": "adagc", "lambda_rel": 0}}, ["policy.lambda_rel", "greater than 0"]),
    ({"policy": {"kind": "adagc", "beta": 1}}, ["policy.beta", "less than 1"]),
    ({"policy": {"kind": "adagc", "warmup_steps": 2.5}}, ["policy.warmup_steps", "integer"]),
    ({"policy": {"kind": "lars"}}, ["policy", "'lars'", "fixed, zclip, autoclip, adagc, agc"]),
    ({"policy": {"kind": "agc", "clip_factor": 0}}, ["policy.clip_factor", "greater than 0"]),
    ({"groups": [{"name": "a", "match": "x", "policy": {"kind": "zclip", "alpha": 2}}]}, ["groups[0].policy.alpha"]),
    ({"groups": [{"name": "a", "match": "x", "policy": {"kind": "adagc", "lamda_rel": 2}}]},
     ["groups[0].policy.lamda_rel", "did you mean 'lambda_rel'"]),
    ({"per_layer": {"depth": 1, "policy": {"kind": "autoclip", "quantile": -1}}}, ["per_layer.policy.quantile"]),
    ({"skip_spikes": {"window": 1}}, ["skip_spikes.window", "greater than or equal to 2"]),
    ({"skip_spikes": {"sigma_factor": 0}}, ["skip_spikes.sigma_factor", "greater than 0"]),
    ({"skip_spikes": {"window": 8, "min_observations": 9}}, ["skip_spikes", "min_observations = 9", "window = 8"]),
    ({"skip_spikes": {"sigma_facter": 3}}, ["skip_spikes.sigma_facter", "did you mean 'sigma_factor'"]),
    ({"per_parameter": "yes please"}, ["per_parameter", "bool"]),
    ({"per_parameter": True, "per_layer": {"depth": 1}}, ["per_parameter", "per_layer", "keep one"]),
])
def test_policy_config_errors_name_the_field(data, fragments):
    with pytest.raises(ConfigError) as err:
        ClipConfig.from_dict(data)
    for fragment in fragments:
        assert fragment in str(err.value), f"{fragment!r} not in {err.value}"


def test_policy_config_defaults_and_yaml_spellings():
    config = ClipConfig.from_dict({"policy": {"kind": "zclip", "eps": "1e-6"}, "skip_spikes": {"window": 64}})
    z = config.policy
    assert (z.alpha, z.z_thresh, z.warmup_steps, z.mode, z.clip_option, z.clip_factor, z.skip_update_on_spike,
            z.eps) == (0.97, 2.5, 25, "zscore", "adaptive_scaling", 1.0, False, 1e-6)
    a = ClipConfig.from_dict({"policy": {"kind": "autoclip"}}).policy
    assert (a.quantile, a.history_length) == (0.9, 1000)
    g = ClipConfig.from_dict({"policy": {"kind": "adagc"}}).policy
    assert (g.lambda_rel, g.beta, g.warmup_steps) == (1.05, 0.98, 100)
    assert config.skip_spikes.window == 64 and config.skip_spikes.min_observations == 16
    assert ClipConfig().per_parameter is False and ClipConfig().skip_spikes is None
    assert config.fingerprint() != config.replace(policy={"kind": "zclip", "alpha": 0.9}).fingerprint()
    assert ClipConfig.from_dict(config.to_dict()) == config  # round-trips through its dict form
