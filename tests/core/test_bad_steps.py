"""Bad steps and group roles in one process (issue 19, items 1-3): the config forms, bad-step streaks and their
resume, the attribution of a non-finite step (report, error, JSONL), measured-only and out-of-total groups
against the float64 reference, and how the roles meet policies, spikes, agc, the audit and folding.

The multi-rank checks (every layout, 2 and 4 ranks, collectives counted) are in
``tests/layouts/test_bad_steps_distributed.py`` and ``tests/deepspeed/test_deepspeed_bad_steps.py``.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import distclip
from distclip import ClipConfig, ConfigError, GradClipper, NonFiniteGradientError, SpikeStreakError, StateDictError
from tests.helpers.models import batch, loss_fn, make_model
from tests.helpers.reference import norm64, reference_clip, rel_err

STREAK = {"max_norm": 0.1, "nonfinite": {"action": "skip", "max_consecutive": 3}}
ROLES = [
    {"name": "embed", "match": "embed.*", "max_norm": None, "in_total": False},  # measured only, out of the total
    {"name": "attn", "match": "blocks.*.attn.*", "max_norm": 0.02, "in_total": False},  # clipped, out of the total
    {"name": "head", "match": "head.*", "max_norm": None},  # measured only, in the total
]


def backward(model, step: int, poison: str | None = None, value: float = math.nan) -> None:
    """A fresh backward of ``step``'s batch; ``poison``: a parameter whose gradient gets ``value`` at [0]."""
    model.zero_grad(set_to_none=True)
    loss_fn(model, *batch(step, 0)).backward()
    if poison is not None:
        with torch.no_grad():
            dict(model.named_parameters())[poison].grad.view(-1)[0] = value


# =============================================================================== config
@pytest.mark.parametrize("value, words", [
    ("drop", ["nonfinite = 'drop'", "'skip', 'error', 'zero', 'ignore'", "max_consecutive"]),
    ({"action": "error", "max_consecutive": 2}, ["max_consecutive must go with action skip or zero"]),
    ({"action": "ignore", "max_consecutive": 2}, ["max_consecutive must go with action skip or zero"]),
    ({"action": "skip", "max_consecutive": 0}, ["greater than or equal to 1"]),
    ({"action": "skip", "max_consecutive": True}, ["not a boolean"]),
    ({"action": "skip", "max_consecutive": 2.5}, ["max_consecutive"]),
    ({"action": "skip", "max_count": 2}, ["unknown key 'max_count'", "allowed keys: action, max_consecutive"]),
    ({"action": "halt"}, ["action", "'skip'"]),
    (3, ["got int"]),
])
def test_nonfinite_forms_are_validated(value, words):
    with pytest.raises(ConfigError) as err:
        ClipConfig.from_dict({"nonfinite": value})
    assert all(w in str(err.value) for w in words), str(err.value)


def test_nonfinite_forms_and_roles_round_trip():
    long = ClipConfig.from_dict({"nonfinite": {"action": "zero", "max_consecutive": 4}})
    assert (long.nonfinite_action, long.nonfinite_limit) == ("zero", 4)
    assert ClipConfig.from_dict(long.to_dict()) == long
    short, spelled = ClipConfig.from_dict({"nonfinite": "skip"}), ClipConfig.from_dict({"nonfinite": {"action": "skip"}})
    assert spelled.nonfinite == "skip" and spelled.fingerprint() == short.fingerprint()  # one config, two spellings
    assert (short.nonfinite_action, short.nonfinite_limit) == ("skip", None)
    roles = ClipConfig.from_dict({"groups": ROLES, "per_layer": {"depth": 2, "max_norm": None, "in_total": False}})
    dumped = roles.to_dict()
    assert [g.get("max_norm", "unset") for g in dumped["groups"]] == [None, 0.02, None]
    assert [g.get("in_total", True) for g in dumped["groups"]] == [False, False, True]
    assert dumped["per_layer"]["max_norm"] is None and dumped["per_layer"]["in_total"] is False
    again = ClipConfig.from_dict(dumped)
    assert again == roles and again.fingerprint() == roles.fingerprint()
    assert [g.measured_only for g in again.groups] == [True, False, True] and again.per_layer.measured_only
    assert roles.replace(max_norm=0.5).groups[0].measured_only  # replace() keeps the roles
    inherit = ClipConfig.from_dict({"groups": [{"name": "embed", "match": "embed.*"}]})
    assert not inherit.groups[0].measured_only and inherit.fingerprint() != ClipConfig.from_dict(
        {"groups": [{"name": "embed", "match": "embed.*", "max_norm": None}]}).fingerprint()
    spikes = ClipConfig.from_dict({"skip_spikes": {"max_consecutive": 5}})
    assert spikes.skip_spikes.max_consecutive == 5 and ClipConfig.from_dict(spikes.to_dict()) == spikes


