"""distclip.core.kernels.power_sums against float64 on the same values (single process, CPU).

The reference is computed here, independently of the code under test: ``t.double().abs()``
then ``pow(p).sum()`` (``max()`` for p = inf). Every partial must be within 1e-6 of it.
"""

from __future__ import annotations

import math

import pytest
import torch

from distclip.core.kernels import BLOCK_CHUNK, power_sums

BOUND = 1e-6
P_VALUES = [0.5, 1.0, 2.0, 3.5, math.inf]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# every route: tiny, the 1,200-element case, a row tail, rows packed / alone, packed / chunked;
# LARGE_SIZES: a chunk and a half (the last chunk short)
SIZES = [1, 7, 255, 256, 1200, 4097, 2**15, 2**16 + 3]
LARGE_SIZES = [1_000_000, (1 << 20) + 5]


def reference(t: torch.Tensor, p: float) -> float:
    values = t.double().abs()
    if math.isinf(p):
        return values.max().item() if values.numel() else 0.0
    return values.pow(p).sum().item()


def rel_err(got: float, want: float) -> float:
    if got == want:  # inf == inf, 0 == 0
        return 0.0
    return abs(got - want) / abs(want) if want else math.inf


def assert_exact(tensors: list[torch.Tensor], p: float) -> None:
    got = power_sums(tensors, p)
    assert got.dtype == torch.float64 and got.shape == (len(tensors),)
    errors = [rel_err(g, reference(t, p)) for g, t in zip(got.tolist(), tensors)]
    worst = max(range(len(errors)), key=errors.__getitem__)
    assert errors[worst] <= BOUND, f"{tensors[worst].numel()} values, {tensors[worst].dtype}, p={p}: {errors[worst]:.2e}"


def data(kind: str, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        t = torch.randn(n, generator=gen)
    elif kind == "equal":  # the worst case for sequential accumulation
        t = torch.full((n,), 0.7)
    else:  # mixed magnitudes, within the dtype's range (fp16: about 1e-7 .. 6e4)
        low, high = (-7, 4) if dtype == torch.float16 else (-30, 30)
        signs = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
        t = signs * 10 ** (torch.rand(n, generator=gen, dtype=torch.float64) * (high - low) + low)
    return t.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["normal", "equal", "mixed"])
def test_every_size_and_p_within_bound(kind, dtype):
    sizes = SIZES + (LARGE_SIZES if kind == "equal" else [])
    tensors = [data(kind, n, dtype, seed) for seed, n in enumerate(sizes)]
    for p in P_VALUES:
        assert_exact(tensors, p)


def test_old_kernel_fails_the_bound_at_50m():
    """torch's fp32 kernel misses float64 by far more than 1e-6 here: the test can fail."""
    t = torch.randn(50_000_000, generator=torch.Generator().manual_seed(0))
    wide = t.double().abs_()  # the reference, in place to spare memory
    want_p1 = wide.sum().item()
    want_p2 = wide.square_().sum().item()
    assert rel_err(torch._foreach_norm([t], 1.0)[0].double().item(), want_p1) > 1e-3
    assert rel_err(power_sums([t], 1.0).item(), want_p1) <= BOUND
    assert rel_err(power_sums([t], 2.0).item(), want_p2) <= BOUND


def test_old_kernel_fails_the_bound_on_1200_equal_values():
    t = torch.full((1200,), 0.7)
    assert rel_err(torch._foreach_norm([t], 1.0)[0].double().item(), reference(t, 1.0)) > BOUND
    assert_exact([t], 1.0)


def test_16m_bf16():
    t = torch.randn(16_000_000, generator=torch.Generator().manual_seed(1)).bfloat16()
    for p in (1.0, 2.0):
        want = reference(t, p)
        assert rel_err(torch._foreach_norm([t], p, dtype=torch.float32)[0].double().item() ** p, want) > BOUND
        assert rel_err(power_sums([t], p).item(), want) <= BOUND


def test_worst_equal_row():
    """fp32, p = 2: the row kernel's worst case over every fp32 mantissa, all values equal (6.6e-7)."""
    for c in (1.154783010482788, 1.1547012329101562, 1.4142166376113892, 0.1, 1.0):
        assert_exact([torch.full((256 * 300,), c), torch.full((256 * 3,), c)], 2.0)


