"""fastmup.kernels.grad_norm and the deferred clip in the Triton update
kernels, under Triton's interpreter (see tests/optim/test_clip.py for the
tolerances: the fused norm is the float64 sum rounded once; the deferred
clip is bit-identical to the in-place clip followed by the step)."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import fastmup  # noqa: E402
from fastmup.kernels import _common, grad_norm as kernel  # noqa: E402
from fastmup.plan import norm as norm_plans  # noqa: E402
from tests.optim.test_clip import (  # noqa: E402
    DTYPES,
    NORM_TYPES,
    ULP,
    check_deferred,
    exact_norm,
    make_params,
    twin_params,
)

# sizes around the block and tile: empty, 1, a partial tile, a full block + 1, several blocks
SHAPES = [(0,), (1,), (kernel.TILE - 3,), (kernel.BLOCK + 1,), (3, kernel.BLOCK + 7), (0, 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_norm_against_float64(dtype, norm_type):
    params = make_params(SHAPES, dtype)
    grads = [p.grad.clone() for p in params]
    ref = twin_params(params)
    before = _common.LAUNCHES["grad_norm"]
    total = fastmup.clip_grad_norm_(params, 1.0, norm_type, backend="triton")
    assert _common.LAUNCHES["grad_norm"] - before == 1  # one launch for one dtype signature
    n32 = torch.tensor(float(exact_norm(grads, norm_type)), dtype=torch.float32)
    torch.testing.assert_close(total.float(), n32.to(dtype).float(), rtol=ULP[dtype], atol=0)
    coef = torch.clamp((n32 + 1e-6).reciprocal() * 1.0, max=1.0)
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, (g.float() * coef).to(dtype))
    torch_ref = [q for q in ref if q.numel() or norm_type != math.inf]
    expected = torch.nn.utils.clip_grad_norm_(torch_ref, 1.0, norm_type)
    torch.testing.assert_close(total.float(), expected.float(), rtol=2 * ULP[dtype] if dtype != torch.float32 else 1e-4, atol=0)


def test_per_tensor_sums_and_chain():
    """The launch's per-tensor sums, the running total over two launches, and
    tickets left at zero for the next launch (a replayed graph)."""
    a = [p.grad for p in make_params([(5,), (kernel.BLOCK * 2 + 5,), (0,)], torch.float32)]
    b = [p.grad for p in make_params([(9, 9)], torch.bfloat16, seed=3)]
    pa, pb = norm_plans.from_grads(a, kernel.BLOCK), norm_plans.from_grads(b, kernel.BLOCK)
    acc = torch.empty(1, dtype=torch.float64)
    result = torch.empty(2, dtype=torch.float32)
    norms = torch.full((3,), -1.0)
    for _ in range(2):
        kernel.launch(pa, norm_type=2.0, acc=acc, has_acc=False, norms=norms)
        sums = [float(g.double().pow(2).sum()) for g in a]
        torch.testing.assert_close(pa.sums[:2], torch.tensor(sums[:2], dtype=torch.float64), rtol=1e-12, atol=0)
        torch.testing.assert_close(norms[:2], torch.tensor(sums[:2]).sqrt().float(), rtol=2.0**-23, atol=0)
        assert norms[2] == -1.0  # an empty tensor has no program: nothing written
        kernel.launch(pb, norm_type=2.0, acc=acc, has_acc=True, result=result, max_norm=2.0)
        exact = exact_norm(a + b, 2.0)
        torch.testing.assert_close(result[0], exact.float(), rtol=2.0**-23, atol=0)
        assert torch.equal(result[1], torch.clamp((result[0] + 1e-6).reciprocal() * 2.0, max=1.0))
        for plan in (pa, pb):
            assert not plan.tickets.any() and not plan.counter.any()


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_nonfinite(bad, norm_type):
    params = make_params([(kernel.BLOCK + 3,), (7,)], torch.float32)
    params[0].grad[kernel.BLOCK + 1] = bad
    ref = twin_params(params)
    total = fastmup.clip_grad_norm_(params, 1.0, norm_type, backend="triton")
    expected = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type)
    torch.testing.assert_close(total, expected, equal_nan=True)
    for p, q in zip(params, ref):
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_deferred_is_bit_identical(name, dtype):
    check_deferred("triton", name, dtype, 2.0, SHAPES, steps=2)


@pytest.mark.parametrize("norm_type", [1.0, math.inf])
def test_deferred_other_norms_and_fp32_state(norm_type):
    check_deferred("triton", "adamw", torch.bfloat16, norm_type, SHAPES, steps=1, state_dtype=torch.float32)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_deferred_esgd():
    from tests.optim.test_clip import test_deferred_esgd as run

    run("triton")


def test_deferred_with_fused_unscale():
    from tests.optim.test_clip import test_grad_scaler as run

    run("triton", True)