@pytest.mark.parametrize("section", [
    {"groups": [{"name": "g", "match": "*", "max_norm": None, "policy": {"kind": "zclip"}}]},
    {"per_layer": {"depth": 2, "max_norm": None, "policy": {"kind": "autoclip"}}},
])
def test_a_measured_only_section_takes_no_adaptive_policy(section):
    with pytest.raises(ConfigError, match="measured only .* would never apply"):
        ClipConfig.from_dict(section)


# ============================================================================== streaks
def test_nonfinite_streak_raises_at_the_limit_after_recording_the_step(tmp_path):
    model = make_model()
    clipper = GradClipper(model, {**STREAK, "log": {"jsonl": str(tmp_path / "clip.jsonl"), "every": 100}})
    plan = [None, "head.weight", "head.weight", None, "tiny", "head.weight"]  # two bad, one good, two bad
    streaks = []
    for step, poison in enumerate(plan):
        backward(model, step, poison)
        report = clipper.clip()
        streaks.append((report.nonfinite_streak, report.to_metrics()["nonfinite_streak"], report.skipped))
    assert streaks == [(0, 0.0, False), (1, 1.0, True), (2, 2.0, True), (0, 0.0, False), (1, 1.0, True),
                       (2, 2.0, True)]
    backward(model, 6, "blocks.0.attn.weight")
    with pytest.raises(NonFiniteGradientError) as err:
        clipper.clip()
    message = str(err.value)
    assert "3 non-finite steps in a row (clips 5 to 7, all skipped)" in message and "max_consecutive = 3" in message
    assert "blocks.0.attn.weight (ranks [0])" in message, message
    assert (err.value.streak, err.value.nonfinite_params, err.value.nonfinite_ranks) == (3, ("blocks.0.attn.weight",), (0,))
    last = clipper.last_report  # recorded before the raise: the step is in the report, the counters and the log
    assert last.nonfinite_streak == 3 and last.skipped and clipper.steps == 7
    assert all(p.grad is None for p in model.parameters())  # and it was skipped (the gradients dropped)
    lines = [json.loads(line) for line in (tmp_path / "clip.jsonl").read_text().splitlines()[1:]]
    assert [line["step"] for line in lines] == [2, 3, 5, 6, 7]  # bad steps are written although every: 100
    assert [line["nonfinite_params"] for line in lines] == [["head.weight"]] * 2 + [["tiny"], ["head.weight"],
                                                                                   ["blocks.0.attn.weight"]]
    assert lines[-1]["nonfinite_streak"] == 3.0 and lines[-1]["nonfinite_where"] == {"blocks.0.attn.weight": [0]}


def test_zero_mode_streak_and_a_finite_step_ends_it():
    model = make_model()
    clipper = GradClipper(model, {"max_norm": 0.1, "nonfinite": {"action": "zero", "max_consecutive": 2}})
    backward(model, 0, "embed.weight")
    first = clipper.clip()
    assert first.nonfinite_streak == 1 and not first.skipped and all(not p.grad.any() for p in model.parameters())
    backward(model, 1)
    assert clipper.clip().nonfinite_streak == 0
    backward(model, 2, "embed.weight")
    clipper.clip()
    backward(model, 3, "embed.weight", math.inf)
    with pytest.raises(NonFiniteGradientError, match=r"2 non-finite steps in a row \(clips 3 to 4, all zeroed\)"):
        clipper.clip()


