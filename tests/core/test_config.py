"""ClipConfig: every kind of bad input gives one ConfigError naming the key, the value and what is allowed."""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distclip import ClipConfig, ConfigError, load_config


@pytest.mark.parametrize("data, fragments", [
    ({"max_norm": -1}, ["max_norm", "-1", "positive"]),
    ({"max_norm": 0}, ["max_norm", "positive"]),
    ({"max_norm": "big"}, ["max_norm", "'big'", "positive number"]),
    ({"max_norm": True}, ["max_norm", "True"]),
    ({"norm_type": 0}, ["norm_type", "p > 0"]),
    ({"norm_type": -2}, ["norm_type", "p > 0"]),
    ({"norm_type": "euclid"}, ["norm_type", "'euclid'", "inf"]),
    ({"norm_type": float("nan")}, ["norm_type"]),
    ({"maxnorm": 1.0}, ["maxnorm", "unknown key", "did you mean 'max_norm'"]),
    ({"nonfinite": "drop"}, ["nonfinite", "'drop'", "'skip'", "'error'", "'zero'", "'ignore'"]),
    ({"groups": "embed"}, ["groups", "list"]),
    ({"groups": [{"name": "a"}]}, ["groups[0].match", "missing"]),
    ({"groups": [{"name": "a", "match": []}]}, ["groups[0].match", "at least 1"]),
    ({"groups": [{"name": "a", "match": "x", "maxnorm": 1}]}, ["groups[0].maxnorm", "unknown key", "max_norm"]),
    ({"groups": [{"name": "a", "match": "x", "max_norm": -3}]}, ["groups[0].max_norm", "-3", "positive"]),
    ({"groups": [{"name": "a", "match": "x"}, {"name": "a", "match": "y"}]}, ["groups[1].name", "'a'", "unique"]),
    ({"groups": [{"name": "default", "match": "x"}]}, ["'default'", "reserved"]),
    ({"per_layer": {"match": "blocks.*"}}, ["per_layer.depth", "missing"]),
    ({"per_layer": {"depth": 0}}, ["per_layer.depth", "0", "greater than or equal to 1"]),
    ({"policy": {"kind": "magic"}}, ["policy", "'magic'", "fixed"]),
    ({"policy": {"kind": "fixed", "threshold": 2}}, ["policy.threshold", "unknown key"]),
    ({"comm_hook": "sometimes"}, ["comm_hook", "'sometimes'", "must be auto", "true", "false"]),
    ({"comm_hook": 2}, ["comm_hook = 2", "must be auto"]),
])
def test_bad_input_names_key_value_and_allowed(data, fragments):
    with pytest.raises(ConfigError) as err:
        ClipConfig.from_dict(data)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_not_a_mapping():
    with pytest.raises(ConfigError, match="expected a mapping"):
        ClipConfig.from_dict([1, 2])
    with pytest.raises(ConfigError, match="ClipConfig, a dict, or a path"):
        load_config(3.5)


def test_defaults_and_norm_spellings():
    config = ClipConfig()
    assert (config.max_norm, config.norm_type, config.nonfinite) == (1.0, 2.0, "skip")
    for spelling in ("inf", "infinity", "max", math.inf, ".inf"):
        value = spelling if spelling != ".inf" else float("inf")
        assert ClipConfig.from_dict({"norm_type": value}).norm_type == math.inf
    assert ClipConfig.from_dict({"groups": [{"name": "a", "match": "x*"}]}).groups[0].match == ["x*"]


