"""Drop-in contract: PyTorch's own ``clip_grad_norm_`` tests (test/test_nn.py), ported to distclip.

Ported: ``test_clip_grad_norm`` (norms, post-clip norms, one scaling factor for every element,
small gradients untouched, a single tensor as input, the empty-generator warning, ``foreach``
True/False) and ``test_clip_grad_norm_error_if_nonfinite`` (its whole case table for the norm
types distclip supports: p > 0 and inf; torch's negative and zero "norms" are not norms and
distclip refuses them with a ConfigError). Every case also runs through torch itself, so a
case's expectation is torch's behaviour, not a number copied from distclip. distclip's messages
carry more detail; torch's words must be contained in them.
"""

from __future__ import annotations

import math
import warnings
from itertools import product

import pytest
import torch
from torch import inf, nan

import distclip

NORM_TYPES = [0.5, 1.5, 2, 4, "inf"]  # as in torch's test, 'inf' as a string
MAX_NORM = 2.0


def compute_norm(params: list[torch.Tensor], norm_type: float | str) -> float:
    """torch's test helper, in float64."""
    p = float(norm_type)
    grads = [q.grad.detach().double() for q in params]
    if math.isinf(p):
        return max(g.abs().max().item() for g in grads)
    return sum(g.abs().pow(p).sum().item() for g in grads) ** (1.0 / p)


def scaling(params: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """torch's compare_scaling: every element scaled by the same factor (std 0); returns the factor."""
    scale = torch.cat([q.grad.detach().div(g).view(-1) for q, g in zip(params, grads)])
    assert scale.std().item() == pytest.approx(0.0, abs=1e-7), scale
    return scale[0]


@pytest.mark.parametrize("foreach", [False, True])
def test_clip_grad_norm(foreach):
    layer = torch.nn.Linear(10, 10)
    params = list(layer.parameters())
    grads = [torch.arange(1.0, 101).view(10, 10), torch.ones(10).div(1000)]
    for norm_type in NORM_TYPES:
        for q, g in zip(params, grads):
            q.grad = g.clone().view_as(q)
        before = compute_norm(params, norm_type)
        norm = distclip.clip_grad_norm_(layer.parameters(), MAX_NORM, norm_type=norm_type, foreach=foreach)
        after = compute_norm(params, norm_type)
        assert norm.item() == pytest.approx(before, rel=1e-6), norm_type
        assert after == pytest.approx(MAX_NORM, rel=1e-6), norm_type
        assert after <= before
        scaling(params, grads)

    # small gradients are left unchanged
    grads = [torch.rand(10, 10).div(10000), torch.ones(10).div(500)]
    for norm_type in NORM_TYPES:
        for q, g in zip(params, grads):
            q.grad.copy_(g)
        before = compute_norm(params, norm_type)
        norm = distclip.clip_grad_norm_(layer.parameters(), MAX_NORM, norm_type=norm_type, foreach=foreach)
        after = compute_norm(params, norm_type)
        assert norm.item() == pytest.approx(before, rel=1e-6)
        assert after == before and after <= MAX_NORM
        assert scaling(params, grads).item() == 1.0

    # a single tensor is accepted, as is a list of one
    p1, p2 = torch.randn(10, 10), torch.randn(10, 10)
    g = torch.arange(1.0, 101).view(10, 10)
    p1.grad, p2.grad = g.clone(), g.clone()
    for norm_type in NORM_TYPES:
        distclip.clip_grad_norm_(p1, MAX_NORM, norm_type=norm_type, foreach=foreach)
        distclip.clip_grad_norm_([p2], MAX_NORM, norm_type=norm_type, foreach=foreach)
        assert torch.equal(p1.grad, p2.grad)

    # an exhausted generator: torch's warning, word for word, and nothing clipped
    exhausted = layer.parameters()
    for _ in exhausted:
        pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        norm = distclip.clip_grad_norm_(exhausted, MAX_NORM, foreach=foreach)
    messages = [str(w.message) for w in caught]
    assert "`parameters` is an empty generator, no gradient clipping will occur." in messages, messages
    assert norm.item() == 0.0


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_grad_norm_equals_torch_on_the_same_gradients(norm_type):
    """Returned norm and clipped gradients against torch's own function, foreach on and off."""
    torch.manual_seed(0)
    for foreach in (False, True):
        ours, theirs = torch.nn.Linear(10, 7), torch.nn.Linear(10, 7)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            a.grad = torch.randn_like(a) * 3
            b.grad = a.grad.clone()
        norm = distclip.clip_grad_norm_(ours.parameters(), 1.0, norm_type=norm_type, foreach=foreach)
        expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0, norm_type=norm_type, foreach=foreach)
        assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- error_if_nonfinite
