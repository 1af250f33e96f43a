"""``distclip plot`` and ``distclip suggest`` on clip logs: synthetic ones with known numbers, a real clipper's,
and the demo's (measure with max_norm: inf, suggest, feed the suggestion back, clip at about the asked rate)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import yaml

from distclip import ClipConfig, GradClipper
from distclip.cli.main import main as distclip_main
from distclip.cli.suggest import set_at
from distclip.core.groups import resolve_groups
from tests.helpers.launching import ROOT, launch_env
from tests.helpers.models import batch, loss_fn, make_model

PNG = b"\x89PNG\r\n\x1a\n"


def write_log(path, groups: dict[str, list[float]], config: dict | None = None, skipped=(), nonfinite=()) -> None:
    """A clip log as JSONLSink writes it (header, then one record per clip), from given norms."""
    steps = len(next(iter(groups.values())))
    lines = []
    if config is not None:
        lines.append({"distclip": {"config": config, "groups": [{"name": g, "origin": "groups" if g != "default"
                                                                else "default"} for g in groups]}})
    for i in range(steps):
        record = {"step": i + 1, "grad_norm": math.nan, "skipped": float(i in skipped)}
        for g, norms in groups.items():
            record.update({f"grad_norm/{g}": norms[i], f"clip_coef/{g}": 1.0, f"clip_threshold/{g}": math.inf,
                           f"clipped/{g}": 0.0, f"nonfinite/{g}": float(i in nonfinite), f"clip_rate/{g}": 0.0})
        lines.append(record)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def synthetic(n: int = 100, warmup_spike: float = 100.0, seed: int = 0) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    return {name: [warmup_spike * scale] * 10 + list(scale * rng.lognormal(0.0, 0.5, n - 10))
            for name, scale in (("embed", 0.01), ("default", 1.0))}


CONFIG = {"max_norm": math.inf, "groups": [{"name": "embed", "match": ["embed.*"], "max_norm": math.inf}]}


# --------------------------------------------------------------------------------------------- suggest
def test_suggest_takes_the_quantile_after_warmup_skipping_bad_steps(tmp_path, capsys):
    norms = synthetic()
    norms["default"][50] = math.nan
    write_log(tmp_path / "m.jsonl", norms, CONFIG, skipped={60}, nonfinite={50})
    out = tmp_path / "clip.yaml"
    assert distclip_main(["suggest", str(tmp_path / "m.jsonl"), "--quantile", "0.9", "-o", str(out)]) == 0
    config = ClipConfig.from_yaml(out)  # loads as is
    for name, values in norms.items():  # independent: numpy's quantile of clips 11..100 minus the bad ones
        usable = [v for i, v in enumerate(values) if i >= 10 and i not in (50, 60)]
        expected = float(np.quantile(usable, 0.9))
        threshold = config.max_norm if name == "default" else config.groups[0].max_norm
        assert threshold == pytest.approx(expected, rel=5e-3)  # 3 significant digits
        assert threshold < 10 * max(usable)  # the warm-up spikes (100x) did not drag it up
    table = capsys.readouterr().out
    assert "first 10 skipped as warm-up" in table and "embed" in table
    assert config.log is None and config.groups[0].match == ["embed.*"]  # the measuring run's log is dropped
    assert out.read_text().startswith("# distclip suggest: each threshold is the 0.9 quantile")


def test_suggest_table_reports_what_each_threshold_would_have_clipped(tmp_path, capsys):
    values = [float(v) for v in range(1, 101)]
    write_log(tmp_path / "m.jsonl", {"default": values}, {"max_norm": math.inf})
    assert distclip_main(["suggest", str(tmp_path / "m.jsonl"), "-q", "0.75", "--warmup", "0"]) == 0
    captured = capsys.readouterr()
    assert yaml.safe_load(captured.out)["max_norm"] == 75.2  # numpy: quantile(1..100, 0.75) = 75.25 -> 3 digits
    assert float(np.quantile(values, 0.75)) == 75.25
    row = next(line for line in captured.err.splitlines() if line.startswith("default"))
    assert row.split()[-2:] == ["25.0%", "25.0%"]  # 76..100 exceed 75.2: 25 of 100


def test_suggest_json_and_optuna_formats(tmp_path):
    write_log(tmp_path / "m.jsonl", synthetic(), CONFIG)
    as_json = tmp_path / "clip.json"
    assert distclip_main(["suggest", str(tmp_path / "m.jsonl"), "--format", "json", "-o", str(as_json)]) == 0
    config = ClipConfig.from_yaml(as_json)
    space_file = tmp_path / "space.json"
    assert distclip_main(["suggest", str(tmp_path / "m.jsonl"), "--format", "optuna", "-o", str(space_file)]) == 0
    space = json.loads(space_file.read_text())
    assert [p["group"] for p in space["params"]] == ["embed", "default"]
    for p in space["params"]:
        assert p["log"] is True and p["low"] < p["suggested"] < p["high"]
        assert p["high"] / p["low"] == pytest.approx(16, rel=0.02)  # [s/4, s*4]
    assert space["params"][1]["suggested"] == config.max_norm
    trial = space["config"]
    for p in space["params"]:  # what a tuner script does with a trial's values
        set_at(trial, p["path"], p["high"])
    tuned = ClipConfig.from_dict(trial)
    assert (tuned.groups[0].max_norm, tuned.max_norm) == tuple(p["high"] for p in space["params"])


def log_clips(model, config: dict, steps: int) -> GradClipper:
    """Train ``steps`` steps under a GradClipper built from ``config``, which writes its clip log; returns it
    (closed)."""
    clipper = GradClipper(model, config)
    for step in range(steps):
        model.zero_grad()
        loss_fn(model, *batch(step, 0)).backward()
        clipper.clip()
    clipper.close()
    return clipper


def test_suggest_turns_per_layer_groups_into_explicit_ones_with_the_same_members(tmp_path):
    model = make_model()
    config = {"max_norm": math.inf, "groups": [{"name": "embed", "match": "embed.*", "max_norm": math.inf}],
              "per_layer": {"depth": 2, "match": "blocks.*", "max_norm": math.inf},
              "log": {"jsonl": str(tmp_path / "m.jsonl")}}
    clipper = log_clips(model, config, steps=12)
    out = tmp_path / "clip.yaml"
    assert distclip_main(["suggest", str(tmp_path / "m.jsonl"), "-o", str(out)]) == 0
    suggested = ClipConfig.from_yaml(out)
    names = clipper.adapter.names
    before, after = resolve_groups(clipper.config, names), resolve_groups(suggested, names)
    assert after.names == before.names == ["embed", "blocks.0", "blocks.1", "default"]
    assert {n: after.names[g] for n, g in after.index_of.items()} == {n: before.names[g] for n, g in before.index_of.items()}
    assert all(math.isfinite(g.max_norm) for g in after.groups) and suggested.per_layer is None


@pytest.mark.parametrize("lines, fragment", [
    (None, "no such file"),
    (["{\"step\": 1, \"grad_norm/default\": 1.0}", "not json", "{}"], ":2: not a JSON line"),
    (["{\"loss\": 3}"], "not a distclip clip record"),
])
def test_suggest_and_plot_refuse_bad_logs_clearly(tmp_path, capsys, lines, fragment):
    path = tmp_path / "bad.jsonl"
    if lines is not None:
        path.write_text("\n".join(lines) + "\n")
    for command in ("suggest", "plot"):
        assert distclip_main([command, str(path)]) == 2
        assert fragment in capsys.readouterr().err


def test_suggest_needs_enough_norms_and_the_config_for_groups(tmp_path, capsys):
    write_log(tmp_path / "short.jsonl", {"default": [1.0, 2.0, 3.0]}, {"max_norm": math.inf})
    assert distclip_main(["suggest", str(tmp_path / "short.jsonl")]) == 2
    assert "at least 5 needed" in capsys.readouterr().err
    write_log(tmp_path / "bare.jsonl", synthetic())  # no header: the groups' patterns are unknown
    assert distclip_main(["suggest", str(tmp_path / "bare.jsonl")]) == 2
    assert "--config" in capsys.readouterr().err
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"groups": [{"name": "embed", "match": "embed.*"}]}))
    assert distclip_main(["suggest", str(tmp_path / "bare.jsonl"), "--config", str(base)]) == 0
    assert distclip_main(["suggest", str(tmp_path / "bare.jsonl"), "-q", "1.5"]) == 2


# ------------------------------------------------------------------------------------------------ plot
def test_plot_writes_a_png_with_a_row_per_group(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    norms = synthetic()
    norms["embed"][40] = math.inf
    write_log(tmp_path / "m.jsonl", norms, CONFIG, skipped={40}, nonfinite={40})
    assert distclip_main(["plot", str(tmp_path / "m.jsonl")]) == 0  # default output: the log's name, .png
    image = (tmp_path / "m.png").read_bytes()
    assert image.startswith(PNG) and len(image) > 10_000
    assert "100 clips of 2 groups" in capsys.readouterr().out


def test_plot_without_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    write_log(tmp_path / "m.jsonl", synthetic(), CONFIG)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert distclip_main(["plot", str(tmp_path / "m.jsonl"), "-o", str(tmp_path / "x.png")]) == 2
    assert "pip install 'distclip[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------- the demo, end to end
def demo(tmp_path, config, jsonl, steps: int, lr: float) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "launch/train_char_lstm.py", "--config", str(config), "--steps", str(steps), "--lr", str(lr),
           "--text-bytes", "200000", "--jsonl", str(jsonl)]
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.multiprocess
def test_suggest_from_a_measured_demo_run_clips_at_about_the_asked_rate(tmp_path):
    """Measure (max_norm: inf) 60 steps, suggest the 0.9 quantile, train the same 60 steps with it: each group
    is clipped on about 10% of the steps. Tolerance, honestly: 1 to 12 of 60 steps (binomial noise at 60 steps
    is +-4%, and clipping changes the trajectory: measured 8-13% at lr 0.5 and 1. The same feedback makes it
    worse elsewhere: quantile 0.75 gave 32-48% instead of 25%, and 300 steps at 0.9 gave 15-28%; see the
    docstring of distclip.cli.suggest)."""
    demo_yaml = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    measure = {**demo_yaml, "max_norm": math.inf,
               "groups": [{**g, "max_norm": math.inf} for g in demo_yaml["groups"]]}
    (tmp_path / "measure.yaml").write_text(yaml.safe_dump(measure))
    demo(tmp_path, tmp_path / "measure.yaml", tmp_path / "measure.jsonl", steps=60, lr=1.0)
    assert distclip_main(["suggest", str(tmp_path / "measure.jsonl"), "-q", "0.9", "-o", str(tmp_path / "clip.yaml")]) == 0
    suggested = ClipConfig.from_yaml(tmp_path / "clip.yaml")
    assert [g.name for g in suggested.groups] == ["embed", "lstm"] and math.isfinite(suggested.max_norm)
    out = demo(tmp_path, tmp_path / "clip.yaml", tmp_path / "fed.jsonl", steps=60, lr=1.0)
    last = [json.loads(line) for line in (tmp_path / "fed.jsonl").read_text().splitlines()][-1]
    rates = {g: last[f"clip_rate/{g}"] for g in ("embed", "lstm", "default")}
    print("clip rates with the suggested thresholds (asked: 10%):", rates)
    assert all(1 / 60 <= r <= 12 / 60 for r in rates.values()), rates
    assert "clipped on" in out


def test_suggest_leaves_a_measured_only_group_measured_only(tmp_path, capsys):
    """A group written with max_norm: null (issue 19) is measured on purpose: no threshold is suggested for it."""
    model = make_model()
    config = {"max_norm": math.inf, "log": {"jsonl": str(tmp_path / "m.jsonl")},
              "groups": [{"name": "embed", "match": "embed.*", "max_norm": None, "in_total": False}]}
    log_clips(model, config, steps=40)
    assert distclip_main(["suggest", str(tmp_path / "m.jsonl"), "--warmup", "0", "-o", str(tmp_path / "c.yaml")]) == 0
    suggested = ClipConfig.from_yaml(tmp_path / "c.yaml")
    assert suggested.groups[0].measured_only and not suggested.groups[0].in_total  # kept as it was
    assert math.isfinite(suggested.max_norm)  # the clipped rest got its threshold
    table = capsys.readouterr().err
    assert not any(line.startswith("embed") for line in table.splitlines()), table