def test_streak_survives_a_resume_and_old_states_still_load():
    model = make_model()
    first = GradClipper(model, STREAK)
    for step in range(2):
        backward(model, step, "head.bias")
        first.clip()
    state = first.state_dict()
    assert state["version"] == 3 and state["streaks"] == {"nonfinite": 2, "spike": 0}
    resumed = GradClipper(model, STREAK)
    resumed.load_state_dict(state)
    backward(model, 2, "head.bias")
    with pytest.raises(NonFiniteGradientError, match="3 non-finite steps in a row"):
        resumed.clip()  # the third in a row across the resume
    old = {k: v for k, v in state.items() if k != "streaks"} | {"version": 2}  # saved before streaks existed
    fresh = GradClipper(model, STREAK)
    fresh.load_state_dict(old)
    assert fresh.streaks.nonfinite == 0 and fresh.steps == 2
    for junk in ({"nonfinite": -1, "spike": 0}, {"nonfinite": 1}, {"nonfinite": True, "spike": 0}, [1, 2]):
        with pytest.raises(StateDictError, match="'streaks'"):
            GradClipper(model, STREAK).load_state_dict({**state, "streaks": junk})
    assert GradClipper(model, STREAK).streaks.nonfinite == 0  # a failed load changes nothing


def test_error_mode_attributes_and_keeps_torch_words():
    model = make_model()
    clipper = GradClipper(model, {"max_norm": 0.1, "nonfinite": "error"})
    backward(model, 0, "blocks.1.mlp.0.weight", math.inf)
    saved = {n: p.grad.clone() for n, p in model.named_parameters()}
    with pytest.raises(NonFiniteGradientError) as err:
        clipper.clip()
    message = str(err.value)
    assert message.startswith("The total norm of order 2.0 for gradients from `parameters` is non-finite"), message
    assert "blocks.1.mlp.0.weight (ranks [0])" in message and err.value.streak == 1
    assert clipper.last_report.nonfinite_params == ("blocks.1.mlp.0.weight",)
    assert all(torch.equal(p.grad, saved[n]) for n, p in model.named_parameters())  # left as they were


def test_loss_scale_overflow_neither_counts_nor_ends_a_streak():
    model = make_model()
    clipper = GradClipper(model, STREAK)
    backward(model, 0, "tiny")
    assert clipper.clip().nonfinite_streak == 1
    backward(model, 1, "tiny")
    overflow = clipper.clip(pending_scale=torch.tensor(1024.0))  # GradScaler still carries its scale: its skip
    assert overflow.skip_reason == "overflow" and overflow.nonfinite_streak == 1
    assert overflow.nonfinite_params == ("tiny",)  # attributed all the same
    backward(model, 2, "tiny")
    assert clipper.clip().nonfinite_streak == 2


def spike_clipper(model, limit: int | None = 2) -> GradClipper:
    return GradClipper(model, {"max_norm": math.inf, "skip_spikes": {
        "window": 8, "min_observations": 4, "sigma_factor": 3.0, **({"max_consecutive": limit} if limit else {})}})


def spiky_backward(model, step: int, spike: bool) -> None:
    model.zero_grad(set_to_none=True)
    loss_fn(model, *batch(step, 0), scale=1e3 if spike else 1.0).backward()


def test_spike_streak_raises_spike_streak_error_and_resumes():
    model = make_model()
    clipper = spike_clipper(model)
    for step in range(5):
        spiky_backward(model, step, False)
        assert not clipper.clip().skipped
    spiky_backward(model, 5, True)
    first = clipper.clip()
    assert (first.skip_reason, first.spike_streak, first.to_metrics()["spike_streak"]) == ("spike", 1, 1.0)
    assert first.nonfinite_params is None  # a spike is finite: nothing to attribute, no extra collective
    state = clipper.state_dict()
    spiky_backward(model, 6, False)
    assert clipper.clip().spike_streak == 0  # an accepted step ends the streak
    resumed = spike_clipper(model)
    resumed.load_state_dict(state)  # back to one spike in a row
    spiky_backward(model, 6, True)
    with pytest.raises(SpikeStreakError) as err:
        resumed.clip()
    assert err.value.streak == 2 and "2 steps in a row skipped as spikes" in str(err.value)
    assert "skip_spikes.max_consecutive = 2" in str(err.value) and isinstance(err.value, distclip.BadStepError)