def test_yaml_file_and_distclip_section(tmp_path):
    plain = tmp_path / "clip.yaml"
    plain.write_text("max_norm: 0.5\nnorm_type: .inf\ngroups:\n  - {name: emb, match: ['*embed*'], max_norm: 0.1}\n")
    config = ClipConfig.from_yaml(plain)
    assert config.max_norm == 0.5 and config.norm_type == math.inf and config.groups[0].max_norm == 0.1
    sectioned = tmp_path / "accelerate.yaml"
    sectioned.write_text("distributed_type: MULTI_CPU\nnum_processes: 2\ndistclip:\n  max_norm: 2.0\n")
    assert load_config(str(sectioned)).max_norm == 2.0
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_norm: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ClipConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match=str(tmp_path / "bad2.yaml")) as err:
        (tmp_path / "bad2.yaml").write_text("max_norm: -1\n")
        ClipConfig.from_yaml(tmp_path / "bad2.yaml")
    assert "max_norm" in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("DISTCLIP_CONFIG", raising=False)
    assert load_config(None) == ClipConfig()
    monkeypatch.setenv("DISTCLIP_CONFIG", "{max_norm: 0.25, nonfinite: error}")
    config = load_config(None)
    assert config.max_norm == 0.25 and config.nonfinite == "error"
    path = tmp_path / "c.yaml"
    path.write_text("norm_type: 1\n")
    monkeypatch.setenv("DISTCLIP_CONFIG", str(path))
    assert load_config(None).norm_type == 1.0
    monkeypatch.setenv("DISTCLIP_CONFIG", "/no/such/file.yaml")
    with pytest.raises(ConfigError, match="DISTCLIP_CONFIG"):
        load_config(None)
    monkeypatch.setenv("DISTCLIP_CONFIG", "{max_norm: -2}")
    with pytest.raises(ConfigError, match=r"\$DISTCLIP_CONFIG"):
        load_config(None)


def test_overrides_are_validated():
    assert load_config({"max_norm": 1.0}, max_norm=0.5).max_norm == 0.5
    with pytest.raises(ConfigError, match="norm_type"):
        load_config({}, norm_type=-1)


def test_fingerprint_tracks_settings():
    a = ClipConfig.from_dict({"max_norm": 1.0})
    assert a.fingerprint() == ClipConfig.from_dict({"max_norm": 1}).fingerprint()
    assert a.fingerprint() != ClipConfig.from_dict({"max_norm": 1.5}).fingerprint()
    assert a.fingerprint() != ClipConfig.from_dict({"norm_type": "inf"}).fingerprint()


# ------------------------------------------------ issue 10: every bad input is a ConfigError naming the key
def error_of(data) -> str:
    with pytest.raises(ConfigError) as err:
        ClipConfig.from_dict(data)
    return str(err.value)


@pytest.mark.parametrize("data, key", [
    ({"max_norm": 10**400}, "max_norm"),
    ({"norm_type": 10**400}, "norm_type"),
    ({"groups": [{"name": "a", "match": "x", "max_norm": -10**400}]}, "groups[0].max_norm"),
    ({"max_norm": "1e400"}, "max_norm"),
    ({"max_norm": Fraction(10**400, 3)}, "max_norm"),
])
def test_huge_numbers_are_config_errors(data, key):
    message = error_of(data)
    assert f"{key} = " in message and ("too large" in message or "positive" in message), message
    assert len(message) < 600, "a huge value is shown shortened"


def test_numbers_beyond_python_int_printing_limit_are_reported():
    message = error_of({"max_norm": 10**5000, "maxnorm": 10**5000})  # repr() of such an int raises ValueError
    assert "max_norm = <an int of" in message and "maxnorm: unknown key" in message


@pytest.mark.parametrize("depth", [True, False, 2.5, "2.5", "two", [2], None, float("inf"), float("nan"), 0, -1, "0"])
def test_per_layer_depth_must_be_a_whole_number_of_at_least_one(depth):
    message = error_of({"per_layer": {"depth": depth}})
    assert "per_layer.depth = " in message and "whole number greater than or equal to 1" in message, message


@pytest.mark.parametrize("depth, expected", [(2, 2), ("2", 2), (" 3 ", 3), (2.0, 2), (np.int64(4), 4), (torch.tensor(5), 5)])
def test_per_layer_depth_spellings(depth, expected):
    assert ClipConfig.from_dict({"per_layer": {"depth": depth}}).per_layer.depth == expected


