"""fastmup.kernels._common: AMP's unscaling, bit for bit torch's division."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastmup.kernels import _common  # noqa: E402

from .conftest import DEVICE  # noqa: E402


@triton.jit
def _unscale_kernel(g_ptr, scale_ptr, out_ptr, exact_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask)
    scale = tl.load(scale_ptr)
    inv_scale, exact = _common.scale_reciprocal(scale)
    tl.store(exact_ptr, exact.to(tl.int32))
    if exact:
        tl.store(out_ptr + offs, _common.unscale(g, scale, inv_scale, True), mask=mask)
    else:
        tl.store(out_ptr + offs, _common.unscale(g, scale, inv_scale, False), mask=mask)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on purpose (inf, nan)
@pytest.mark.parametrize(
    "scale, exact",
    [(65536.0, True), (2.0**-126, True), (2.0**127, True), (-0.5, True), (1.0, True),
     (2.0**-127, False), (3.0, False), (1000.0, False), (0.1, False), (float("inf"), False)],
)
def test_unscale_is_torchs_division(scale, exact):
    """g / scale, bit for bit, for any grads (subnormal results, overflow,
    inf, nan, signed zeros); by the exact reciprocal only for powers of two
    whose reciprocal is an fp32 number."""
    gen = torch.Generator().manual_seed(0)
    g = torch.cat([
        torch.randn(2048, generator=gen) * 1e3,
        torch.randint(-(2**31), 2**31 - 1, (4096,), generator=gen, dtype=torch.int32).view(torch.float32),  # any bits
        torch.tensor([0.0, -0.0, 1e-45, -3e-39, 3.4e38, float("inf"), -float("inf"), float("nan")]),
    ]).to(DEVICE)
    s = torch.tensor([scale], dtype=torch.float32, device=DEVICE)
    out = torch.empty_like(g)
    flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    _unscale_kernel[(triton.cdiv(g.numel(), 1024),)](g, s, out, flag, g.numel(), BLOCK=1024)
    assert bool(flag.item()) == exact
    want = g / s
    same = (out.view(torch.int32) == want.view(torch.int32)) | (out.isnan() & want.isnan())
    assert same.all(), f"{int((~same).sum())} of {g.numel()} differ"


@triton.jit
def _divide_kernel(x_ptr, s_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, _common.divide(tl.load(x_ptr + offs, mask=mask), tl.load(s_ptr)), mask=mask)


def _quotient_ties(s: float) -> torch.Tensor:
    """fp32 ``x`` whose ``x / s`` is exactly halfway between two fp32
    subnormals, ``(2k+1)·2^-150`` (``s = odd·2^t``; empty where no such ``x``
    is an fp32 number)."""
    m, t = torch.frexp(torch.tensor([abs(s)], dtype=torch.float64))
    odd, t = int(m.item() * 2**53), int(t.item()) - 53
    while odd % 2 == 0:
        odd, t = odd // 2, t + 1
    k = torch.arange(0, 4096, dtype=torch.float64) * 2 + 1
    x = k * odd * 2.0 ** (t - 150)
    x = x[(x / abs(s) < 2.0**-126) & (x.to(torch.float32).double() == x)]
    return torch.cat([x, -x]).to(torch.float32)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize(
    "scale",
    [3.0, 1000.0, 0.1, 65535.0, 1.5, 3.0 * 2**20, 49.0 * 2**10, 91.0 * 2**30, 255.0 * 2**40, 7.0 * 2**100, 2.0**-127 * 3,
     3.0e38, 1.1e-38,
     -6.0, 0.0, -0.0, float("inf"), -float("inf")],
)
def test_divide_rounds_as_ieee_division(scale):
    """The fp64 route of ``g / scale`` against torch's fp32 division, bit for
    bit: fp32 values of every class, every bf16 and fp16 value, and the
    quotients that are exact ties between two fp32 subnormals (where the
    fp64 product alone would round to either side)."""
    from tests.fp32_patterns import fp32_patterns

    every16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = torch.cat([
        fp32_patterns(1 << 14), every16.view(torch.bfloat16).float(), every16.view(torch.float16).float(),
        _quotient_ties(scale) if 0 < abs(scale) < float("inf") else torch.empty(0),
    ])
    ties = _quotient_ties(scale).numel() if 0 < abs(scale) < float("inf") else 0
    if scale in (49.0 * 2**10, 91.0 * 2**30):
        # ties the fp64 product alone rounds to the wrong side for about a third of (the correction's case)
        assert ties > 1000
    s = torch.tensor([scale], dtype=torch.float32)
    out = torch.empty_like(x)
    _divide_kernel[(triton.cdiv(x.numel(), 16384),)](x.to(DEVICE), s.to(DEVICE), out.to(DEVICE), x.numel(), BLOCK=16384)
    want = x / s
    same = (out.view(torch.int32) == want.view(torch.int32)) | (out.isnan() & want.isnan())
    assert same.all(), f"{int((~same).sum())} of {x.numel()} differ, e.g. {x[~same][:4].tolist()}"


@pytest.mark.parametrize("algorithm", ["adam", "sgd", "esgd"])
def test_each_kernel_reads_its_specs_layout(algorithm):
    """A kernel takes one ``COL_<NAME>`` constexpr per column of its
    algorithm's spec, in the spec's order, and reads the pointer rows of the
    spec's buffers: a column or buffer added on one side only fails here."""
    import importlib
    import inspect

    kernel = importlib.import_module(f"fastmup.kernels.{algorithm}")
    spec = importlib.import_module(f"fastmup.optim.{algorithm}").SPEC
    assert spec.kernel == algorithm
    jit = getattr(kernel, f"{algorithm}_kernel")
    params = inspect.signature(jit.fn).parameters
    assert [n for n in params if n.startswith("COL_")] == ["COL_" + c.upper() for c in spec.columns]
    assert kernel.ROLES == ("param", "grad") + spec.buffers
