"""Single-process pieces of the DeepSpeed integration: partition spans, loss-scale unscaling, lazy import."""

from __future__ import annotations

import math
import subprocess
import sys

import torch

from distclip.adapters.zero import group_spans, is_deepspeed_engine
from distclip.core.groups import ClipGroup
from distclip.core.norms import SlotLayout, local_partials
from tests.helpers.models import make_model


def test_group_spans_merge_consecutive_fragments_of_a_group():
    # (start, numel, group), unsorted, one empty fragment, a padding gap between 10 and 12
    fragments = [(12, 4, 1), (0, 6, 0), (6, 4, 0), (10, 0, 2), (16, 2, 0)]
    assert group_spans(fragments) == {0: [(0, 10), (16, 18)], 1: [(12, 16)]}
    assert group_spans([]) == {}


def test_unscale_divides_out_the_loss_scale_exactly():
    groups = [ClipGroup("a", 1.0, 2.0), ClipGroup("b", 1.0, math.inf), ClipGroup("default", 1.0, 3.5)]
    layout = SlotLayout.build(groups, 1.0)
    torch.manual_seed(0)
    grads = [torch.randn(50, dtype=torch.float64) for _ in range(3)]
    scale = 2.0**16
    plain = local_partials(grads, [0, 1, 2], layout, torch.device("cpu"))
    scaled = local_partials([g * scale for g in grads], [0, 1, 2], layout, torch.device("cpu"))
    torch.testing.assert_close(layout.unscale(scaled, scale), plain, rtol=1e-14, atol=0)  # p = 3.5 rounds in pow(1/p) then pow(p)


def test_engine_detection_needs_no_deepspeed_import():
    assert not is_deepspeed_engine(make_model())
    code = "import sys, distclip, distclip.deepspeed; print('deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