@pytest.mark.parametrize("written, expected", [
    ("1e-3", 1e-3), (" 2 ", 2.0), ("1E-3", 1e-3), ("0.5", 0.5), ("inf", math.inf), ("+Infinity", math.inf),
    (".inf", math.inf), (np.float32(0.5), 0.5), (np.float64(0.25), 0.25), (np.int64(3), 3.0), (np.array(0.5), 0.5),
    (torch.tensor(0.5), 0.5), (torch.tensor([2.0]), 2.0), (torch.tensor([[3]]), 3.0), (torch.tensor(0.5, dtype=torch.bfloat16), 0.5),
    (Fraction(1, 4), 0.25),
])
def test_numbers_as_users_write_them(written, expected):
    config = ClipConfig.from_dict({"max_norm": written, "norm_type": written,
                                   "groups": [{"name": "g", "match": "*", "max_norm": written, "norm_type": written}]})
    assert config.max_norm == config.norm_type == config.groups[0].max_norm == config.groups[0].norm_type == expected
    assert type(config.max_norm) is float and type(config.groups[0].norm_type) is float


@pytest.mark.parametrize("value, reason", [
    (True, "bool"), (np.bool_(True), "bool"), (torch.tensor(True), "bool"), (torch.tensor([1.0, 2.0]), "shape (2,)"),
    (np.array([1.0, 2.0]), "shape (2,)"), (torch.tensor(1 + 1j), "complex"), ([1.0], "list"), ({"v": 1}, "dict"),
    (None, "NoneType"), ("nan", "NaN"), (float("nan"), "NaN"), ("1,5", "not a number"), ("-inf", "or 'inf'"),
    ("-1e-3", "or 'inf'"),
])
def test_values_that_are_not_one_positive_number(value, reason):
    for key in ("max_norm", "norm_type"):
        message = error_of({key: value})
        assert f"{key} = " in message and reason in message and "too large" not in message, message


def test_yaml_numbers_as_written(tmp_path):
    path = tmp_path / "clip.yaml"
    path.write_text("max_norm: 1e-3\nnorm_type: '2'\ngroups:\n  - {name: emb, match: '*embed*', max_norm: 5e-2}\n")
    config = ClipConfig.from_yaml(path)  # PyYAML reads 1e-3 (no dot) as a string
    assert (config.max_norm, config.norm_type, config.groups[0].max_norm) == (1e-3, 2.0, 5e-2)


@pytest.mark.parametrize("group, key, fragment", [
    ({"name": "", "match": "x"}, "groups[0].name", "non-empty"),
    ({"name": "   ", "match": "x"}, "groups[0].name", "non-empty"),
    ({"name": 7, "match": "x"}, "groups[0].name", "string"),
    ({"name": "a", "match": 3}, "groups[0].match", "glob string or a list"),
    ({"name": "a", "match": {"x": 1}}, "groups[0].match", "glob string or a list"),
    ({"name": "a", "match": {"x", "y"}}, "groups[0].match", "glob string or a list"),
    ({"name": "a", "match": ["x", None]}, "groups[0].match[1]", "glob string"),
    ({"name": "a", "match": [""]}, "groups[0].match[0]", "at least 1 character"),
    ({"name": "a", "match": "x", "fixed": 1}, "groups[0].fixed", "unknown key"),
    ({"name": "a", "match": "x", 5: 1}, "groups[0]: key 5", "not a string"),
])
def test_bad_groups_name_the_key(group, key, fragment):
    message = error_of({"groups": [group]})
    assert key in message and fragment in message, message


@pytest.mark.parametrize("data, fragment", [
    ({3: 1.0}, "<root>: key 3 (int) is not a string"),
    ({None: 1.0}, "key None (NoneType)"),
    ({"groups": [1]}, "groups[0] = 1"),
    ({"groups": [{"name": "a", "match": "x"}, {"name": "a", "match": "y"}]}, "groups[1].name = 'a' is used twice"),
    ({"per_layer": [1]}, "per_layer = [1]"),
    ({"policy": {}}, "policy: no 'kind' key; allowed kinds: fixed"),
    ({"policy": "fixed"}, "policy = 'fixed'"),
    ({"maxnorm": [[[[[[1]]]]]] * 100}, "maxnorm: unknown key"),
])
def test_nested_junk_names_the_key(data, fragment):
    message = error_of(data)
    assert fragment in message, message


