"""Fuzzed config loading (distclip issue 10): whatever comes in, only a ConfigError naming the key (or the source)
comes out, and every valid config round-trips through to_dict / from_dict and through $DISTCLIP_CONFIG.

Bounded and derandomized: the same examples on every run, a few seconds in all.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distclip import ClipConfig, ConfigError, load_config

FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
KEYS = ["max_norm", "norm_type", "groups", "per_layer", "nonfinite", "policy", "comm_hook", "check_consistency"]
SECTION_KEYS = ["name", "match", "depth", "kind", "max_norm", "norm_type"]
# Every detail line says what is wanted.
WANTED = re.compile(r"must|allowed|should|missing|expected|reserved|unique")

# ------------------------------------------------------------------ strategies
huge_ints = st.integers(min_value=-(10**500), max_value=10**500)
numeric_text = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-10**6, 10**6).map(str),
    st.sampled_from(["1e-3", " 2 ", "inf", "+inf", "-inf", "Infinity", ".inf", "max", "nan", "1e400", "0", "-1",
                     "1_000", "0x10", "1,5", "", "  ", "2.5", "٣"]),
)
numpy_scalars = st.one_of(
    st.floats(width=32, allow_nan=True).map(np.float32), st.integers(-2**63, 2**63 - 1).map(np.int64),
    st.booleans().map(np.bool_), st.floats(allow_nan=True).map(np.array),
)
tensors = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(torch.tensor),
    st.lists(st.floats(-1e6, 1e6), min_size=0, max_size=3).map(torch.tensor),
    st.booleans().map(torch.tensor), st.integers(-1000, 1000).map(lambda v: torch.tensor([[v]])),
    st.just(torch.tensor(1 + 2j)),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), huge_ints, st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), numeric_text, st.binary(max_size=6), numpy_scalars, tensors,
    st.fractions(), st.complex_numbers(allow_nan=True), st.dates(), st.sampled_from(KEYS + SECTION_KEYS),
)
keys = st.one_of(st.sampled_from(KEYS + SECTION_KEYS + ["maxnorm", "max-norm", "group", "Norm_Type", "distclip"]),
                 st.text(max_size=10), st.integers(-3, 3), st.none(), st.booleans(), st.floats(allow_nan=False))
junk = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner, inner),
                                                     st.dictionaries(keys, inner, max_size=3)), max_leaves=8)
numbers_ = st.one_of(st.floats(min_value=1e-6, max_value=1e6), st.integers(1, 10), numeric_text, numpy_scalars,
                     tensors, huge_ints, junk)
patterns = st.one_of(st.sampled_from(["*", "*embed*", "blocks.*", "", "[", "lm_head.*"]),
                     st.lists(st.sampled_from(["*", "x*", "", "a.b"]), max_size=3), st.frozensets(st.text(max_size=3)), junk)
names = st.one_of(st.sampled_from(["embed", "head", "default", "", " ", "a"]), st.text(max_size=8), junk)


def sections(**fields: st.SearchStrategy) -> st.SearchStrategy:
    """Mappings with any subset of ``fields`` and sometimes a junk key."""
    return st.tuples(st.fixed_dictionaries({}, optional=fields), st.dictionaries(keys, junk, max_size=1)).map(
        lambda parts: {**parts[1], **parts[0]})


groups = sections(name=names, match=patterns, max_norm=numbers_, norm_type=numbers_)
config_dicts = sections(
    max_norm=numbers_, norm_type=numbers_,
    groups=st.one_of(st.lists(st.one_of(groups, junk), max_size=4), junk),
    per_layer=st.one_of(sections(depth=st.one_of(st.integers(-2, 8), st.floats(0, 5), numeric_text, junk),
                                 match=patterns, max_norm=numbers_, norm_type=numbers_), junk),
    nonfinite=st.one_of(st.sampled_from(["skip", "error", "zero", "ignore", "drop", "SKIP"]), junk),
    policy=st.one_of(sections(kind=st.one_of(st.sampled_from(["fixed", "magic"]), junk)), junk),
    comm_hook=st.one_of(st.booleans(), junk), check_consistency=st.one_of(st.booleans(), junk),
)

positive = st.one_of(st.floats(min_value=1e-300, max_value=1e300), st.just(math.inf), st.integers(1, 10**6),
                     st.sampled_from(["1e-3", " 2 ", "inf", "0.5"]),
                     st.floats(min_value=1e-3, max_value=1e3).map(np.float32),
                     st.floats(min_value=1e-3, max_value=1e3).map(torch.tensor))
valid_group_names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=40).filter(
    lambda name: name.strip() and name != "default")
valid_configs = st.fixed_dictionaries({}, optional={
    "max_norm": positive, "norm_type": positive, "nonfinite": st.sampled_from(["skip", "error", "zero", "ignore"]),
    "groups": st.lists(st.fixed_dictionaries(
        {"name": valid_group_names, "match": st.one_of(st.text(min_size=1, max_size=30), st.lists(
            st.text(min_size=1, max_size=30), min_size=1, max_size=4))},
        optional={"max_norm": positive, "norm_type": positive}), max_size=6, unique_by=lambda g: g["name"]),
    "per_layer": st.fixed_dictionaries({"depth": st.integers(1, 6)}, optional={"max_norm": positive}),
    "policy": st.just({"kind": "fixed"}), "comm_hook": st.one_of(st.booleans(), st.just("auto")),
    "check_consistency": st.booleans(),
})


def mutated(text: str, data: st.DataObject) -> str:
    """``text`` with a few characters replaced, deleted or inserted."""
    chars = list(text)
    for _ in range(data.draw(st.integers(0, 4))):
        where = data.draw(st.integers(0, len(chars)))
        chars[where:where + data.draw(st.integers(0, 1))] = data.draw(st.text(max_size=2))
    return "".join(chars)


def yaml_of(value) -> str:
    try:
        return yaml.safe_dump(value, default_flow_style=None, width=1 << 30, allow_unicode=True)
    except yaml.YAMLError:  # numpy / torch / complex values have no YAML form
        return repr(value)


yaml_texts = st.one_of(
    st.text(max_size=80), st.text(min_size=256, max_size=1500),
    st.text(st.sampled_from("{}[]:,-#&*!|>'\"%@` \n\tmax_norm0.1e"), max_size=200),
    config_dicts.map(yaml_of), valid_configs.map(yaml_of),
)


# --------------------------------------------------------------------- checks
def allowed_prefixes(data) -> list[str]:
    """How a message may start: a key as written, or quoted (``['a b']``) when it is not a plain name."""
    return [p for k in data if isinstance(k, str) for p in (k, f"[{k!r}"[:80]) if p] + ["<root>"]


def assert_names_a_key(message: str, data) -> None:
    """Every detail line starts with the key it is about (one the input had) and says what is wanted."""
    head, *details = message.split("\n")
    if not isinstance(data, dict):
        assert head.startswith("config: expected a mapping"), message
        return
    assert head == "invalid distclip config (config):" and details, message
    prefixes = allowed_prefixes(data)
    for line in details:
        line = line.strip()
        assert any(line.startswith(p) and (p[:1] == "[" or line[len(p):][:1] in (":", " ", ".", "["))
                   for p in prefixes), (line, message)
        assert WANTED.search(line), (line, message)


def assert_round_trips(config: ClipConfig) -> None:
    again = ClipConfig.from_dict(config.to_dict())
    assert again == config and again.fingerprint() == config.fingerprint()
    inline = yaml.safe_dump(config.to_dict(), default_flow_style=True, width=1 << 30)
    received = ClipConfig.from_env(environ={"DISTCLIP_CONFIG": inline})
    assert received == config and received.fingerprint() == config.fingerprint()


class environment:
    """Set ``$DISTCLIP_CONFIG`` (str or bytes) in the real process environment for a block."""

    def __init__(self, value):
        self.value = value

    def __enter__(self):
        self.saved = os.environb.get(b"DISTCLIP_CONFIG")
        os.environb[b"DISTCLIP_CONFIG"] = self.value if isinstance(self.value, bytes) else os.fsencode(self.value)

    def __exit__(self, *exc):
        if self.saved is None:
            os.environb.pop(b"DISTCLIP_CONFIG", None)
        else:
            os.environb[b"DISTCLIP_CONFIG"] = self.saved


def load_or_config_error(load, *names_source: str):
    """``load()``: a config (or None), or a ConfigError whose message names one of ``names_source``."""
    try:
        return load()
    except ConfigError as err:
        assert any(source in str(err) for source in names_source), str(err)
        str(err).encode("utf-8")  # printable
        return err


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory(prefix="distclip-fuzz-") as name:
        yield Path(name)


# ---------------------------------------------------------------------- tests
@FUZZ
@given(st.one_of(config_dicts, config_dicts, junk))
def test_any_input_gives_a_config_or_a_config_error_naming_the_key(data):
    try:
        config = ClipConfig.from_dict(data)
    except ConfigError as err:
        assert_names_a_key(str(err), data)
    else:
        assert_round_trips(config)


@settings(FUZZ, max_examples=300)
@given(valid_configs)
def test_valid_configs_load_and_round_trip(data):
    config = ClipConfig.from_dict(data)
    assert_round_trips(config)
    assert load_config(data) == config and load_config(config.to_dict(), max_norm=0.5).max_norm == 0.5
    assert len(config.groups) == len(data.get("groups", []))


@FUZZ
@given(yaml_texts, st.data())
def test_any_text_in_a_file_or_the_environment(folder, text, data):
    if data.draw(st.booleans()):
        text = mutated(text, data)
    path = folder / "fuzzed.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    load_or_config_error(lambda: ClipConfig.from_yaml(path), str(path))
    load_or_config_error(lambda: load_config(str(path)), str(path))
    load_or_config_error(lambda: ClipConfig.from_env(environ={"DISTCLIP_CONFIG": text}), "$DISTCLIP_CONFIG", text)
    if "\x00" not in text:
        with environment(text):
            load_or_config_error(ClipConfig.from_env, "$DISTCLIP_CONFIG", text)
            load_or_config_error(lambda: load_config(None), "$DISTCLIP_CONFIG", text)


@settings(FUZZ, max_examples=300)
@given(st.one_of(st.binary(max_size=300), st.binary(min_size=256, max_size=2000),
                 yaml_texts.map(lambda t: t.encode("utf-8", "surrogateescape")).map(lambda b: b[:7] + b"\xff" + b[7:])))
def test_any_bytes_in_a_file_or_the_environment(folder, raw):
    path = folder / "fuzzed.bin"
    path.write_bytes(raw)
    load_or_config_error(lambda: ClipConfig.from_yaml(path), str(path))
    raw = raw.replace(b"\x00", b"")
    with environment(raw):
        text = os.environ["DISTCLIP_CONFIG"]
        load_or_config_error(ClipConfig.from_env, "$DISTCLIP_CONFIG", text)


@settings(FUZZ, max_examples=100)
@given(st.one_of(st.text(max_size=400), st.binary(max_size=300), st.integers(), st.none(), st.lists(st.text())))
def test_any_path(folder, spec):
    if isinstance(spec, (str, bytes)) and spec in ("", b""):
        spec = folder / "missing.yaml"
    if isinstance(spec, list):
        with pytest.raises(ConfigError, match="ClipConfig, a dict, or a path"):
            load_config(spec)
        return
    try:
        load_config(spec)
    except ConfigError:
        pass
