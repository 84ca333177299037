"""csrc/rounding.h, run by the host build, against the torch reference of
fastmup.optim.precision: stochastic rounding, its random bits, and the
bf16 + remainder split (all 2^32 fp32 patterns of it)."""
from __future__ import annotations

import pytest
import torch

from fastmup.optim import precision

from tests.ext import needs_cpu_build
from tests.fp32_patterns import SPECIAL_BITS, fp32_patterns, from_bits

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


# ----------------------------------------------------------------------
# the pair and pack forms of the CUDA kernels (rounding.h: stochastic_pack,
# stochastic_pair), run by the host build
# ----------------------------------------------------------------------
def _with_specials_everywhere(pack: int, seed: int) -> torch.Tensor:
    """Each special pattern at each position of a pack of ordinary values, so
    that every pair position takes the exact form after a failed check."""
    special = from_bits(torch.tensor(SPECIAL_BITS, dtype=torch.int64))
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(len(SPECIAL_BITS) * pack, pack, generator=g)
    for k, v in enumerate(special):
        for q in range(pack):
            out[k * pack + q, q] = v
    return out.reshape(-1)


@pytest.mark.parametrize("dtype,code", [(torch.bfloat16, 1), (torch.float16, 2)])
@pytest.mark.parametrize("pack", [2, 4, 8])
def test_cuda_pack_rounding_matches_reference(cpu_ext, dtype, code, pack):
    """The kernels' packs (from the entry's head, at every pair offset a pack
    takes), their tails (pairs and a last single) and entries at and across
    the 2^32-element key boundary, against the reference bits and rounding,
    on every class of value and on specials at every position of a pack."""
    seed, step, tid = (1 << 35) + 3, 77, 5
    values = [fp32_patterns(2048, seed=7), torch.roll(fp32_patterns(2048, seed=8), 3), _with_specials_everywhere(pack, 9)]
    for x in values:
        for n in sorted({min(k, x.numel()) for k in (8192, 8191, 13, 3, 2, 1, 0)}, reverse=True):
            block = 8192 if n > 7 else 8
            for start in (0, 5 * block, (1 << 32) - block, (3 << 32) + 7 * block):
                xs = x[:n].contiguous()
                out = torch.empty(n, dtype=torch.int16)
                cpu_ext.stochastic_packs(code, pack, precision.seed_prefix(seed), step, tid, start, xs.data_ptr(), out.data_ptr(), n)
                r = precision.rounding_bits(seed, step, tid, n, start=start)
                want = precision.stochastic_round(xs, dtype, r).view(torch.int16)
                assert torch.equal(out, want), (n, start, (out != want).nonzero()[:5].flatten().tolist())


def test_cuda_pack_rounding_refuses_bad_runs(cpu_ext):
    x = torch.zeros(8)
    out = torch.empty(8, dtype=torch.int16)
    with pytest.raises(ValueError, match="pack must be"):
        cpu_ext.stochastic_packs(1, 16, 0, 1, 0, 0, x.data_ptr(), out.data_ptr(), 8)
    with pytest.raises(ValueError, match="multiple of a power of two"):
        cpu_ext.stochastic_packs(1, 8, 0, 1, 0, 4, x.data_ptr(), out.data_ptr(), 8)


def _cheap(cpu_ext, code, x, words):
    h = torch.empty(words.numel(), dtype=torch.int32)
    ok = torch.empty(words.numel(), dtype=torch.uint8)
    cpu_ext.cheap_pairs(code, x.data_ptr(), words.data_ptr(), h.data_ptr(), ok.data_ptr(), words.numel())
    return h.long() & 0xFFFFFFFF, ok.bool()


def _reference_pairs(x, dtype, words):
    w = words.long() & 0xFFFFFFFF
    r = torch.stack([w & 0xFFFF, w >> 16], dim=1).reshape(-1)
    b = precision.stochastic_round(x, dtype, r).view(torch.int16).long() & 0xFFFF
    return b[0::2] | (b[1::2] << 16)


@pytest.mark.parametrize("dtype,code", [(torch.bfloat16, 1), (torch.float16, 2)])
def test_cheap_pair_check(cpu_ext, dtype, code):
    """Where the check of the cheap form (bf16: dither and truncate; fp16:
    dither and the round-toward-zero conversion) passes, its result is the
    reference's; it fails on what the cheap form gets wrong (bf16 NaNs, fp16
    values outside its normal range), and passes on ordinary values."""
    g = torch.Generator().manual_seed(10)
    x = fp32_patterns(1 << 15, seed=11)
    x = x[: x.numel() // 2 * 2]
    words = torch.randint(-(2**31), 2**31, (x.numel() // 2,), dtype=torch.int64, generator=g).to(torch.int32)
    h, ok = _cheap(cpu_ext, code, x, words)
    want = _reference_pairs(x, dtype, words)
    assert torch.equal(h[ok], want[ok])
    assert (h[~ok] != want[~ok]).any()  # the check is needed: some cheap results are wrong
    pair_nan = x.isnan().reshape(-1, 2).any(dim=1)
    if dtype == torch.bfloat16:
        assert torch.equal(~ok, pair_nan)
    else:
        a = x.abs().reshape(-1, 2)
        assert not ok[((a < 2.0**-14) | (a > 65504) | a.isnan()).any(dim=1)].any()
    # ordinary values (fp16: inside its normal range) take the cheap form
    magnitude = torch.exp2(torch.rand(1 << 14, generator=g) * 26 - 12)  # 2^-12 .. 2^14
    y = torch.where(torch.rand(1 << 14, generator=g) < 0.5, -magnitude, magnitude)
    words = words[: y.numel() // 2]
    h, ok = _cheap(cpu_ext, code, y, words)
    assert ok.all() and torch.equal(h, _reference_pairs(y, dtype, words))


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