def test_worst_equal_column():
    """p = 1: the column kernel (16 terms per fp32 column sum) at its worst constant over every fp32
    mantissa, all values equal (2.7e-7), over one chunk and over several."""
    for n in (1 << 16, (1 << 18) + 16 * 3 + 5):
        assert_exact([torch.full((n,), 1.7777795791625977), torch.full((n,), 0.1)], 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_model_mixes(dtype):
    """The mixes the speed targets run (large matrices with small vectors: 1M-element matrices, a 10M-parameter
    model's 645 x 645 weights and 645 vectors), the row / column kernels' threshold and chunk edges, p = 1, 2,
    a fractional and a large p, inf; random and equal values."""
    sizes = [1_000_000, 1_000_000, 416_025, 1 << 17, (1 << 17) + 256 + 17, BLOCK_CHUNK + 256 + 17,
             1 << 14, (1 << 14) - 1, 1000, 1000, 645, 64]
    for kind in ("normal", "equal"):
        tensors = [data(kind, n, dtype, seed) for seed, n in enumerate(sizes)]
        for p in (1.0, 2.0, 3.5, math.inf):
            assert_exact(tensors, p)


@pytest.mark.parametrize("p", P_VALUES)
def test_non_contiguous_views(p):
    base = torch.randn(1500, 900, generator=torch.Generator().manual_seed(2))
    assert_exact([base.t(), base[:, ::3], base[:40, :50].t(), base[::7, 1]], p)


def test_empty_tensors_give_zero():
    empty = torch.empty(0)
    for p in P_VALUES:
        assert power_sums([empty], p).tolist() == [0.0]
        assert power_sums([empty, torch.ones(3), empty], p).tolist() == [0.0, 3.0 if p != math.inf else 1.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [300, 2**16 + 3])
@pytest.mark.parametrize("p", [0.5, 2.0, 3.5, 4.0])
def test_terms_outside_fp32_range(n, p, dtype):
    """|x|^p beyond fp32's range. Partials of fp32 terms (fp32 at p = 2, any dtype at p != 1, 2)
    that came out non-finite or below 2^-99 per element are redone with float64 terms; the
    other paths take float64 terms from the start."""
    huge = torch.full((n,), 3e38)  # x^2 and x^3.5 overflow fp32
    big = data("normal", n, torch.float32) * 1e20
    tiny = data("normal", n, torch.float32) * 1e-25  # x^2 below fp32's subnormals
    subnormal = torch.full((n,), 1e-40)  # fp32 subnormal values (bf16 keeps some of them)
    lone = torch.zeros(n)
    lone[n // 2] = 1e-30
    assert_exact([t.to(dtype) for t in (huge, big, tiny, subnormal, lone, torch.zeros(n))], p)


def test_fp16_terms_outside_fp32_range():
    assert_exact([torch.full((5000,), 65504.0, dtype=torch.float16)], 8.0)  # 65504^8 > fp32 max
    assert_exact([torch.full((5000,), 6e-8, dtype=torch.float16)], 6.0)  # (6e-8)^6 below fp32's subnormals


@pytest.mark.parametrize("p", [1.0, 2.0, 3.5, math.inf])
def test_non_finite_values_propagate(p):
    with_inf, with_nan = torch.randn(5000), torch.randn(5000)
    with_inf[17], with_nan[4000] = math.inf, math.nan
    got = power_sums([with_inf, with_nan, torch.ones(10)], p).tolist()
    assert got[0] == math.inf and math.isnan(got[1]) and got[2] == (10.0 if p != math.inf else 1.0)


def test_inputs_unchanged_and_results_not_aliased():
    tensors = [data("normal", n, torch.float32, s) for s, n in enumerate(SIZES + LARGE_SIZES)] + [torch.randn(1, 1)]
    before = [t.clone() for t in tensors]
    for p in (0.5, 1.0, 2.0, 3.5):
        first = power_sums(tensors, p)
        kept = first.clone()
        power_sums([t * 3 for t in tensors], p)  # same sizes: the cached plan and scratch buffers again
        assert torch.equal(first, kept)
    for t, b in zip(tensors, before):
        assert torch.equal(t, b)
    single = torch.randn(100, dtype=torch.float64)  # one fp64 piece: flattening would return a view
    copy = single.clone()
    power_sums([single], 0.5)
    assert torch.equal(single, copy)


def test_many_small_tensors():
    tensors = [data("equal" if i % 2 else "normal", 128, torch.float32, i) for i in range(3000)]
    for p in (1.0, 2.0, 3.5):
        assert_exact(tensors, p)


def test_errors_say_what_to_do():
    with pytest.raises(ValueError, match="p > 0"):
        power_sums([torch.ones(3)], 0.0)
    with pytest.raises(ValueError, match="one dtype"):
        power_sums([torch.ones(3), torch.ones(3, dtype=torch.float64)], 2.0)
    assert power_sums([], 2.0).shape == (0,)
