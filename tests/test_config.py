"""ClipConfig: every kind of bad input gives one ConfigError naming the key, the value and what is allowed."""

from __future__ import annotations

import math

import pytest

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
    ({"comm_hook": "sometimes"}, ["comm_hook", "'sometimes'", "bool"]),
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
