"""Seeing what clipping does (issue 13): ClipReport.to_metrics, running clip rates, sinks, the audit.

Multi-rank checks run on 2 gloo ranks (DDP) and compare with the independent float64 reference
(tests/reference.py): the per-group norms, whether each group was clipped, and the running clip
rate against a count made here from the reference norms.
"""

from __future__ import annotations

import json
import math
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import distclip
from distclip import (
    ClipAuditError,
    ClipConfig,
    ConfigError,
    GradClipper,
    JSONLSink,
    MissingExtraError,
)
from distclip.core.audit import StaleClippingWarning
from distclip.testing import run_ranks
from tests.helpers.checks import cpu_kernel_flag_read
from tests.helpers.models import batch, loss_fn, make_model
from tests.helpers.reference import reference_run, rel_err

WORLD, STEPS, LR = 2, 8, 0.5
# Thresholds chosen so that, on the reference trajectory, every group is clipped on some steps and not on others.
CONFIG = {"max_norm": 0.15, "groups": [{"name": "embed", "match": "embed.*", "max_norm": 0.01},
                                       {"name": "head", "match": "head.*", "max_norm": 0.16}]}
GROUPS = ["embed", "head", "default"]
FAMILIES = ["grad_norm", "clip_coef", "clip_threshold", "clipped", "nonfinite", "clip_rate"]
EXPECTED_KEYS = ["grad_norm", "skipped", "nonfinite_streak", "spike_streak"] + [f"{f}/{g}" for f in FAMILIES for g in GROUPS]