@pytest.mark.parametrize("text, fragment", [
    ("- 1\n- 2\n", "expected a mapping"),
    ("just words", "expected a mapping"),
    ("distclip: 3\n", "expected a mapping"),
    ("max_norm: 2024-02-30\n", "YAML that cannot be read"),  # PyYAML raises ValueError for the impossible date
    pytest.param("[" * 5000 + "]" * 5000, "YAML", id="deep-nesting"),  # PyYAML's recursive parser: RecursionError
    ("max_norm: !!python/object:os.system x\n", "not valid YAML"),
    ("max_norm: 1\x00\n", "not valid YAML"),
])
def test_bad_yaml_files(tmp_path, text, fragment):
    path = tmp_path / "clip.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment) as err:
        ClipConfig.from_yaml(path)
    assert str(path) in str(err.value)


def test_files_that_cannot_be_read(tmp_path, monkeypatch):
    binary = tmp_path / "latin1.yaml"
    binary.write_bytes("max_norm: 1.0  # Größe\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml' is not UTF-8 text .*save it as UTF-8"):
        ClipConfig.from_yaml(binary)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))
    with pytest.raises(ConfigError, match="cannot be opened: File name too long"):
        load_config("x" * 300 + ".yaml")
    with pytest.raises(ConfigError, match="cannot be opened"):
        load_config("a\x00b.yaml")
    bom = tmp_path / "bom.yaml"
    bom.write_bytes("\ufeffmax_norm: 0.5\n".encode("utf-8"))  # Windows editors write one
    assert ClipConfig.from_yaml(bom).max_norm == 0.5
    readable = tmp_path / "ok.yaml"
    readable.write_text("max_norm: 0.5\n")

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)  # chmod does not stop root, who runs CI containers
    with pytest.raises(ConfigError, match="ok.yaml' cannot be read: Permission denied"):
        ClipConfig.from_yaml(readable)


def test_long_inline_environment_variable(monkeypatch):
    groups = [{"name": f"group_{i}", "match": [f"blocks.{i}.*", f"head_{i}.*"], "max_norm": 0.1 * (i + 1)}
              for i in range(6)]
    inline = yaml.safe_dump({"max_norm": 1e-3, "groups": groups}, default_flow_style=True, width=1 << 30)
    assert len(inline.encode()) > 255  # NAME_MAX: Path(inline).is_file() raised ENAMETOOLONG
    monkeypatch.setenv("DISTCLIP_CONFIG", inline)
    assert ClipConfig.from_env() == ClipConfig.from_dict({"max_norm": 1e-3, "groups": groups})
    monkeypatch.setenv("DISTCLIP_CONFIG", inline.replace("max_norm: 0.1", "max_norm: -0.1", 1))
    with pytest.raises(ConfigError, match=r"\$DISTCLIP_CONFIG.*\n.*groups\[0\].max_norm = -0.1"):
        ClipConfig.from_env()
    monkeypatch.setenv("DISTCLIP_CONFIG", "x" * 5000)
    with pytest.raises(ConfigError, match=r"\$DISTCLIP_CONFIG='x+\.\.\.x+' \(5002 characters\) is neither"):
        ClipConfig.from_env()


@pytest.mark.parametrize("value, fragment", [
    ("/no/such/dir/clip.yaml", "is not an existing file"),
    ("clip.yml", "is not an existing file"),
    ("/", "is a directory"),
    ("[1, 2]", "is neither an existing file nor an inline YAML mapping"),
    ("{max_norm: [1}", "not valid YAML"),
])
def test_environment_variable_that_is_no_config(monkeypatch, value, fragment):
    monkeypatch.setenv("DISTCLIP_CONFIG", value)
    with pytest.raises(ConfigError, match=r"\$DISTCLIP_CONFIG") as err:
        ClipConfig.from_env()
    assert fragment in str(err.value)


def test_environment_variable_with_undecodable_bytes(monkeypatch):
    monkeypatch.setitem(os.environb, b"DISTCLIP_CONFIG", b"{max_norm: \xff\xfe}")
    with pytest.raises(ConfigError, match=r"\$DISTCLIP_CONFIG") as err:
        ClipConfig.from_env()
    str(err.value).encode("utf-8")  # printable: the undecodable bytes are escaped


