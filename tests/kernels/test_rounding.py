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
    key = rounding.rounding_key(prefix, tl.load(step_ptr), tensor_id.to(tl.int64), start >> 32)
    r = rounding.rounding_bits(e.to(tl.uint32), key)
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


# ----------------------------------------------------------------------
# the optimizer kernels under each storage mode, against the eager reference
# ----------------------------------------------------------------------
import fastmup  # noqa: E402
from fastmup.infshape import InfDim, InfShape  # noqa: E402
from fastmup.optim import MuAdam, MuAdamW, MuSGD  # noqa: E402
from fastmup.plan.spec import MASTER_BUFFER, REMAINDER_BUFFER  # noqa: E402

from .conftest import assert_fp32_close, assert_within_one_rounding  # noqa: E402

# sizes below, at and across the kernels' tiles (1024) and blocks (4096), empty
SHAPES = [(37,), (64, 33), (4096,), (4100,), (0,), (3, 5, 7), (2, 4097)]

MODES = {
    torch.bfloat16: [dict(stochastic_rounding=True, rounding_seed=3), dict(master_weights="fp32"), dict(master_weights="remainder")],
    torch.float16: [dict(stochastic_rounding=True), dict(master_weights="fp32")],
}
CASES = [(dtype, mode) for dtype, modes in MODES.items() for mode in modes]


def _params(dtype, unaligned=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in SHAPES:
        n = int(torch.Size(shape).numel())
        if unaligned:  # one element into a buffer: 2-byte aligned, the kernels' unvectorised path
            data = torch.randn(n + 1, generator=g).to(dtype)[1:].view(shape)
        else:
            data = torch.randn(shape, generator=g).to(dtype)
        p = torch.nn.Parameter(data.to(DEVICE))
        p.infshape = InfShape([InfDim(None, s) for s in shape])
        out.append(p)
    out[1].infshape = InfShape([InfDim(16, 64), InfDim(11, 33)])  # a hidden matrix: its own μP lr
    return out


def _run(cls, kw, dtype, mode, steps=3, unaligned=False, scale=None):
    """The triton and eager runs from the same params and grads, synchronised
    before each step; yields (step, triton params, eager params, optimizers)."""
    a, b = _params(dtype, unaligned), _params(dtype, unaligned)
    fused = cls(a, backend="triton", **kw, **mode)
    eager = cls(b, backend="eager", **kw, **mode)
    if scale is not None:
        for o in (fused, eager):
            o.grad_scale = torch.tensor([scale], device=DEVICE)
            o.found_inf = torch.tensor([0.0], device=DEVICE)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for x, y in zip(a, b):
            grad = (torch.randn(x.shape, generator=g) * (scale or 1.0)).to(dtype).to(DEVICE)
            x.grad, y.grad = grad.clone(), grad.clone()
        fused.step()
        eager.step()
        assert {bt.signature.backend for bt in fused._batches} == {"triton"}
        yield step, a, b, fused, eager
        with torch.no_grad():  # the next comparison is one step deep
            for x, y in zip(a, b):
                y.copy_(x)
                for key, value in fused.state[x].items():
                    eager.state[y][key].copy_(value)


@pytest.mark.parametrize("unaligned", [False, True])
@pytest.mark.parametrize("dtype,mode", CASES)
def test_sgd_matches_eager_bit_for_bit(dtype, mode, unaligned):
    """SGD's fp32 math is eager's op for op: every mode's stored bits agree
    (stochastic rounding: the same random bits, element for element)."""
    for kw in (dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True), dict(lr=0.05)):
        for _, a, b, fused, eager in _run(MuSGD, kw, dtype, mode, unaligned=unaligned):
            for x, y in zip(a, b):
                assert torch.equal(x.view(torch.int16), y.view(torch.int16))
                for key, value in eager.state[y].items():
                    assert torch.equal(fused.state[x][key], value), key


@pytest.mark.parametrize("cls", [MuAdam, MuAdamW])
@pytest.mark.parametrize("dtype,mode", CASES)
def test_adam_matches_eager(cls, dtype, mode):
    """Adam as in tests/kernels/test_adam.py: eager's CPU sqrt may be an ulp
    off the kernel's IEEE one, so fp32 values (the masters) agree within
    FP32_ULPS and stored 16-bit values within one rounding; the parameter and
    the master (remainder) of the kernel agree with each other exactly."""
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=cls is MuAdamW)
    for _, a, b, fused, eager in _run(cls, kw, dtype, mode, scale=1024.0):
        for x, y in zip(a, b):
            assert_within_one_rounding(x.detach(), y.detach(), "param")
            st = fused.state[x]
            if MASTER_BUFFER in st:
                assert_fp32_close(st[MASTER_BUFFER], eager.state[y][MASTER_BUFFER], "master")
                want = precision.round_nearest_away_bf16(st[MASTER_BUFFER]) if dtype == torch.bfloat16 else st[MASTER_BUFFER].to(dtype)
                assert torch.equal(x.detach().view(torch.int16), want.view(torch.int16))
            if REMAINDER_BUFFER in st:
                assert_fp32_close(
                    precision.decode_remainder(x.detach(), st[REMAINDER_BUFFER]),
                    precision.decode_remainder(y.detach(), eager.state[y][REMAINDER_BUFFER]),
                    "param + remainder",
                )


@pytest.mark.parametrize("cls,kw", [(MuAdamW, dict(lr=1e-2, weight_decay=0.1)), (MuSGD, dict(lr=0.1, momentum=0.9))])
def test_remainder_and_fp32_masters_are_bit_identical_in_the_kernels(cls, kw):
    runs = []
    for mode in ("fp32", "remainder"):
        params = _params(torch.bfloat16)
        opt = cls(params, backend="triton", master_weights=mode, **kw)
        g = torch.Generator().manual_seed(2)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16).to(DEVICE)
            opt.step()
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    for x, y in zip(pa, pb):
        assert torch.equal(x.view(torch.int16), y.view(torch.int16))
        assert torch.equal(precision.decode_remainder(y.detach(), ob.state[y][REMAINDER_BUFFER]), oa.state[x][MASTER_BUFFER])


def test_found_inf_skips_every_mode_on_the_device():
    for mode in MODES[torch.bfloat16]:
        params = _params(torch.bfloat16)
        opt = MuAdam(params, backend="triton", lr=1e-2, **mode)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params]
        opt.grad_scale = torch.tensor([2.0**16], device=DEVICE)
        opt.found_inf = torch.tensor([1.0], device=DEVICE)
        opt.step()
        for p, (value, state) in zip(params, before):
            assert torch.equal(p, value)
            assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())


def test_fp16_stochastic_round_of_subnormals_matches_reference():
    """The fp16 subnormal case densely: every binade from 2^-45 to fp16's
    smallest normal, both signs."""
    g = torch.Generator().manual_seed(9)
    n = 1 << 15
    x = (torch.rand(n, generator=g) + 1) * torch.exp2(torch.randint(-45, -13, (n,), generator=g).float())
    x = torch.where(torch.rand(n, generator=g) < 0.5, -x, x)
    r = torch.randint(0, 1 << 16, (n,), dtype=torch.int64, generator=g)
    out = torch.empty(n, dtype=torch.float16, device=DEVICE)
    _sr_kernel[_grid(n)](x.to(DEVICE), r.to(torch.int32).to(DEVICE), out, n, DTYPE=tl.float16, BLOCK=BLOCK)
    assert torch.equal(out.cpu().view(torch.int16), precision.stochastic_round(x, torch.float16, r).view(torch.int16))
