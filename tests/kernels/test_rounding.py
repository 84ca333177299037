"""fastmup.kernels.rounding: the jit helpers of the parameter storage modes
against the torch reference of fastmup.optim.precision, bit for bit."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastmup.kernels import rounding  # noqa: E402
from fastmup.optim import precision  # noqa: E402

from tests.fp32_patterns import fp32_patterns as _patterns  # noqa: E402

from .conftest import DEVICE  # noqa: E402

BLOCK = 1024


@triton.jit
def _sr_kernel(x_ptr, r_ptr, out_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    r = tl.load(r_ptr + offs, mask=mask, other=0).to(tl.uint32)
    tl.store(out_ptr + offs, rounding.stochastic_round(x, r, DTYPE), mask=mask)


@triton.jit
def _bits_kernel(out_ptr, prefix, step_ptr, tensor_id, start, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e = start + offs.to(tl.int64)
    key, key2 = rounding.rounding_key(prefix, tl.load(step_ptr), tensor_id.to(tl.int64), start >> 32)
    r = rounding.rounding_bits(e.to(tl.uint32), key, key2)
    tl.store(out_ptr + offs, r.to(tl.int32), mask=offs < n)


@triton.jit
def _split_kernel(x_ptr, b_ptr, rem_ptr, near_ptr, back_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    b, rem = rounding.remainder_split(x)
    tl.store(b_ptr + offs, b, mask=mask)
    tl.store(rem_ptr + offs, rem, mask=mask)
    tl.store(near_ptr + offs, rounding.nearest_away_bf16(x), mask=mask)
    tl.store(back_ptr + offs, rounding.remainder_join(b, rem), mask=mask)


def _int32(word: int) -> int:
    return word - (1 << 32) if word >= (1 << 31) else word


def _grid(n):
    return (triton.cdiv(n, BLOCK),)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_matches_reference(dtype):
    x = _patterns(5000).to(DEVICE)
    n = x.numel()
    r = torch.randint(0, 1 << 16, (n,), dtype=torch.int64, generator=torch.Generator().manual_seed(1))
    out = torch.empty(n, dtype=dtype, device=DEVICE)
    _sr_kernel[_grid(n)](x, r.to(torch.int32).to(DEVICE), out, n, DTYPE=rounding_dtype(dtype), BLOCK=BLOCK)
    want = precision.stochastic_round(x.cpu(), dtype, r)
    assert torch.equal(out.cpu().view(torch.int16), want.view(torch.int16))


def rounding_dtype(dtype):
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


@pytest.mark.parametrize("start", [0, 777, 1 << 32, (5 << 32) + 3])
def test_rounding_bits_match_reference(start):
    n, seed, step, tid = 3000, 0xDEADBEEF12345, 11, 42
    out = torch.empty(n, dtype=torch.int32, device=DEVICE)
    steps = torch.tensor([float(step)], device=DEVICE)
    _bits_kernel[_grid(n)](out, _int32(precision.seed_prefix(seed)), steps, tid, start, n, BLOCK=BLOCK)
    want = precision.rounding_bits(seed, step, tid, n, start=start)
    assert torch.equal(out.cpu().long(), want)


def test_remainder_split_and_join_match_reference():
    x = _patterns(20000).to(DEVICE)
    n = x.numel()
    b = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    rem = torch.empty(n, dtype=torch.int16, device=DEVICE)
    near = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    back = torch.empty(n, dtype=torch.float32, device=DEVICE)
    _split_kernel[_grid(n)](x, b, rem, near, back, n, BLOCK=BLOCK)
    want_b, want_rem = precision.encode_remainder(x.cpu())
    assert torch.equal(b.cpu().view(torch.int16), want_b.view(torch.int16))
    assert torch.equal(rem.cpu(), want_rem)
    assert torch.equal(near.cpu().view(torch.int16), want_b.view(torch.int16))
    assert torch.equal(back.cpu().view(torch.int32), x.cpu().view(torch.int32))  # exact, NaN payloads included
