"""Gradient clipping: ``fastmup.clip_grad_norm_`` against torch's, and the
optimizers' deferred clipping against clipping in place and then stepping.

Tolerances.  fastmup sums in float64 and rounds the norm once to float32:
against a float64 reference that is within one fp32 rounding (rtol 2**-23).
torch accumulates fp32 norms in fp32 (about 1e-5 relative over 2^20 terms: rtol 1e-4)
and, for 16-bit gradients, rounds each per-tensor norm, the total and the
coefficient to the gradients' dtype (2 ulps of that dtype).  The deferred
path has no tolerance: the update kernels read ``round(g · coef)``, the
value the in-place multiply stores, so parameters and state are compared
with ``torch.equal``.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastmup
from fastmup.optim import MuAdam, MuAdamW, MuESGD, MuSGD, clip as clipping
from fastmup.infshape import InfDim, InfShape

from .conftest import available_backends, build, clone, loss_of

NORM_TYPES = (2.0, 1.0, math.inf)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
MANT = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def make_params(shapes, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = nn.Parameter(torch.randn(s, generator=g).to(dtype))
        p.grad = (torch.randn(s, generator=g) * scale).to(dtype)
        p.infshape = InfShape([InfDim(None, d) for d in p.shape])
        params.append(p)
    return params


def twin_params(params):
    out = []
    for p in params:
        q = nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        q.infshape = p.infshape
        out.append(q)
    return out


def exact_norm(grads, norm_type):
    flat = torch.cat([g.detach().double().reshape(-1) for g in grads])
    return torch.linalg.vector_norm(flat, norm_type)


SHAPES = {
    "mixed": [(3, 5), (0,), (4097,), (1,), (64, 65), (0, 3)],
    "many-tiny": [(3,)] * 300 + [(1,)] * 200,
    "one-large": [(1 << 20) + 3],
}


# ----------------------------------------------------------------------
# fastmup.clip_grad_norm_ against torch's
# ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("shapes", sorted(SHAPES))
def test_matches_torch(backend, dtype, norm_type, shapes):
    params = make_params(SHAPES[shapes], dtype)
    ref = twin_params(params)
    grads = [p.grad.clone() for p in params]
    exact = exact_norm(grads, norm_type)
    total = fastmup.clip_grad_norm_(params, 1.0, norm_type, backend=backend)
    # torch cannot take the inf norm of an empty gradient; fastmup leaves it out of the max
    torch_ref = [q for q in ref if q.numel() or norm_type != math.inf]
    expected = torch.nn.utils.clip_grad_norm_(torch_ref, 1.0, norm_type)
    assert total.dtype == expected.dtype == dtype and total.device == expected.device and total.dim() == 0
    if backend != "eager":
        # one fp32 rounding of the float64 sum, then the result dtype's
        n32 = torch.tensor(float(exact), dtype=torch.float32)
        torch.testing.assert_close(total.float(), n32.to(dtype).float(), rtol=ULP[dtype], atol=0)
        # the gradients hold round(g * coef) with the coefficient of the fp32 norm
        coef = torch.clamp((n32 + 1e-6).reciprocal() * 1.0, max=1.0)
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, (g.float() * coef).to(dtype))
    if float(exact) > torch.finfo(dtype).max:
        # torch's 16-bit norm overflows: it returns inf and zeroes the gradients
        # (coefficient max_norm / inf); fastmup returns inf too (the norm in the
        # gradients' dtype) but clips with the float32 norm's coefficient
        assert math.isinf(float(total)) and math.isinf(float(expected))
        return
    # torch's fp32 accumulation: ~1e-5 relative over 2^20 terms (ours is checked exactly above)
    tol = dict(rtol=2 * ULP[dtype] if dtype != torch.float32 else 1e-4, atol=0)
    torch.testing.assert_close(total.float(), expected.float(), **tol)
    for p, q in zip(params, ref):
        # relative to the dtype's precision; clipped to subnormals, 2 of its smallest steps
        tiny = 2 * torch.finfo(dtype).smallest_normal * 2.0 ** -MANT[dtype]
        torch.testing.assert_close(p.grad.float(), q.grad.float(), rtol=tol["rtol"], atol=tiny)


@pytest.mark.parametrize("backend", available_backends())
def test_mixed_dtypes_and_small_norms(backend):
    """Several dtype signatures (one launch each, chained); a norm below
    max_norm leaves the gradients as they are (coefficient 1)."""
    params = make_params([(10,), (33,)], torch.float32, scale=1e-3) + make_params([(7, 9)], torch.bfloat16, seed=1, scale=1e-3)
    ref = twin_params(params)
    total = fastmup.clip_grad_norm_(params, 5.0, backend=backend)
    expected = torch.nn.utils.clip_grad_norm_(ref, 5.0)
    assert total.dtype == torch.float32
    if backend != "eager":  # eager is torch's function
        exact = exact_norm([q.grad for q in ref], 2.0)
        torch.testing.assert_close(total, exact.float(), rtol=2.0**-23, atol=0)
    # torch rounds the bf16 tensor's norm to bf16 before combining (2^-8 relative)
    torch.testing.assert_close(total, expected, rtol=2.0**-8, atol=0)
    for p, q in zip(params, ref):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_nonfinite_like_torch(backend, norm_type, bad):
    params = make_params([(5,), (300,)], torch.float32)
    params[1].grad[17] = bad
    ref = twin_params(params)
    before = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="is non-finite, so it cannot be clipped"):
        fastmup.clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True, backend=backend)
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b, equal_nan=True) if hasattr(torch, "equal_nan") else torch.allclose(p.grad, b, equal_nan=True)
    total = fastmup.clip_grad_norm_(params, 1.0, norm_type, backend=backend)
    expected = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type)
    torch.testing.assert_close(total, expected, equal_nan=True)
    for p, q in zip(params, ref):
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True)


def test_no_gradients_and_other_norm_types():
    p = nn.Parameter(torch.ones(3))
    assert torch.equal(fastmup.clip_grad_norm_([p], 1.0), torch.tensor(0.0))
    assert torch.equal(fastmup.clip_grad_norm_(p, 1.0), torch.tensor(0.0))  # a single tensor
    params = make_params([(4,), (6,)], torch.float32)
    ref = twin_params(params)
    for norm_type in (3.0, 0.5):  # not fused: torch's function
        torch.testing.assert_close(fastmup.clip_grad_norm_(params, 1.0, norm_type), torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type))
    with pytest.raises(ValueError, match="backend="):
        fastmup.clip_grad_norm_(params, 1.0, backend="nope")


def test_float64_goes_to_torch():
    params = make_params([(4,), (6,)], torch.float64)
    ref = twin_params(params)
    torch.testing.assert_close(fastmup.clip_grad_norm_(params, 1.0), torch.nn.utils.clip_grad_norm_(ref, 1.0))
    if "cpu" in available_backends():
        with pytest.raises(RuntimeError, match="backend 'cpu' takes dense contiguous"):
            fastmup.clip_grad_norm_(params, 1.0, backend="cpu")


# ----------------------------------------------------------------------
# deferred clipping: bit-identical to clipping in place, then stepping
# ----------------------------------------------------------------------
def make_optimizer(name, params, backend, **kw):
    if name == "adamw":
        return MuAdamW(params, lr=1e-2, weight_decay=0.1, backend=backend, **kw)
    if name == "adam":
        return MuAdam(params, lr=1e-2, weight_decay=1e-3, amsgrad=True, backend=backend, **kw)
    if name == "sgd":
        return MuSGD(params, lr=0.1, momentum=0.9, nesterov=True, backend=backend, **kw)
    raise ValueError(name)


def assert_same_state(a_params, b_params, a_opt, b_opt):
    for p, q in zip(a_params, b_params):
        assert torch.equal(p, q)
        for key, v in a_opt.state[p].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, b_opt.state[q][key]), key


def check_deferred(backend, name, dtype, norm_type, shapes, steps=3, max_norm=1.0, **kw):
    """``opt.clip_grad_norm_`` + step against ``fastmup.clip_grad_norm_``
    (same backend) + step: same norms, bit-identical params and state."""
    deferred = make_params(shapes, dtype)
    inplace = twin_params(deferred)
    opt = make_optimizer(name, deferred, backend, **kw)
    ref = make_optimizer(name, inplace, backend, **kw)
    g = torch.Generator().manual_seed(5)
    for step in range(steps):
        for p, q in zip(deferred, inplace):
            grad = (torch.randn(p.shape, generator=g) * 2.0).to(dtype)
            p.grad, q.grad = grad.clone(), grad.clone()
        n_deferred = opt.clip_grad_norm_(max_norm, norm_type)
        n_inplace = fastmup.clip_grad_norm_(inplace, max_norm, norm_type, backend=backend)
        assert torch.equal(n_deferred, n_inplace), (step, n_deferred, n_inplace)
        # the gradients themselves are left alone
        assert not any(torch.equal(p.grad, q.grad) for p, q in zip(deferred, inplace) if p.numel() and float(n_inplace) > max_norm)
        opt.step()
        ref.step()
        assert_same_state(deferred, inplace, opt, ref)
    return deferred, opt


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_deferred_is_bit_identical(backend, name, dtype, norm_type):
    check_deferred(backend, name, dtype, norm_type, SHAPES["mixed"])


@pytest.mark.parametrize("backend", available_backends())
def test_deferred_many_tiny_and_one_large(backend):
    check_deferred(backend, "adamw", torch.float32, 2.0, SHAPES["many-tiny"], steps=2)
    check_deferred(backend, "adamw", torch.bfloat16, 2.0, SHAPES["one-large"], steps=1)


@pytest.mark.parametrize("backend", available_backends())
def test_deferred_fp32_state_of_16bit_params(backend):
    check_deferred(backend, "adamw", torch.bfloat16, 2.0, SHAPES["mixed"], state_dtype=torch.float32)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("backend", available_backends())
def test_deferred_esgd(backend):
    """MuESGD: the coefficient scales the gradient, not the HVP (autograd's)."""
    kinds = []
    for deferred in (True, False):
        model = build("mlp", 16)
        opt = MuESGD(model.parameters(), lr=1e-2, update_d_every=2, d_warmup=2, backend=backend)
        torch.manual_seed(3)
        for _ in range(4):
            opt.zero_grad()
            x = torch.randn(8, 12)
            y = torch.randint(0, 5, (8,))
            loss_of("mlp", model, (x, y)).backward(create_graph=opt.should_create_graph())
            if deferred:
                opt.clip_grad_norm_(0.05)
            else:
                fastmup.clip_grad_norm_(model.parameters(), 0.05, backend=backend)
            opt.step()
        kinds.append(model)
    for p, q in zip(kinds[0].parameters(), kinds[1].parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", available_backends())
def test_deferred_against_torch_clip_and_multipliers(backend):
    """Groups with different μP multipliers: the norm is the raw gradients'
    (torch's), and the training run follows torch's clip + the same step."""
    model = build("transformer", 32)
    twin = clone(model)
    groups = lambda m: [  # noqa: E731
        dict(params=[p for n, p in m.named_parameters() if "weight" in n], lr=1e-2),
        dict(params=[p for n, p in m.named_parameters() if "weight" not in n], lr=3e-2, weight_decay=0.0),
    ]
    opt = MuAdamW(groups(model), backend=backend)
    ref = MuAdamW(groups(twin), backend=backend)
    torch.manual_seed(0)
    for _ in range(3):
        batch = (torch.randint(0, 17, (4, 7)), torch.randint(0, 17, (4, 7)))
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            loss_of("transformer", m, batch).backward()
        n = opt.clip_grad_norm_(0.5)
        expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
        torch.testing.assert_close(n, expected, rtol=1e-5, atol=0)
        opt.step()
        ref.step()
    torch.testing.assert_close(list(model.parameters()), list(twin.parameters()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", available_backends())
def test_gradient_accumulation(backend):
    model, twin = build("mlp", 16), None
    twin = clone(model)
    opt = MuAdamW(model.parameters(), lr=1e-2, backend=backend)
    ref = MuAdamW(twin.parameters(), lr=1e-2, backend=backend)
    torch.manual_seed(1)
    for _ in range(2):
        micro = [(torch.randn(8, 12), torch.randint(0, 5, (8,))) for _ in range(3)]
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            for b in micro:
                (loss_of("mlp", m, b) / len(micro)).backward()
        opt.clip_grad_norm_(0.1)
        fastmup.clip_grad_norm_(twin.parameters(), 0.1, backend=backend)
        opt.step()
        ref.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("fused_unscale", [False, True])
def test_grad_scaler(backend, fused_unscale):
    """AMP: ``scaler.unscale_(opt)`` then the clip (torch's recipe), or the
    unscaling fused into the step (the scaler passed to the clip); both
    bit-identical to unscale_ + in-place clip + step.  An inf step is
    skipped and consumes the coefficient."""
    model = build("mlp", 16)
    twin = clone(model)
    opt = MuAdamW(model.parameters(), lr=1e-2, backend=backend)
    ref = MuAdamW(twin.parameters(), lr=1e-2, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    torch.manual_seed(2)
    for step in range(4):
        batch = (torch.randn(8, 12), torch.randint(0, 5, (8,)))
        opt.zero_grad()
        ref.zero_grad()
        scaler.scale(loss_of("mlp", model, batch)).backward()
        ref_scaler.scale(loss_of("mlp", twin, batch)).backward()
        if step == 2:
            model.hidden.weight.grad[0, 0] = math.inf
            twin.hidden.weight.grad[0, 0] = math.inf
        if fused_unscale:
            n = opt.clip_grad_norm_(0.05, grad_scaler=scaler)
        else:
            scaler.unscale_(opt)
            n = opt.clip_grad_norm_(0.05)
        ref_scaler.unscale_(ref)
        expected = fastmup.clip_grad_norm_(twin.parameters(), 0.05, backend=backend)
        if step == 2:
            assert math.isinf(float(n)) and math.isinf(float(expected))
        else:
            assert torch.equal(n, expected)
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        ref_scaler.step(ref)
        scaler.update()
        ref_scaler.update()
        if step == 2:
            assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q), step


@pytest.mark.parametrize("backend", available_backends())
def test_per_tensor_norms(backend):
    params = make_params(SHAPES["mixed"], torch.float32)
    params.append(nn.Parameter(torch.ones(4)))  # no gradient
    params[-1].infshape = InfShape([InfDim(None, 4)])
    opt = MuAdamW(params, lr=1e-2, backend=backend)
    total = opt.clip_grad_norm_(1.0, per_tensor=True)
    norms = opt.per_tensor_grad_norms
    assert norms.shape == (len(params),) and norms.dtype == torch.float32
    expected = torch.stack([torch.linalg.vector_norm(p.grad.double()).float() if p.grad is not None else torch.tensor(0.0) for p in params])
    torch.testing.assert_close(norms, expected, rtol=2.0**-23, atol=0)
    torch.testing.assert_close(torch.linalg.vector_norm(norms.double()).float(), total, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", available_backends())
def test_stale_coefficient_is_dropped(backend):
    """A coefficient belongs to the gradients it was computed from."""
    a = make_params([(50,)], torch.float32)
    b = twin_params(a)
    opt = make_optimizer("adamw", a, backend)
    ref = make_optimizer("adamw", b, backend)
    opt.clip_grad_norm_(1e-3)
    opt.zero_grad()  # drops it
    a[0].grad = b[0].grad = None
    a[0].grad = torch.ones(50)
    b[0].grad = torch.ones(50)
    opt.step()
    ref.step()
    assert torch.equal(a[0], b[0])
    # gradients replaced without zero_grad: dropped, with a warning
    opt.clip_grad_norm_(1e-3)
    a[0].grad = torch.ones(50)
    b[0].grad = torch.ones(50)
    with pytest.warns(RuntimeWarning, match="changed between clip_grad_norm_"):
        opt.step()
    ref.step()
    assert torch.equal(a[0], b[0])


def test_error_if_nonfinite_defers_nothing():
    a = make_params([(50,)], torch.float32)
    a[0].grad[3] = math.nan
    opt = make_optimizer("sgd", a, "eager")
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.clip_grad_norm_(1.0, error_if_nonfinite=True)
    assert opt._pending_clip is None


def test_state_dict_and_pickle_ignore_the_pending_coefficient():
    import pickle

    a = make_params([(5,)], torch.float32)
    opt = make_optimizer("adamw", a, "eager")
    opt.clip_grad_norm_(1.0)
    assert "_pending_clip" not in opt.__getstate__()
    opt2 = pickle.loads(pickle.dumps(opt))
    assert opt2._pending_clip is None


def test_non_fused_norm_type_and_foreach_false():
    for kw in (dict(norm_type=3.0), dict(foreach=False)):
        a = make_params([(5,), (7,)], torch.float32)
        b = twin_params(a)
        opt = make_optimizer("adamw", a, "eager")
        ref = make_optimizer("adamw", b, "eager")
        n = opt.clip_grad_norm_(0.5, **kw)
        expected = torch.nn.utils.clip_grad_norm_(b, 0.5, **kw)
        torch.testing.assert_close(n, expected)
        opt.step()
        ref.step()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:fastmup. backend='auto' steps some tensors")
@pytest.mark.skipif("cpu" not in available_backends(), reason="needs a fused backend beside eager")
def test_deferred_mixed_eager_and_fused_batches():
    """backend='auto' with a float64 tensor (an eager batch) beside fused
    ones: the eager batch's sum joins the fused chain; a tensor without a
    gradient on some step adds nothing (the buffers hold no stale total)."""
    a = make_params([(5,), (40,)], torch.float32) + make_params([(7,)], torch.float64, seed=2)
    b = twin_params(a)
    opt = MuAdamW(a, lr=1e-2, backend="auto")
    ref = MuAdamW(b, lr=1e-2, backend="auto")
    assert opt.backend == "cpu"
    g = torch.Generator().manual_seed(9)
    for step in range(4):
        for p, q in zip(a, b):
            p.grad = (torch.randn(p.shape, generator=g) * 2).to(p.dtype)
            q.grad = p.grad.clone()
        if step == 2:  # fused tensors without gradients: the eager one alone
            a[0].grad = a[1].grad = b[0].grad = b[1].grad = None
        if step == 3:  # the eager one without a gradient
            a[2].grad = b[2].grad = None
        n = opt.clip_grad_norm_(0.5, per_tensor=True)
        expected = torch.nn.utils.clip_grad_norm_(b, 0.5)
        torch.testing.assert_close(n, expected.to(n.dtype), rtol=1e-6, atol=0)
        want = torch.stack([torch.linalg.vector_norm(p.grad.double()).float() if p.grad is not None else torch.tensor(0.0) for p in a])
        torch.testing.assert_close(opt.per_tensor_grad_norms, want, rtol=2.0**-23, atol=0)
        opt.step()
        ref.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
