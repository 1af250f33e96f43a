"""Group resolution: the per_parameter shorthand and each group's origin (which decides its policy)."""

from __future__ import annotations

import math

import pytest
import torch

import distclip
from distclip import ClipConfig, ConfigError
from distclip.core.groups import EXCLUDED_GROUP, resolve_groups
from tests.helpers.models import batch, loss_fn, make_model
from tests.helpers.reference import norm64, rel_err

NAMES = ["embed.weight", "blocks.0.attn.weight", "blocks.0.attn.bias", "head.weight", "head.bias"]


def test_per_parameter_one_group_per_tensor_after_explicit_groups():
    config = ClipConfig.from_dict({"max_norm": 0.5, "norm_type": 3.0, "per_parameter": True,
                                   "groups": [{"name": "head", "match": "head.*", "max_norm": 2.0}]})
    table = resolve_groups(config, NAMES)
    assert table.names == ["head", "embed.weight", "blocks.0.attn.weight", "blocks.0.attn.bias", "default"]
    assert [g.origin for g in table.groups] == ["groups", "per_parameter", "per_parameter", "per_parameter", "default"]
    assert all((g.max_norm, g.norm_type) == (0.5, 3.0) for g in table.groups[1:])  # the top-level settings
    assert table.groups[0].max_norm == 2.0
    assert table.index_of == {"embed.weight": 1, "blocks.0.attn.weight": 2, "blocks.0.attn.bias": 3,
                              "head.weight": 0, "head.bias": 0}
    assert resolve_groups(config, list(reversed(NAMES))).names[1:4] == [
        "blocks.0.attn.bias", "blocks.0.attn.weight", "embed.weight"]  # model order


def test_per_parameter_name_clashes_are_config_errors():
    clash = ClipConfig.from_dict({"per_parameter": True, "groups": [{"name": "head.bias", "match": "head.weight"}]})
    with pytest.raises(ConfigError, match=r"per_parameter: parameter 'head.bias'.*explicit group"):
        resolve_groups(clash, NAMES)
    with pytest.raises(ConfigError, match=r"parameter 'default'"):
        resolve_groups(ClipConfig.from_dict({"per_parameter": True}), ["default", "w"])


def test_origins_of_per_layer_default_and_excluded_groups():
    config = ClipConfig.from_dict({"groups": [{"name": "embed", "match": "embed.*"}], "per_layer": {"depth": 2}})
    table = resolve_groups(config, NAMES).restricted_to(["head.weight"], 2.0)
    assert [(g.name, g.origin) for g in table.groups] == [
        ("embed", "groups"), ("blocks.0", "per_layer"), ("head", "per_layer"), ("default", "default"),
        (EXCLUDED_GROUP, "excluded")]


def test_per_parameter_clipping_through_the_clipper():
    """Each tensor clipped on its own norm at the top-level max_norm (fixed policy)."""
    model = make_model()
    loss_fn(model, *batch(0, 0)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    report = distclip.GradClipper(model, {"per_parameter": True, "max_norm": 0.05}).clip()
    assert list(report.group_norms) == [*grads, "default"]
    clipped = 0
    for name, param in model.named_parameters():
        norm = norm64([grads[name]], 2.0)
        assert rel_err(report.group_norms[name].item(), norm) <= 1e-6
        coef = min(1.0, 0.05 / (norm + 1e-6))
        torch.testing.assert_close(param.grad.double(), grads[name].double() * coef, rtol=1e-6, atol=1e-12)
        clipped += coef < 1
    assert 0 < clipped < len(grads)  # some tensors clipped, some not: per tensor, not global
    assert report.group_norms["default"].item() == 0.0 and not math.isnan(report.coefs["default"].item())