# ========================================================================== attribution
def test_attribution_names_every_parameter_in_model_order_and_an_overflow_names_none():
    model = make_model()
    clipper = GradClipper(model, {"max_norm": 0.1})
    backward(model, 0, "tiny")
    with torch.no_grad():
        model.embed.weight.grad[3, 2] = -math.inf
        model.blocks[1].norm.bias.grad[5] = math.nan
    report = clipper.clip()
    order = [n for n, _ in model.named_parameters()]  # the model's order: tiny (the root's own) comes first
    assert order.index("tiny") < order.index("embed.weight") < order.index("blocks.1.norm.bias")
    assert report.nonfinite_params == ("tiny", "embed.weight", "blocks.1.norm.bias") and report.nonfinite_ranks == (0,)
    assert report.details()["nonfinite_where"] == {"embed.weight": [0], "blocks.1.norm.bias": [0], "tiny": [0]}
    huge = GradClipper(model, {"max_norm": 0.1, "norm_type": 40.0})  # every element finite, sum |g|^40 is not
    backward(model, 1)
    with torch.no_grad():
        model.head.weight.grad.fill_(1e10)
    overflowed = huge.clip()
    assert overflowed.skipped and math.isinf(overflowed.total_norm.item())
    assert overflowed.nonfinite_params == () and overflowed.nonfinite_ranks == ()
    backward(model, 2)
    good = clipper.clip()
    assert good.nonfinite_params is None and good.details() == {}


def test_ignore_mode_reads_nothing_and_attributes_nothing():
    model = make_model()
    clipper = GradClipper(model, {"max_norm": 0.1, "nonfinite": "ignore"})
    backward(model, 0, "tiny")
    report = clipper.clip()
    assert report.nonfinite_params is None and report.nonfinite_streak == 0  # torch semantics: no flag is read


# ================================================================================ roles
@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("grouped", [False, True])
def test_roles_match_the_float64_reference(p, grouped):
    groups = ROLES if grouped else ROLES[:1]  # uniform: one measured-only group out of the total, the rest default
    config = {"max_norm": 0.05, "norm_type": p, "groups": groups}
    model = make_model()
    clipper = GradClipper(model, config)
    backward(model, 0)
    with torch.no_grad():
        model.embed.weight.grad.mul_(1e4)  # huge but benign: must not shrink anything (the Muon case)
    grads = {n: q.grad.detach().clone() for n, q in model.named_parameters()}
    report = clipper.clip()
    ref = reference_clip(grads, config)
    assert rel_err(report.total_norm.item(), ref["total"]) <= 1e-6
    assert ref["total"] < norm64(list(grads.values()), p)  # the left-out groups are really out of the total
    for g, norm in ref["groups"].items():
        assert rel_err(report.group_norms[g].item(), norm) <= 1e-6, g
        assert report.coefs[g].item() == pytest.approx(ref["coefs"][g], rel=1e-6), g
    assert report.coefs["embed"].item() == 1.0 and report.thresholds["embed"].item() == math.inf
    assert ref["coefs"]["default"] < 1.0  # the rest is clipped
    for n, q in model.named_parameters():
        torch.testing.assert_close(q.grad.double(), ref["clipped"][n], rtol=1e-6, atol=1e-12)
    metrics = report.to_metrics()
    assert metrics["clipped/embed"] == 0.0 and metrics["clip_threshold/embed"] == math.inf
    assert metrics["grad_norm"] == report.total_norm.item()


def test_a_measured_only_group_escapes_the_top_level_policy_and_agc():
    model = make_model()
    config = {"max_norm": 1.0, "policy": {"kind": "zclip", "warmup_steps": 2},
              "groups": [{"name": "embed", "match": "embed.*", "max_norm": None}, {"name": "head", "match": "head.*"}]}
    clipper = GradClipper(model, config)
    covered = {entry_key: entry["groups"] for entry_key, entry in clipper.state_dict()["policy"]["policies"].items()}
    assert covered == {"embed": ["embed"], "head": ["head", "default"]}  # embed: the fixed policy, never clipped
    for step in range(4):
        backward(model, step)
        with torch.no_grad():
            model.embed.weight.grad.mul_(10.0 ** step)  # a growing norm zclip would clip
        report = clipper.clip()
        assert report.coefs["embed"].item() == 1.0 and report.thresholds["embed"].item() == math.inf
    agc = GradClipper(model, {"policy": {"kind": "agc"}, "groups": [{"name": "embed", "match": "embed.*", "max_norm": None}]})
    assert "embed" not in {agc.group_names[g] for g in agc.rows.groups}  # row-wise clipping covers the rest only
    backward(model, 0)
    saved = model.embed.weight.grad.clone()
    agc.clip()
    assert torch.equal(model.embed.weight.grad, saved)


