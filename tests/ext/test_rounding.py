"""csrc/rounding.h, run by the host build, against the torch reference of
fastmup.optim.precision: stochastic rounding, its random bits, and the
bf16 + remainder split (all 2^32 fp32 patterns of it)."""
from __future__ import annotations

import pytest
import torch

from fastmup.optim import precision

from tests.ext import needs_cpu_build
from tests.fp32_patterns import fp32_patterns

pytestmark = needs_cpu_build


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


# ----------------------------------------------------------------------
# the cpu backend's optimizers under each storage mode
# ----------------------------------------------------------------------
from fastmup.infshape import InfDim, InfShape  # noqa: E402
from fastmup.optim import MuAdam, MuAdamW, MuSGD  # noqa: E402
from fastmup.plan.spec import MASTER_BUFFER, REMAINDER_BUFFER  # noqa: E402

# sizes across the host loops' tiles (1024) and block-map entries (>= 4096), empty
SHAPES = [(37,), (64, 33), (4096,), (5000,), (0,), (2, 4097), (70000,)]
MODES = {
    torch.bfloat16: [dict(stochastic_rounding=True, rounding_seed=11), dict(master_weights="fp32"), dict(master_weights="remainder")],
    torch.float16: [dict(stochastic_rounding=True), dict(master_weights="fp32")],
}
CASES = [(dtype, mode) for dtype, modes in MODES.items() for mode in modes]
# test_cpu_backend.py's bound, 16 eps32 (max |prev| + max |delta|), with the
# step's change (lr-sized, params ~ N(0, 1)) folded into a factor of 2
EPS32 = 2.0**-23


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in SHAPES:
        p = torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype))
        p.infshape = InfShape([InfDim(None, s) for s in shape])
        out.append(p)
    return out


def _steps(opts_and_params, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    dtype = opts_and_params[0][1][0].dtype
    for _ in range(n):
        grads = [torch.randn(p.shape, generator=g).to(dtype) for p in opts_and_params[0][1]]
        for opt, params in opts_and_params:
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
            opt.step()
        yield


@pytest.mark.parametrize("dtype,mode", CASES)
def test_sgd_with_exact_updates_matches_eager_bit_for_bit(cpu_ext, dtype, mode):
    """lr a power of two, no momentum or decay: ``p - lr·g`` is one rounding
    in both backends (torch's fused multiply-add and the host's multiply
    then add agree when the product is exact), so the stored bits, random
    rounding bits included, must be equal."""
    a, b = _params(dtype), _params(dtype)
    fused = MuSGD(a, lr=2.0**-4, backend="cpu", **mode)
    eager = MuSGD(b, lr=2.0**-4, backend="eager", **mode)
    for _ in _steps([(fused, a), (eager, b)]):
        assert {bt.signature.backend for bt in fused._batches} == {"cpu"}
        for x, y in zip(a, b):
            assert torch.equal(x.view(torch.int16), y.view(torch.int16))
            for key, value in eager.state[y].items():
                assert torch.equal(fused.state[x][key], value), key


@pytest.mark.parametrize("cls,kw", [(MuAdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)), (MuSGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01))])
@pytest.mark.parametrize("dtype,mode", CASES)
def test_matches_eager_within_the_backends_rounding(cpu_ext, cls, kw, dtype, mode):
    """One step from identical inputs (tolerances of test_cpu_backend.py: the
    host build rounds torch's fused multiply-adds twice): masters within a few
    fp32 ulps of their magnitude, stored 16-bit values within one rounding,
    and the backend's parameter exactly the rounding of its own master."""
    a, b = _params(dtype), _params(dtype)
    fused = cls(a, backend="cpu", **kw, **mode)
    eager = cls(b, backend="eager", **kw, **mode)
    for _ in _steps([(fused, a), (eager, b)], n=2):
        for x, y in zip(a, b):
            if x.numel() == 0:
                continue
            scale = y.detach().float().abs().max().item()
            tol = 32 * EPS32 * scale
            spacing = torch.nextafter(y.detach().abs(), torch.tensor(float("inf"), dtype=dtype)).float() - y.detach().abs().float()
            assert ((x.detach().float() - y.detach().float()).abs() <= spacing + tol).all()
            st = fused.state[x]
            if MASTER_BUFFER in st:
                torch.testing.assert_close(st[MASTER_BUFFER], eager.state[y][MASTER_BUFFER], rtol=0, atol=tol)
                want = precision.round_nearest_away_bf16(st[MASTER_BUFFER]) if dtype == torch.bfloat16 else st[MASTER_BUFFER].to(dtype)
                assert torch.equal(x.detach().view(torch.int16), want.view(torch.int16))
            if REMAINDER_BUFFER in st:
                mine = precision.decode_remainder(x.detach(), st[REMAINDER_BUFFER])
                ref = precision.decode_remainder(y.detach(), eager.state[y][REMAINDER_BUFFER])
                torch.testing.assert_close(mine, ref, rtol=0, atol=tol)
        with torch.no_grad():  # one step deep
            for x, y in zip(a, b):
                y.copy_(x)
                for key, value in fused.state[x].items():
                    eager.state[y][key].copy_(value)


@pytest.mark.parametrize("cls,kw", [(MuAdam, dict(lr=1e-2, weight_decay=0.1)), (MuSGD, dict(lr=0.1, momentum=0.9))])
def test_remainder_and_fp32_masters_are_bit_identical(cpu_ext, cls, kw):
    a, b = _params(torch.bfloat16), _params(torch.bfloat16)
    oa = cls(a, backend="cpu", master_weights="fp32", **kw)
    ob = cls(b, backend="cpu", master_weights="remainder", **kw)
    for _ in _steps([(oa, a), (ob, b)], n=4):
        pass
    for x, y in zip(a, b):
        assert torch.equal(x.view(torch.int16), y.view(torch.int16))
        assert torch.equal(precision.decode_remainder(y.detach(), ob.state[y][REMAINDER_BUFFER]), oa.state[x][MASTER_BUFFER])


@pytest.mark.parametrize("dtype,mode", CASES)
def test_instruction_sets_and_threads_agree_bitwise(cpu_ext, dtype, mode):
    runs = []
    for isa, threads in (("auto", 2), ("generic", 1)):
        cpu_ext.set_isa(isa)
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            params = _params(dtype)
            opt = MuAdamW(params, lr=1e-2, backend="cpu", **mode)
            for _ in _steps([(opt, params)], n=2):
                pass
        finally:
            cpu_ext.set_isa("auto")
            torch.set_num_threads(old)
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    for x, y in zip(pa, pb):
        assert torch.equal(x.view(torch.int16), y.view(torch.int16))
        assert all(torch.equal(v, ob.state[y][k]) for k, v in oa.state[x].items())