def ddp_training(config: dict, steps: int, inject=None, audit_patch=None) -> list[dict]:
    """``steps`` of DDP clip + SGD; per step the report's metrics and its own numbers."""
    rank = dist.get_rank()
    model = DDP(make_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    clipper = GradClipper(model, config)
    if audit_patch is not None:
        audit_patch(clipper, rank)
    out = []
    for step in range(steps):
        optimizer.zero_grad()
        loss_fn(model, *batch(step, rank)).backward()
        if inject is not None:
            inject(model.module, step)
        report = clipper.clip()
        optimizer.step()
        floats = report.to_floats()
        out.append({"metrics": report.to_metrics(), "total": floats["total_norm"], "groups": floats["group_norms"],
                    "coefs": floats["coefs"], "thresholds": {k: v.item() for k, v in report.thresholds.items()},
                    "skipped": report.skipped})
    clipper.close()
    return out


# ------------------------------------------------------------------------------------------ to_metrics
@pytest.mark.multiprocess
def test_to_metrics_matches_the_report_and_the_reference_on_two_ranks():
    results = run_ranks(ddp_training, WORLD, CONFIG, STEPS)
    assert results[0] == results[1]  # the same numbers on every rank, bitwise
    refs = reference_run(CONFIG, WORLD, STEPS, LR)
    thresholds = {"embed": 0.01, "head": 0.16, "default": 0.15}
    counts = dict.fromkeys(GROUPS, 0)  # the running clip count, made here from the reference norms
    for step, (rec, ref) in enumerate(zip(results[0], refs)):
        metrics = rec["metrics"]
        assert list(metrics) == EXPECTED_KEYS
        assert all(type(v) is float for v in metrics.values())
        assert metrics["grad_norm"] == rec["total"] and metrics["skipped"] == 0.0
        assert rel_err(metrics["grad_norm"], ref["total"]) <= 1e-5
        for g in GROUPS:
            assert metrics[f"grad_norm/{g}"] == rec["groups"][g]
            assert metrics[f"clip_coef/{g}"] == rec["coefs"][g]
            assert metrics[f"clip_threshold/{g}"] == rec["thresholds"][g] == pytest.approx(thresholds[g])
            assert metrics[f"nonfinite/{g}"] == 0.0
            norm = ref["groups"][g]
            assert rel_err(metrics[f"grad_norm/{g}"], norm) <= 1e-5
            assert abs(norm - thresholds[g]) > 1e-3 * thresholds[g], (step, g, norm)  # no decision on a knife edge
            clipped = norm + 1e-6 > thresholds[g]
            counts[g] += clipped
            assert metrics[f"clipped/{g}"] == float(clipped), (step, g, norm)
            assert metrics[f"clip_rate/{g}"] == counts[g] / (step + 1), (step, g)
    assert all(0 < counts[g] < STEPS for g in GROUPS), counts  # every group clipped on some steps, not all


def poison_head(model, step: int) -> None:
    if step == 1:  # as a NaN from the reduced gradient would be: on every rank
        model.head.weight.grad.fill_(math.nan)


@pytest.mark.multiprocess
def test_nonfinite_names_the_group_that_went_nan_and_the_step_counts_as_no_clip():
    results = run_ranks(ddp_training, WORLD, CONFIG, 3, poison_head)
    assert json.dumps(results[0]) == json.dumps(results[1])  # the same on every rank (NaN included)
    bad = results[0][1]["metrics"]
    assert bad["skipped"] == 1.0 and results[0][1]["skipped"]
    assert {g: bad[f"nonfinite/{g}"] for g in GROUPS} == {"embed": 0.0, "head": 1.0, "default": 0.0}
    assert all(bad[f"clipped/{g}"] == 0.0 for g in GROUPS)
    before, after = results[0][0]["metrics"], results[0][2]["metrics"]
    for g in GROUPS:  # the skipped step is a clip that clipped nothing: it lowers the rate
        assert bad[f"clip_rate/{g}"] == before[f"clip_rate/{g}"] * 1 / 2
        assert after[f"clip_rate/{g}"] == (before[f"clipped/{g}"] + after[f"clipped/{g}"]) / 3
        assert after[f"nonfinite/{g}"] == 0.0


def test_to_metrics_syncs_once_and_measure_does_not_count():
    model = make_model()
    clipper = GradClipper(model, {"max_norm": 1e-3})
    loss_fn(model, *batch(0, 0)).backward()
    measured = clipper.measure()
    assert measured.to_metrics()["clipped/default"] == 1.0  # it would clip...
    assert clipper.counters.steps == 0 and measured.to_metrics()["clip_rate/default"] == 0.0  # ...but is not counted
    report = clipper.clip()
    calls = []
    original = torch.Tensor.tolist

    def counting(self):
        calls.append(1)
        return original(self)

    torch.Tensor.tolist = counting
    try:
        metrics = report.to_metrics()
    finally:
        torch.Tensor.tolist = original
    assert calls == [1] and metrics["clip_rate/default"] == 1.0


SYNCING = ["item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"]


def test_clip_counts_and_logging_add_no_host_sync(monkeypatch, tmp_path):
    """nonfinite: ignore is the clip without a host sync; counting the clip rates (and a log, an audit that are not
    due) must keep it that way."""
    model = make_model()
    config = {"max_norm": 1e-4, "nonfinite": "ignore", "groups": [{"name": "embed", "match": "embed.*"}],
              "log": {"every": 1000, "jsonl": str(tmp_path / "log.jsonl")}, "audit": {"every": 1000}}
    clipper = GradClipper(model, config)
    clipper.add_sink(JSONLSink(tmp_path / "other.jsonl"), every=500)
    for step in range(2):  # first use: constants cached, counters allocated
        model.zero_grad()
        loss_fn(model, *batch(step, 0)).backward()
        clipper.clip()
    calls: list[str] = []

    def counting(name):

        def call(*args, **kwargs):
            if cpu_kernel_flag_read(sys._getframe(1).f_code.co_filename, args):
                return originals[name](*args, **kwargs)
            calls.append(name)
            raise AssertionError(f"host sync: {name}")
        return call

    originals = {f"Tensor.{n}": getattr(torch.Tensor, n) for n in SYNCING}

    for step in range(2, 6):
        model.zero_grad()
        loss_fn(model, *batch(step, 0)).backward()
        with monkeypatch.context() as patch:
            for name in SYNCING:
                patch.setattr(torch.Tensor, name, counting(f"Tensor.{name}"))
            patch.setattr(torch, "tensor", counting("torch.tensor"))
            patch.setattr(torch, "as_tensor", counting("torch.as_tensor"))
            report = clipper.clip()
    assert calls == []
    assert report.clip_steps == 6 and report.clip_counts.tolist() == [6, 6]  # both groups clipped every time
    assert not (tmp_path / "log.jsonl").exists() and not (tmp_path / "other.jsonl").exists()


def test_clip_counts_resume_from_the_state_dict():
    model = make_model()
    config = {"max_norm": 0.05, "groups": [{"name": "embed", "match": "embed.*", "max_norm": 1e6}]}
    first = GradClipper(model, config)
    for step in range(3):
        model.zero_grad()
        loss_fn(model, *batch(step, 0)).backward()
        first.clip()
    state = first.state_dict()
    assert state["counts"]["steps"] == 3 and state["counts"]["clipped"].tolist() == [0, 3]
    resumed = GradClipper(model, config)
    resumed.load_state_dict(state)
    loss_fn(model, *batch(3, 0)).backward()
    metrics = resumed.clip().to_metrics()
    assert metrics["clip_rate/default"] == 1.0 and metrics["clip_rate/embed"] == 0.0
    assert resumed.counters.steps == 4
    old = {k: v for k, v in state.items() if k != "counts"}  # a state saved before the counts existed
    fresh = GradClipper(model, config)
    fresh.load_state_dict(old)
    assert fresh.counters.steps == 0
    with pytest.raises(distclip.StateDictError, match="counts"):
        fresh.load_state_dict({**state, "counts": {"steps": 3, "clipped": torch.zeros(5, dtype=torch.long)}})


# --------------------------------------------------------------------------------------------- sinks
def jsonl_training(path: str, per_rank: str) -> list[dict]:
    rank = dist.get_rank()
    model = DDP(make_model())
    clipper = GradClipper(model, {**CONFIG, "log": {"every": 2, "jsonl": path}})
    clipper.add_sink(JSONLSink(per_rank.format(rank=rank)), every=3)
    everyone = clipper.add_sink(JSONLSink(per_rank.format(rank=f"all{rank}")), rank=None)
    assert everyone is not None
    metrics = []
    for step in range(6):
        model.zero_grad()
        loss_fn(model, *batch(step, rank)).backward()
        metrics.append(clipper.clip().to_metrics())
    clipper.close()
    return metrics


def read_jsonl(path) -> tuple[dict, list[dict]]:
    lines = [json.loads(line) for line in open(path)]
    return lines[0], lines[1:]


@pytest.mark.multiprocess
def test_jsonl_is_written_by_rank_zero_every_n_clips(tmp_path):
    path, per_rank = tmp_path / "clip.jsonl", str(tmp_path / "rank{rank}.jsonl")
    results = run_ranks(jsonl_training, WORLD, str(path), per_rank)
    header, records = read_jsonl(path)
    assert [r["step"] for r in records] == [2, 4, 6]
    for record in records:
        assert record == {"step": record["step"], **results[0][record["step"] - 1]}
    assert ClipConfig.from_dict(header["distclip"]["config"]) == ClipConfig.from_dict({**CONFIG, "log": {
        "every": 2, "jsonl": str(path)}})
    assert [g["name"] for g in header["distclip"]["groups"]] == GROUPS
    _, own = read_jsonl(tmp_path / "rank0.jsonl")
    assert [r["step"] for r in own] == [3, 6]
    assert not (tmp_path / "rank1.jsonl").exists()  # rank 1 writes nothing: the numbers are rank 0's too
    # rank=None: every rank writes its own file, at the config's every (2), with identical numbers
    assert read_jsonl(tmp_path / "rankall0.jsonl")[1] == read_jsonl(tmp_path / "rankall1.jsonl")[1] == records


def test_tensorboard_sink_is_read_back_by_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = make_model()
    clipper = GradClipper(model, {**CONFIG, "log": {"every": 2, "tensorboard": str(tmp_path / "tb")}})
    written = {}
    for step in range(1, 6):
        model.zero_grad()
        loss_fn(model, *batch(step, 0)).backward()
        metrics = clipper.clip().to_metrics()
        if step % 2 == 0:
            written[step] = metrics
    clipper.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(EXPECTED_KEYS)
    for key in EXPECTED_KEYS:
        got = {e.step: e.value for e in events.Scalars(key)}
        assert got == {s: pytest.approx(m[key], rel=1e-6, abs=1e-30) for s, m in written.items()}, key
    assert "distclip/config/text_summary" in events.Tags()["tensors"]  # the config, as text


def test_tensorboard_without_the_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # "import tensorboard" raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'distclip\[tensorboard\]'"):
        distclip.TensorBoardSink(tmp_path)
    with pytest.raises(MissingExtraError, match=r"distclip\[tensorboard\]"):
        GradClipper(make_model(), {"log": {"tensorboard": str(tmp_path)}})
    assert isinstance(MissingExtraError("x"), ImportError)


@pytest.mark.parametrize("data, fragments", [
    ({"log": {"every": 0}}, ["log.every", "greater than or equal to 1"]),
    ({"log": {"every": True}}, ["log.every", "not a boolean"]),
    ({"log": {"jsonl": ""}}, ["log.jsonl", "non-empty"]),
    ({"log": {"jsonl": 3}}, ["log.jsonl", "path", "int"]),
    ({"log": {"tensorboard": ["a"]}}, ["log.tensorboard", "path"]),
    ({"log": {"jsnl": "x.jsonl"}}, ["log.jsnl", "unknown key", "did you mean 'jsonl'"]),
    ({"log": "runs/x.jsonl"}, ["log", "every: N, jsonl: PATH"]),
    ({"audit": "yes"}, ["audit", "true, false, or a mapping"]),
    ({"audit": 5}, ["audit", "true, false, or a mapping"]),
    ({"audit": {"every": 0}}, ["audit.every", "greater than or equal to 1"]),
    ({"audit": {"stale_after": -3}}, ["audit.stale_after"]),
    ({"audit": {"on_mismatch": "ignore"}}, ["audit.on_mismatch", "'raise'", "'warn'"]),
    ({"audit": {"stale": 10}}, ["audit.stale", "did you mean 'stale_after'"]),
])
def test_log_and_audit_config_errors_name_the_key(data, fragments):
    with pytest.raises(ConfigError) as err:
        ClipConfig.from_dict(data)
    for fragment in fragments:
        assert fragment in str(err.value), f"{fragment!r} not in {err.value}"


def test_log_and_audit_config_defaults_and_round_trip():
    config = ClipConfig.from_dict({"log": {"jsonl": "runs/x.jsonl"}, "audit": True})
    assert (config.log.every, config.log.jsonl, config.log.tensorboard) == (1, "runs/x.jsonl", None)
    assert (config.audit.every, config.audit.stale_after, config.audit.on_mismatch) == (100, 1000, "raise")
    assert ClipConfig.from_dict(config.to_dict()) == config
    assert ClipConfig.from_dict({"audit": False}).audit is None


def test_add_sink_refuses_what_is_not_a_sink():
    clipper = GradClipper(make_model())
    with pytest.raises(distclip.UsageError, match="write"):
        clipper.add_sink("runs/x.jsonl")
    with pytest.raises(distclip.UsageError, match="every"):
        clipper.add_sink(JSONLSink("x"), every=0)


# --------------------------------------------------------------------------------------------- audit
AUDIT = {**CONFIG, "audit": {"every": 1}}


def halve_scale_on_rank_one(clipper, rank):
    if rank == 1:
        original = clipper.adapter.scale

        def scale(coefs, groups, host_coefs=None):
            return original(coefs * 0.5, groups, None if host_coefs is None else [c * 0.5 for c in host_coefs])

        clipper.adapter.scale = scale


def skip_scale_on_rank_one(clipper, rank):
    if rank == 1:
        clipper.adapter.scale = lambda *args, **kwargs: None


def other_coefficients_on_rank_one(clipper, rank):
    if rank == 1:
        original = clipper.policy.coefficients

        def coefficients(norms, total):
            thresholds, coefs = original(norms, total)
            return thresholds, coefs * 0.9

        clipper.policy.coefficients = coefficients


def audited(config: dict, patch, steps: int = 4):
    try:
        ddp_training(config, steps, audit_patch=patch)
    except ClipAuditError as err:
        return str(err)
    return None


@pytest.mark.multiprocess
@pytest.mark.parametrize("patch, finds", [
    (halve_scale_on_rank_one, "rank 1: measured on its own gradients, APPLY scaled"),
    (skip_scale_on_rank_one, "rank 1: measured on its own gradients, APPLY scaled"),
    (other_coefficients_on_rank_one, "rank 1 applied scale of groups"),
])
def test_audit_names_the_rank_that_scaled_differently(patch, finds):
    messages = run_ranks(audited, WORLD, AUDIT, patch)
    assert messages[0] is not None and messages[0] == messages[1]  # raised on every rank, the same words
    assert "ranks [1] did not clip like the others" in messages[0] and finds in messages[0], messages[0]
    if patch is halve_scale_on_rank_one:  # rank 1 counts none of embed's elements (DDP splits replicas by tensor),
        assert "embed by" in messages[0]  # but it scales its copy: that is measured too


@pytest.mark.multiprocess
def test_audit_passes_when_ranks_agree_also_on_skipped_steps():
    def quiet(config):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no mismatch warning...
            warnings.simplefilter("error", StaleClippingWarning)  # ...and no stale one
            ddp_training(config, 4, inject=poison_head)
        return "ok"

    assert run_ranks(quiet, WORLD, {**AUDIT, "audit": {"every": 1, "stale_after": 100}}) == ["ok", "ok"]


def warn_mode(config, patch):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = ddp_training(config, 3, audit_patch=patch)
    return len(records), [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.multiprocess
def test_audit_warn_mode_keeps_training_and_warns_on_rank_zero():
    results = run_ranks(warn_mode, WORLD, {**CONFIG, "audit": {"every": 2, "on_mismatch": "warn"}},
                        halve_scale_on_rank_one)
    (steps0, warned0), (steps1, warned1) = results
    assert steps0 == steps1 == 3
    assert len(warned0) == 1 and "ranks [1]" in warned0[0] and warned1 == []  # audited at clip 2 only


def stale_warnings(max_norm: float, steps: int = 12) -> list[str]:
    model = make_model()
    config = {"max_norm": max_norm, "groups": [{"name": "embed", "match": "embed.*", "max_norm": math.inf}],
              "audit": {"every": 2, "stale_after": 4}}
    clipper = GradClipper(model, config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            model.zero_grad()
            loss_fn(model, *batch(step, 0)).backward()
            clipper.clip()
    return [str(w.message) for w in caught if w.category is StaleClippingWarning]


def test_stale_clipping_warns_once_when_always_on_and_when_never_on():
    always = stale_warnings(1e-6)
    assert len(always) == 1 and "group 'default' was clipped on each of the last 4 clips" in always[0]
    never = stale_warnings(1e6)
    assert len(never) == 1 and "group 'default' was not clipped in any of the last 4 clips" in never[0]
    assert stale_warnings(1e6, steps=3) == []  # not yet a long stretch (and embed, measured only, never warns)


def sharded_audit(layout: str, patch) -> str | None:
    """FSDP1 (FULL_SHARD) or FSDP2 (fully_shard) with the audit on every clip, 3 steps of clip + SGD."""
    from tests.helpers.fsdp_helpers import GROUPS as FSDP_GROUPS
    from tests.helpers.fsdp_helpers import make_net

    rank = dist.get_rank()
    model = make_net()
    if layout == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy

        model = FSDP(model, device_id=torch.device("cpu"), sharding_strategy=ShardingStrategy.FULL_SHARD)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    clipper = GradClipper(model, {"max_norm": 0.1, "groups": FSDP_GROUPS, "audit": {"every": 1}})
    if patch is not None:
        patch(clipper, rank)
    try:
        for step in range(3):
            optimizer.zero_grad()
            loss_fn(model, *batch(step, rank)).backward()
            clipper.clip()
            optimizer.step()
    except ClipAuditError as err:
        return str(err)
    return None


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", ["fsdp1", "fsdp2"])
def test_audit_on_sharded_gradients(layout):
    assert run_ranks(sharded_audit, WORLD, layout, None) == [None, None]  # agreeing ranks: no false alarm
    messages = run_ranks(sharded_audit, WORLD, layout, halve_scale_on_rank_one)
    assert messages[0] == messages[1] and "ranks [1] did not clip like the others" in messages[0], messages


# --------------------------------------------------------------------------------------- integrations
def test_accelerate_trackers_and_the_log_section_get_the_same_keys(tmp_path):
    """distclip.accelerate: log_to_trackers -> accelerator.log (a real TensorBoard tracker), log: -> JSONL."""
    pytest.importorskip("accelerate")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import distclip.accelerate
    from tests.helpers.accelerate_shim import cpu_accelerator, reset_accelerate

    accelerator = cpu_accelerator(log_with="tensorboard", project_dir=str(tmp_path))
    try:
        accelerator.init_trackers("clip")
        clipping = distclip.accelerate.enable(accelerator, {**CONFIG, "log": {"jsonl": str(tmp_path / "clip.jsonl")}})
        distclip.accelerate.log_to_trackers(accelerator, every=2)
        model = accelerator.prepare(make_model())
        written = {}
        for step in range(1, 5):
            model.zero_grad()
            loss_fn(model, *batch(step, 0)).backward()
            accelerator.clip_grad_norm_(model.parameters(), 0.15)
            written[step] = clipping.last_report.to_metrics()
        accelerator.end_training()
        distclip.accelerate.disable(accelerator)
    finally:
        reset_accelerate()
    header, records = read_jsonl(tmp_path / "clip.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[2] == {"step": 3, **written[3]}
    assert [g["name"] for g in header["distclip"]["groups"]] == GROUPS
    event_dirs = [p.parent for p in tmp_path.rglob("events.out.tfevents*")]
    scalars: dict[str, dict[int, float]] = {}
    for folder in event_dirs:
        events = EventAccumulator(str(folder))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
    assert set(scalars) == set(EXPECTED_KEYS), sorted(scalars)
    assert scalars["clip_rate/embed"] == {s: pytest.approx(written[s]["clip_rate/embed"]) for s in (2, 4)}
