"""Per-piece values into slots (:class:`distclip.core.norms.OrderedSlotSums`): in the pieces' order, deterministic.

The DDP blocks (``distclip/adapters/blocks.py``) rely on it: the same per-piece values in the same
order give the same bits, however the values were measured. The serial CPU way is checked against a
Python loop; the way used on other devices (a padded matrix summed along rows) runs here on CPU.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from distclip.core.config import ClipConfig
from distclip.core.groups import resolve_groups
from distclip.core.norms import OrderedSlotSums, SlotLayout, piece_sums

CONFIG = {"groups": [{"name": "a", "match": "a*"}, {"name": "b", "match": "b*", "norm_type": 3}]}
LAYOUT = SlotLayout.build(resolve_groups(ClipConfig.from_dict(CONFIG), ["a1", "b1", "c"]).groups, 2.0)  # 4 slots


def python_sums(slot_ids: list[int], values: list[float]) -> list[float]:
    out = [0.0] * LAYOUT.num_slots
    for slot, value in zip(slot_ids, values):
        out[slot] += value
    return out


def test_cpu_adds_each_slots_pieces_one_after_another_in_order():
    ids = [0, 0, 0, 1, 2, 1]
    values = [1e16, 1.0, -1e16, 2.0, 3.0, 2**-60]  # 1e16 + 1 rounds to 1e16: the order shows in the result
    got = OrderedSlotSums(ids, LAYOUT)(torch.tensor(values, dtype=torch.float64), use_max=False)
    assert got.tolist() == python_sums(ids, values) and got[0].item() == 0.0
    random.seed(0)
    ids = [random.randrange(3) for _ in range(5000)]
    values = [random.lognormvariate(0, 8) for _ in ids]
    got = OrderedSlotSums(ids, LAYOUT)(torch.tensor(values, dtype=torch.float64), use_max=False)
    assert got.tolist() == python_sums(ids, values)


@pytest.mark.parametrize("ids", [[0, 1, 2, 0, 0, 3, 1] * 50, [0] * 300 + [1, 2], [2, 0]], ids=["mixed", "one_big", "few"])
def test_the_padded_way_of_other_devices_is_deterministic_and_exact_to_rounding(ids):
    values = torch.rand(len(ids), dtype=torch.float64)
    sums = OrderedSlotSums(ids, LAYOUT, serial_on_cpu=False)
    first, again = sums(values, use_max=False), sums(values.clone(), use_max=False)
    assert torch.equal(first, again)
    expected = torch.tensor(python_sums(ids, values.tolist()), dtype=torch.float64)
    torch.testing.assert_close(first, expected, rtol=1e-14, atol=0)


def test_max_slots_and_non_finite_values_propagate():
    ids = [0, 0, 1, 2]
    values = torch.tensor([1.0, math.nan, 2.0, math.inf], dtype=torch.float64)
    for serial in (True, False):
        got = OrderedSlotSums(ids, LAYOUT, serial_on_cpu=serial)(values, use_max=False)
        assert math.isnan(got[0]) and got[1] == 2.0 and math.isinf(got[2])
        peak = OrderedSlotSums(ids, LAYOUT, serial_on_cpu=serial)(values, use_max=True)
        assert math.isnan(peak[0]) and peak[1] == 2.0 and math.isinf(peak[2])


def test_piece_sums_depend_on_the_list_alone_and_keep_its_order():
    torch.manual_seed(0)
    tensors = [torch.randn(n) for n in (3, 300, 70_000)] + [torch.randn(40).bfloat16(), torch.randn(5).double()]
    for p in (1.0, 2.0, 1.5, math.inf):
        once = piece_sums(tensors, p, LAYOUT, torch.device("cpu"))
        piece_sums([torch.randn(1000)], p, LAYOUT, torch.device("cpu"))  # another list in between
        assert torch.equal(once, piece_sums(tensors, p, LAYOUT, torch.device("cpu")))
        for t, value in zip(tensors, once.tolist()):  # mixed dtypes: each value back at its tensor's place
            exact = t.double().abs().max().item() if math.isinf(p) else t.double().abs().pow(p).sum().item()
            assert abs(value - exact) <= 1e-6 * exact, (p, t.dtype, value, exact)
