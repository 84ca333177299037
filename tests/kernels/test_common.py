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