# ------------------------------------- issue 10 item 6: what `distclip launch` writes loads back on every rank
FIVE_GROUPS = {"max_norm": 1.0, "norm_type": 2, "groups": [
    {"name": "embeddings", "match": ["*embed*", "*wte*", "*wpe*"], "max_norm": 0.1},
    {"name": "attention", "match": ["*.attn.*", "*self_attn*"], "max_norm": 0.5, "norm_type": "inf"},
    {"name": "mlp", "match": ["*.mlp.*", "*feed_forward*"], "max_norm": 0.1},
    {"name": "norms", "match": ["*norm*", "*ln_*"], "max_norm": 2.0},
    {"name": "head", "match": ["lm_head.*", "score.*"], "max_norm": 0.25},
]}
SINGLE_PROCESS = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "NO", "num_processes": 1,
                  "num_machines": 1, "machine_rank": 0, "mixed_precision": "no", "use_cpu": True}


def planned(tmp_path, section):
    pytest.importorskip("accelerate")
    from distclip.cli.launcher import plan_launch

    path = tmp_path / "combined.yaml"
    path.write_text(yaml.safe_dump({**SINGLE_PROCESS, "distclip": section}))
    return str(path), plan_launch(["--config_file", str(path), "train.py"])


def test_launch_of_a_five_group_section_loads_back_through_from_env(tmp_path, monkeypatch):
    _, plan = planned(tmp_path, FIVE_GROUPS)
    try:
        written = plan.env["DISTCLIP_CONFIG"]
        assert len(written.encode()) > 255 and written.startswith("{")  # inline YAML longer than NAME_MAX
        monkeypatch.setenv("DISTCLIP_CONFIG", written)
        received = ClipConfig.from_env()  # what every rank runs
        assert received == ClipConfig.from_dict(FIVE_GROUPS)
        assert received.fingerprint() == ClipConfig.from_dict(FIVE_GROUPS).fingerprint()
        assert [g.name for g in received.groups] == [g["name"] for g in FIVE_GROUPS["groups"]]
        assert received.groups[2].max_norm == 0.1 and math.isinf(received.groups[1].norm_type)
    finally:
        for path in plan.temp_files:
            os.unlink(path)


def test_distclip_check_accepts_the_five_group_section(tmp_path, capsys):
    pytest.importorskip("accelerate")
    from distclip.cli import main

    path = tmp_path / "combined.yaml"
    path.write_text(yaml.safe_dump({**SINGLE_PROCESS, "distclip": FIVE_GROUPS}))
    assert main(["check", str(path)]) == 0
    assert "OK: 1 process" in capsys.readouterr().out


def test_launch_refuses_what_would_not_load_back(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    from distclip.cli import launcher

    monkeypatch.setattr(launcher, "_section_for_env", lambda section, temp_files: "{max_norm: 0.5}")  # loses groups
    with pytest.raises(launcher.LaunchError, match=r"DISTCLIP_CONFIG loads back as .* not as"):
        planned(tmp_path, FIVE_GROUPS)
    monkeypatch.setattr(launcher, "_section_for_env", lambda section, temp_files: "{max_norm: [}")
    with pytest.raises(launcher.LaunchError, match=r"does not load back: .*not valid YAML"):
        planned(tmp_path, FIVE_GROUPS)


def test_launch_passes_a_very_long_section_as_a_file(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    from distclip.cli import launcher

    monkeypatch.setattr(launcher, "INLINE_ENV_LIMIT", 256)
    _, plan = planned(tmp_path, FIVE_GROUPS)
    written = plan.env["DISTCLIP_CONFIG"]
    try:
        assert written in plan.temp_files and os.path.isfile(written)
        monkeypatch.setenv("DISTCLIP_CONFIG", written)
        assert ClipConfig.from_env() == ClipConfig.from_dict(FIVE_GROUPS)
    finally:
        for path in plan.temp_files:
            os.unlink(path)


@pytest.mark.parametrize("value, parsed", [
    ("auto", "auto"), (" Auto ", "auto"), (True, True), (False, False), ("true", True), ("off", False), (1, True), (0, False),
])
def test_comm_hook_is_auto_by_default_and_keeps_accepting_bools(value, parsed):
    assert ClipConfig().comm_hook == "auto"
    config = ClipConfig.from_dict({"comm_hook": value})
    assert config.comm_hook == parsed and type(config.comm_hook) is type(parsed)
    assert ClipConfig.from_dict(config.to_dict()) == config  # round-trips through to_dict (what the set-up check sends)
