"""The helpers of csrc/common.h that the CUDA and host functors share, run by
the host build: each replaces a costlier operation by one that gives the
same bits, and these tests check that claim on many inputs (numpy's float32
arithmetic is the IEEE reference: one rounding per operation, no fusion).

* ``Divisor``: ``x / c`` for a per-tensor ``|c| < 2`` as one double
  multiply by ``1/c`` and one rounding.
* ``Unscale``: the exact reciprocal of a power-of-two loss scale, so that
  ``g * (1/scale)`` is ``g / scale``.
* ``Lerp``: torch's two-branch lerp as one select, multiply and add.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.ext import needs_cpu_build

pytestmark = needs_cpu_build


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Equal bit patterns, or both NaN (NaN payloads are not part of the contract)."""
    return (bits(a) == bits(b)) | (np.isnan(a) & np.isnan(b))


def call(fn, *scalars, inputs, out=None):
    inputs = [np.ascontiguousarray(x, dtype=np.float32) for x in inputs]
    out = np.empty_like(inputs[0])
    fn(*scalars, *(x.ctypes.data for x in inputs), out.ctypes.data, out.size)
    return out


def random_floats(rng, n: int, subnormal: bool) -> np.ndarray:
    """Uniformly random bit patterns of positive floats (every binade equally
    often), with or without subnormals, plus the edges."""
    lo = 0 if subnormal else 0x00800000
    x = rng.integers(lo, 0x7F800000, size=n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    edges = np.array([0.0, np.inf, np.nan, np.finfo(np.float32).max, np.finfo(np.float32).tiny, 1.0, 2.0**-75],
                     dtype=np.float32)
    return np.concatenate([x, edges])


# c = sqrt(1 - beta2^t) for the usual betas and steps, and the range's edges
DIVISORS = sorted(
    {float(np.float32(np.sqrt(1.0 - b**t))) for b in (0.0, 0.9, 0.95, 0.99, 0.999, 0.9999) for t in (1, 2, 3, 10, 1000, 10**6)}
    | {1.0, float(np.nextafter(np.float32(1), np.float32(0))), float(np.nextafter(np.float32(2), np.float32(0))),
       1.5, 2.0**-126, 2.0**-149, 3 * 2.0**-149, 0.0}
)


def divided(x: np.ndarray, c: np.float32) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        return x / c


@pytest.mark.parametrize("c", DIVISORS)
def test_division_by_a_tensor_constant_is_the_ieee_division(cpu_ext, c):
    rng = np.random.default_rng(int(np.float32(c).view(np.uint32)))
    x = random_floats(rng, 1 << 18, subnormal=True)
    x = np.concatenate([x, -x])
    got = call(cpu_ext.divide_by, c, inputs=[x])
    ok = same_bits(got, divided(x, np.float32(c)))
    assert ok.all(), f"c={c!r}: {int((~ok).sum())} differ, e.g. {x[~ok][:4]} -> {got[~ok][:4]}"


def test_division_by_random_divisors(cpu_ext):
    """Divisors from every binade of (0, 2): the argument does not depend on
    c being a bias correction."""
    rng = np.random.default_rng(1)
    for c in rng.integers(1, 0x40000000, size=64, dtype=np.uint64).astype(np.uint32).view(np.float32):
        x = random_floats(rng, 1 << 14, subnormal=True)
        assert same_bits(call(cpu_ext.divide_by, float(c), inputs=[x]), divided(x, c)).all(), c


def test_division_needs_its_precondition(cpu_ext):
    """The comparison can fail: with c = 98 = 49 * 2 (outside |c| < 2) the
    quotients x/98 of x = 49 (2k+1) 2^-149 are exact midpoints between
    subnormals, which the division rounds to even and the double multiply
    (1/98 is inexact) often does not."""
    x = (49 * (2 * np.arange(1 << 16, dtype=np.float64) + 1) * 2.0**-149).astype(np.float32)
    x = x[x < np.finfo(np.float32).tiny]
    c = np.float32(98.0)
    assert not same_bits(call(cpu_ext.divide_by, float(c), inputs=[x]), divided(x, c)).all()


def test_unscale_multiplies_exactly_by_power_of_two_reciprocals(cpu_ext):
    rng = np.random.default_rng(3)
    g = np.concatenate([random_floats(rng, 1 << 16, subnormal=True), -random_floats(rng, 1 << 16, subnormal=True)])
    powers = [np.float32(s) * np.float32(2.0) ** k for k in range(-126, 128) for s in (1.0, -1.0)]
    for scale in powers:
        exact, factor, divisor = cpu_ext.unscale_of(float(scale))
        assert exact and divisor == scale, scale
        assert bits(np.float32(factor)) == bits(np.float32(1) / scale), scale
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            assert same_bits(g * np.float32(factor), g / scale).all(), scale
    others = [3.0, 65535.0, 1.5, 2.0**-127, 2.0**-149, 0.0, -0.0, float("inf"), float("nan"), 1e-40]
    for scale in others:
        exact, factor, _ = cpu_ext.unscale_of(scale)
        assert not exact and factor == 1.0, scale


@pytest.mark.parametrize("w", [0.0, 0.001, 0.1, 0.25, 0.4999, 0.5, 0.6, 0.9, 0.999, 1.0])
def test_lerp_is_torchs_two_branch_formula(cpu_ext, w):
    rng = np.random.default_rng(4)
    n = 1 << 16
    a = (rng.standard_normal(n) * np.exp(rng.uniform(-30, 30, n))).astype(np.float32)
    b = (rng.standard_normal(n) * np.exp(rng.uniform(-30, 30, n))).astype(np.float32)
    a[:8] = [0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, 0.0, 3.0]
    b[:8] = [-0.0, 0.0, np.inf, 1.0, 2.0, np.inf, 0.0, 3.0]
    w32 = np.float32(w)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = b - a
        expected = a + w32 * diff if w32 < 0.5 else b - diff * (np.float32(1) - w32)
    assert same_bits(call(cpu_ext.lerp_by, w, inputs=[a, b]), expected).all()
