"""csrc/rounding.h, run by the host build, against the torch reference of
fastmup.optim.precision: stochastic rounding, its random bits, and the
bf16 + remainder split (all 2^32 fp32 patterns of it)."""
from __future__ import annotations

import pytest
import torch

from fastmup import ext
from fastmup.ext import build as ext_build
from fastmup.optim import precision

from tests.fp32_patterns import fp32_patterns

pytestmark = pytest.mark.skipif(
    bool(ext_build.missing_requirements("cpu")),
    reason="the cpu backend cannot be built here: missing " + "; ".join(ext_build.missing_requirements("cpu")),
)


@pytest.fixture(scope="module")
def cpu_ext():
    return ext.load("cpu")


@pytest.mark.parametrize("dtype,code", [(torch.bfloat16, 1), (torch.float16, 2)])
def test_stochastic_round_matches_reference(cpu_ext, dtype, code):
    x = fp32_patterns(1 << 16, seed=4)
    r = torch.randint(0, 1 << 16, (x.numel(),), generator=torch.Generator().manual_seed(5))
    r32 = r.to(torch.int32)
    out = torch.empty(x.numel(), dtype=torch.int16)
    cpu_ext.stochastic_round(code, x.data_ptr(), r32.data_ptr(), out.data_ptr(), x.numel())
    assert torch.equal(out, precision.stochastic_round(x, dtype, r).view(torch.int16))


@pytest.mark.parametrize("start", [0, 12345, (1 << 32) - 700, (3 << 32) + 1])
def test_rounding_bits_match_reference(cpu_ext, start):
    seed, step, tid, n = (1 << 40) + 99, 1234, 17, 1500
    out = torch.empty(n, dtype=torch.int32)
    cpu_ext.rounding_bits(precision.seed_prefix(seed), step, tid, start, out.data_ptr(), n)
    assert torch.equal(out.long(), precision.rounding_bits(seed, step, tid, n, start=start))


def test_remainder_split_matches_reference(cpu_ext):
    x = fp32_patterns(1 << 16, seed=6)
    n = x.numel()
    b, rem, back = torch.empty(n, dtype=torch.int16), torch.empty(n, dtype=torch.int16), torch.empty(n)
    cpu_ext.encode_remainder(x.data_ptr(), b.data_ptr(), rem.data_ptr(), n)
    cpu_ext.decode_remainder(b.data_ptr(), rem.data_ptr(), back.data_ptr(), n)
    want_b, want_rem = precision.encode_remainder(x)
    assert torch.equal(b, want_b.view(torch.int16)) and torch.equal(rem, want_rem)
    assert torch.equal(back.view(torch.int32), x.view(torch.int32))


def test_remainder_split_of_every_fp32_pattern(cpu_ext):
    """All 2^32 patterns (about ten seconds): every one round-trips, every
    finite one (and ±inf) gets the nearest bf16 with ties away, every quiet
    NaN a NaN parameter; of the NaNs, exactly the 2·65535 that no exact
    16 + 16-bit split can show as NaN do not (the signalling NaNs the split
    chose for them)."""
    not_exact, not_nearest, quiet_not_nan, nan_not_nan = cpu_ext.remainder_exhaustive()
    assert (not_exact, not_nearest, quiet_not_nan) == (0, 0, 0)
    # bf16 NaN patterns: 2·127·2^16 (param, remainder) pairs; fp32 NaNs: 2·(2^23 - 1)
    assert nan_not_nan == 2 * (2**23 - 1) - 2 * 127 * 2**16
