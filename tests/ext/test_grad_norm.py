"""The host build of the gradient norm (csrc/grad_norm.h, csrc/host/grad_norm_host.cpp).

Its values against torch and float64 are checked with the ``cpu`` backend in
tests/optim/test_clip.py; here: the AVX2 and baseline loops give the same
bits, and bad launches are refused."""
from __future__ import annotations

import math

import pytest
import torch

from fastmup import ext
from fastmup.optim import clip as clipping
from fastmup.plan import norm as norm_plans

pytestmark = pytest.mark.skipif(not ext.available("cpu"), reason="the cpu extension cannot be built here")


def _norm(grads, norm_type, block=4096):
    plan = norm_plans.from_grads(grads, block)
    acc = torch.empty(1, dtype=torch.float64)
    result = torch.empty(2, dtype=torch.float32)
    norms = torch.zeros(len(grads))
    clipping.launch("cpu", plan, norm_type=norm_type, acc=acc, has_acc=False, result=result, max_norm=1.0, norms=norms)
    return acc.clone(), result.clone(), norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_isa_variants_agree(dtype, norm_type):
    module = ext.load("cpu")
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=g).to(dtype) for n in (1, 15, 17, 4096 * 3 + 5, 0, 100003)]
    try:
        module.set_isa("generic")
        generic = _norm(grads, norm_type)
    finally:
        module.set_isa("auto")
    auto = _norm(grads, norm_type)
    for a, b in zip(generic, auto):
        assert torch.equal(a, b)
    exact = torch.linalg.vector_norm(torch.cat([x.double() for x in grads]), norm_type)
    torch.testing.assert_close(auto[1][0], exact.float(), rtol=2.0**-23, atol=0)


def test_bad_launch_is_refused():
    module = ext.load("cpu")
    grads = [torch.ones(10)]
    plan = norm_plans.from_grads(grads, 4096)
    acc = torch.empty(1, dtype=torch.float64)
    args = dict(ntensors=1, nblocks=plan.nblocks, block=plan.block, tensor_of_block=0, start_of_block=0, numels=0,
                grad_ptrs=0, first_entry=0, counted=1, grad_dtype=0, norm=2, partials=plan.partials.data_ptr(),
                sums=plan.sums.data_ptr(), tickets=0, counter=0, acc=acc.data_ptr(), has_acc=0, result=0,
                max_norm=1.0, norms=0, norms_index=0, nthreads=1)
    with pytest.raises(ValueError, match="required table address is 0"):
        module.grad_norm(**args)
    good = dict(args, tensor_of_block=plan.tensor_of_block.data_ptr(), start_of_block=plan.start_of_block.data_ptr(),
                numels=plan.numels.data_ptr(), grad_ptrs=plan.grad_ptrs.data_ptr(), first_entry=plan.first_entry_host.ctypes.data)
    with pytest.raises(ValueError, match="unsupported norm code"):
        module.grad_norm(**dict(good, norm=7))
    with pytest.raises(ValueError, match="unsupported grad dtype"):
        module.grad_norm(**dict(good, grad_dtype=9))
    module.grad_norm(**good)
    assert acc.item() == 10.0