NORMS_POS = [0.1, 1, 2, 3.5, inf]  # torch's norms_pos; its negative and zero orders are not norms
# (grad_only_one_elem, prefix_finite_grad_param, scalars, orders with a non-finite norm): torch's table
NONFINITE_CASES = [
    (False, False, [inf, -inf], NORMS_POS),
    (False, True, [inf, -inf], NORMS_POS),
    (True, False, [inf, -inf], NORMS_POS),
    (True, True, [inf, -inf], NORMS_POS),
    (False, False, [nan], NORMS_POS),
    (False, True, [nan], NORMS_POS),
    (True, False, [nan], NORMS_POS),
    (True, True, [nan], NORMS_POS),
    (False, False, [2e22, -2e22], []),
    (False, True, [2e22, -2e22], []),
    (True, False, [2e22, -2e22], []),
    (True, True, [2e22, -2e22], []),
    (False, False, [2e200, -2e200], [3.5, 2]),  # overflows to inf for some orders only
    (False, True, [2e200, -2e200], [3.5, 2]),
    (True, False, [2e200, -2e200], [3.5, 2]),
    (True, True, [2e200, -2e200], [3.5, 2]),
]


def gen_parameters(scalar: float, grad_only_one_elem: bool, prefix_finite_grad_param: bool) -> list[torch.Tensor]:
    param = torch.ones(10, dtype=torch.float64, requires_grad=True)
    if grad_only_one_elem:
        param[1].mul(scalar).sum().backward()
    else:
        param.mul(scalar).sum().backward()
    if not prefix_finite_grad_param:
        return [param]
    prefix = torch.ones(1, dtype=torch.float64, requires_grad=True)
    prefix.mul(1).sum().backward()
    return [prefix, param]


def torch_words(norm_type: float) -> str:
    return (f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, "
            "so it cannot be clipped.")


@pytest.mark.parametrize("case", range(len(NONFINITE_CASES)))
def test_clip_grad_norm_error_if_nonfinite(case):
    one_elem, prefix, scalars, nonfinite_orders = NONFINITE_CASES[case]
    for norm_type, scalar, error_if_nonfinite in product(NORMS_POS, scalars, (False, True)):
        label = (norm_type, scalar, one_elem, prefix, error_if_nonfinite)
        ours = gen_parameters(scalar, one_elem, prefix)
        theirs = gen_parameters(scalar, one_elem, prefix)
        torch_raised = None
        try:
            torch.nn.utils.clip_grad_norm_(theirs, 1, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite)
        except RuntimeError as err:
            torch_raised = str(err)
        should_raise = norm_type in nonfinite_orders and error_if_nonfinite
        assert (torch_raised is not None) == should_raise, (label, torch_raised)  # the table is torch's behaviour
        before = [q.grad.clone() for q in ours]
        if should_raise:
            with pytest.raises(RuntimeError) as err:  # NonFiniteGradientError is a RuntimeError, as torch's
                distclip.clip_grad_norm_(ours, 1, norm_type=norm_type, error_if_nonfinite=True)
            assert isinstance(err.value, distclip.NonFiniteGradientError), label
            assert torch_words(norm_type) in str(err.value), (label, str(err.value))
            for a, b in zip(ours, before):  # gradients untouched when it raises
                torch.testing.assert_close(a.grad, b, rtol=0, atol=0, equal_nan=True, msg=str(label))
        else:
            norm = distclip.clip_grad_norm_(ours, 1, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite)
            expected = torch.nn.utils.get_total_norm(before, norm_type)
            # distclip's norm and coefficient are fp32 (torch's: the gradients' dtype), a documented deviation
            torch.testing.assert_close(norm, expected.float(), rtol=1e-6, atol=0, equal_nan=True, msg=str(label))
            if expected.isfinite() and expected.item() > torch.finfo(torch.float32).max:
                continue  # float64 norm 2e210: torch scales by 5e-211, distclip's fp32 coefficient is 0 (documented)
            for a, b in zip(ours, theirs):  # same clipped gradients as torch (NaN where torch has NaN)
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0, equal_nan=True, msg=str(label))


def test_orders_that_are_not_norms_are_refused_clearly():
    """torch also accepts 0 and negative orders; distclip refuses them naming the key."""
    param = torch.ones(3, requires_grad=True)
    param.grad = torch.ones(3)
    for bad in (0, -1, -3.5):
        with pytest.raises(distclip.ConfigError, match="norm_type"):
            distclip.clip_grad_norm_([param], 1.0, norm_type=bad)