def test_spikes_watch_the_total_without_the_left_out_groups():
    model = make_model()
    clipper = GradClipper(model, {"max_norm": math.inf, "groups": [{"name": "embed", "match": "embed.*", "in_total": False}],
                                  "skip_spikes": {"window": 8, "min_observations": 4, "sigma_factor": 3.0}})
    for step in range(6):
        backward(model, step)
        with torch.no_grad():
            model.embed.weight.grad.mul_(1e6 if step == 5 else 1.0)  # a spike in the left-out group only
        assert not clipper.clip().skipped, step
    backward(model, 6)
    with torch.no_grad():
        model.head.weight.grad.mul_(1e6)  # a spike in the total
    assert clipper.clip().skip_reason == "spike"


def test_a_nonfinite_measured_only_group_is_still_a_bad_step():
    model = make_model()
    clipper = GradClipper(model, {"max_norm": 0.1, "groups": [{"name": "embed", "match": "embed.*", "max_norm": None,
                                                                "in_total": False}]})
    backward(model, 0, "embed.weight")
    report = clipper.clip()
    assert report.skipped and math.isfinite(report.total_norm.item()) and report.nonfinite_params == ("embed.weight",)
    ignoring = GradClipper(model, {"max_norm": 0.1, "nonfinite": "ignore", "groups": [
        {"name": "embed", "match": "embed.*", "max_norm": None, "in_total": False}]})
    backward(model, 0, "embed.weight")
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    report = ignoring.clip()
    assert report.coefs["embed"].item() == 1.0  # not inf / inf = NaN: the measured-only group is never multiplied
    assert torch.equal(model.head.weight.grad, before["head.weight"] * report.coefs["default"])
    assert torch.isfinite(model.head.weight.grad).all()


def test_the_audit_does_not_call_a_measured_only_group_stale_and_folding_is_refused():
    model = make_model()
    config = {"max_norm": 0.01, "audit": {"every": 1, "stale_after": 2},
              "groups": [{"name": "embed", "match": "embed.*", "max_norm": None}]}
    clipper = GradClipper(model, config)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for step in range(4):
            backward(model, step)
            clipper.clip()
    stale = [str(w.message) for w in seen if issubclass(w.category, distclip.StaleClippingWarning)]
    assert stale and all("'default'" in s for s in stale), stale  # the clipped group is flagged, embed never
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    with pytest.raises(ConfigError, match="one coefficient per group"):
        clipper.attach(optimizer, fold=True)
    attached = clipper.attach(optimizer)  # not folded: the groups are scaled apart
    backward(model, 4)
    embed = model.embed.weight.grad.clone()
    optimizer.step()
    assert not attached.fold and torch.equal(model.embed.weight.grad, embed)


def test_nonfinite_search_in_bounded_batches_is_exact(monkeypatch):
    """Pieces split into parts and parts batched (a tiny batch forces both), mixed dtypes, a non-contiguous
    piece, an empty one; huge finite values (whose sum would overflow) are not flagged."""
    from distclip.core import attribution

    monkeypatch.setattr(attribution, "_BATCH", 100)
    pieces = [torch.randn(350), torch.randn(7, 3).t(), torch.zeros(0), torch.randn(5).to(torch.bfloat16),
              torch.randn(250, dtype=torch.float64), torch.full((400,), 3e38), torch.randn(120)]
    pieces[0][340] = math.inf
    pieces[3][2] = math.nan
    pieces[6][0] = -math.inf
    flags = attribution.nonfinite_flags(pieces, torch.device("cpu"))
    assert flags.tolist() == [True, False, False, True, False, False, True]
    assert flags.tolist() == [not bool(torch.isfinite(p).all()) for p in pieces]  # the obvious way agrees
