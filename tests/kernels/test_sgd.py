"""fastmup.kernels.sgd: MuSGD with backend="triton" against the eager reference."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from fastmup.kernels import sgd as kernel  # noqa: E402
from fastmup.optim import MuSGD  # noqa: E402

from .conftest import (  # noqa: E402
    DEVICE,
    MAX_EXAMPLES,
    STEPS,
    assert_fp32_close,
    assert_within_one_rounding,
    build_optimizer,
    compare_optimizers,
    draw_assignment,
    draw_dtypes,
    draw_extras,
    expected_launches,
    launches,
    make_params,
    set_grads,
    sync,
    tensor_specs,
    twin,
)

KEYS = ("momentum_buffer",)
BLOCK, TILE = kernel.BLOCK, kernel.TILE


# ----------------------------------------------------------------------
# random tensor sets, groups and dtypes against eager
# ----------------------------------------------------------------------
@st.composite
def sgd_group(draw) -> dict:
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))  # 0: no buffer for that group
    nesterov = momentum > 0 and draw(st.booleans())
    return dict(
        lr=draw(st.sampled_from([1e-3, 1e-2, 0.1])),
        momentum=momentum,
        dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.1, 0.5])),
        nesterov=nesterov,
        weight_decay=draw(st.sampled_from([0.0, 0.01, 0.1])),
        maximize=draw(st.booleans()),
        decoupled_wd=draw(st.booleans()),
    )


@st.composite
def sgd_cases(draw):
    specs = draw(tensor_specs(BLOCK, TILE))
    n = len(specs)
    dtypes, state_dtype = draw_dtypes(draw, n)
    ngroups, assign = draw_assignment(draw, n)
    groups = [draw(sgd_group()) for _ in range(ngroups)]
    return dict(specs=specs, dtypes=dtypes, state_dtype=state_dtype, groups=groups, assign=assign, **draw_extras(draw, n))


@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=sgd_cases())
def test_matches_eager(case):
    """STEPS steps (the first seeds the buffers with g), each one launch per
    dtype signature, each compared with eager (params, buffers, step counts)
    and then synchronised, so every comparison is one step deep."""
    fused_params = make_params(case["specs"], case["dtypes"], seed=case["seed"])
    eager_params = twin(fused_params)
    fused = build_optimizer(MuSGD, fused_params, case, "triton")
    eager = build_optimizer(MuSGD, eager_params, case, "eager")
    for step in range(STEPS):
        set_grads([fused_params, eager_params], seed=case["seed"] + step, scales=case["grad_scales"], missing=case["missing"][step])
        before = launches("sgd")
        fused.step()
        eager.step()
        assert launches("sgd") - before == expected_launches(fused_params)
        compare_optimizers(fused, eager, fused_params, eager_params, KEYS)
        sync(fused, eager, fused_params, eager_params)


SPECS = [((BLOCK + 1,), [None]), ((33, 65), [8, 16]), ((TILE - 1,), [100]), ((1,), [None])]


def test_first_step_seeds_the_buffer_with_the_gradient():
    """torch's rule: b = g on the first step, not (1 - dampening)·g."""
    params = make_params(SPECS, [torch.float32] * len(SPECS), seed=1)
    opt = MuSGD(params, lr=0.1, momentum=0.9, dampening=0.5, backend="triton")
    set_grads([params], seed=2)
    opt.step()
    for p in params:
        assert torch.equal(opt.state[p]["momentum_buffer"], p.grad)


@pytest.mark.parametrize("dtype,state_dtype", [(torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, torch.float32)])
def test_low_precision_is_one_rounding_of_fp32(dtype, state_dtype):
    """Two steps (seed, then a momentum step) from the same start, state
    copied between steps: each bf16/fp16 result is the fp32 one rounded once."""
    params = make_params(SPECS, [dtype] * len(SPECS), seed=3)
    ref_params = twin(params, torch.float32)
    kw = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.1)
    fused = MuSGD(params, backend="triton", state_dtype=state_dtype, **kw)
    ref = MuSGD(ref_params, backend="eager", **kw)
    for step in range(2):
        set_grads([params], seed=step)
        with torch.no_grad():
            for p, q in zip(params, ref_params):
                q.copy_(p)  # restart the fp32 reference from the rounded values
                q.grad = p.grad.float()
                if step:
                    ref.state[q]["momentum_buffer"].copy_(fused.state[p]["momentum_buffer"])
        fused.step()
        ref.step()
        for i, (p, q) in enumerate(zip(params, ref_params)):
            assert_within_one_rounding(p.detach(), q.detach(), f"step {step} param {i}")
            buf, want = fused.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"]
            if buf.dtype == torch.float32:
                assert_fp32_close(buf, want, f"step {step} buffer {i}")
            else:
                assert_within_one_rounding(buf, want, f"step {step} buffer {i}")


# ----------------------------------------------------------------------
# AMP, missing grads, launches
# ----------------------------------------------------------------------
def _pair(specs=SPECS, dtype=torch.float32, **kw):
    params = make_params(specs, [dtype] * len(specs), seed=5)
    eager_params = twin(params)
    return params, eager_params, MuSGD(params, backend="triton", **kw), MuSGD(eager_params, backend="eager", **kw)


def test_grad_scale_and_found_inf():
    params, eager_params, fused, eager = _pair(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.1)
    scale = torch.tensor([512.0], device=DEVICE)
    for step in range(STEPS):
        set_grads([params, eager_params], seed=step, scales=[512.0] * len(params))
        fused.grad_scale = eager.grad_scale = scale
        fused.step()
        eager.step()
    compare_optimizers(fused, eager, params, eager_params, KEYS)
    values = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in fused.state[p].items()} for p in params]
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    fused.found_inf = torch.tensor([1.0], device=DEVICE)
    fused.step()
    for p, v, s in zip(params, values, state):
        assert torch.equal(p, v)
        for k in s:
            assert torch.equal(fused.state[p][k], s[k]), k  # buffers and step untouched


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("scale", [3.0, 1000.0, 1024.0])
def test_any_grad_scale_matches_eager(scale, maximize):
    """A grad_scale that is not a power of two takes the kernel's dividing
    pass: the first step's momentum buffer is g / scale, bit for bit (a
    multiplication by the rounded reciprocal would be an ulp off here and
    there), and the steps after it are eager's; under maximize (whose sign
    the kernel folds into the scale) too, and for a power of two."""
    params, eager_params, fused, eager = _pair(lr=0.01, momentum=0.9, maximize=maximize)
    for step in range(STEPS):
        set_grads([params, eager_params], seed=step, scales=[scale] * len(params))
        fused.grad_scale = eager.grad_scale = torch.tensor([scale], device=DEVICE)
        fused.step()
        eager.step()
        if step == 0:
            for p, q in zip(params, eager_params):
                assert torch.equal(fused.state[p]["momentum_buffer"], eager.state[q]["momentum_buffer"])
                if scale != 1024.0:  # the case is not trivial
                    assert not torch.equal(q.grad / scale, q.grad * (1 / torch.tensor(scale)))
    compare_optimizers(fused, eager, params, eager_params, KEYS)


def test_groups_with_and_without_momentum_are_one_launch():
    """Momentum 0 (no buffer: pointer 0), plain, dampened and nesterov
    momentum, maximize and μP multipliers: one launch, eager's results."""
    specs = [((33, 65), [8, 16]), ((65,), [16]), ((5,), [None]), ((BLOCK + 1,), [1024]), ((TILE + 1,), [None]), ((0,), [None])]
    params = make_params(specs, [torch.float32] * len(specs), seed=8)
    eager_params = twin(params)

    def groups(ps):
        return [
            dict(params=ps[0:2], lr=0.05),
            dict(params=ps[2:3], lr=0.02, momentum=0.9, dampening=0.3, weight_decay=0.1),
            dict(params=ps[3:4], lr=0.01, momentum=0.9, nesterov=True, maximize=True),
            dict(params=ps[4:], lr=0.03, momentum=0.5, weight_decay=0.01, decoupled_wd=True),
        ]

    fused = MuSGD(groups(params), backend="triton")
    eager = MuSGD(groups(eager_params), backend="eager")
    for step in range(STEPS):
        set_grads([params, eager_params], seed=step)
        before = launches("sgd")
        fused.step()
        eager.step()
        assert launches("sgd") - before == 1
    assert "momentum_buffer" not in fused.state[params[0]]
    compare_optimizers(fused, eager, params, eager_params, KEYS)


def test_mixed_precision_is_two_launches_and_skips_params_without_grad():
    specs = [((33, 65), [8, 16]), ((65,), [16]), ((7,), [None]), ((0,), [None])]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]
    params = make_params(specs, dtypes, seed=9)
    eager_params = twin(params)
    fused = MuSGD(params, lr=0.05, momentum=0.9, backend="triton")
    eager = MuSGD(eager_params, lr=0.05, momentum=0.9, backend="eager")
    frozen = params[2].detach().clone()
    for step in range(STEPS):
        set_grads([params, eager_params], seed=step, missing={2})
        before = launches("sgd")
        fused.step()
        eager.step()
        assert launches("sgd") - before == 2
    assert torch.equal(params[2], frozen) and params[2] not in fused.state
    compare_optimizers(fused, eager, params, eager_params, KEYS)


# ----------------------------------------------------------------------
# state_dict interoperability
# ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1), dict(lr=0.05, momentum=0.5, dampening=0.2, maximize=True)],
    ids=str,
)
def test_state_dict_round_trip_with_eager_and_torch(kw):
    """triton -> eager fastmup and torch.optim.SGD, and a buffer seeded by
    torch.optim.SGD -> triton, each continuing like its source (width == base)."""
    specs = [((17, 65), [None, None]), ((BLOCK + 1,), [None]), ((3,), [None])]
    params = make_params(specs, [torch.float32] * 3, seed=7)
    fused = MuSGD(params, backend="triton", **kw)
    theirs_params = twin(params)
    theirs = torch.optim.SGD(theirs_params, **kw)
    for step in range(2):
        set_grads([params, theirs_params], seed=step)
        fused.step()
        theirs.step()
    compare_optimizers(fused, theirs, params, theirs_params, KEYS, check_step=False)
    saved = copy.deepcopy(fused.state_dict())  # as torch.save / torch.load would
    copies = {name: twin(params) for name in ("eager", "torch")}
    others = {"eager": MuSGD(copies["eager"], backend="eager", **kw), "torch": torch.optim.SGD(copies["torch"], **kw)}
    for opt in others.values():
        opt.load_state_dict(copy.deepcopy(saved))
    # torch.optim.SGD's own state (no step count) continues under triton: the
    # buffer counts as seeded.
    back_params = twin(theirs_params)
    back = MuSGD(back_params, backend="triton", **kw)
    back.load_state_dict(copy.deepcopy(theirs.state_dict()))
    for step in range(2, 4):
        set_grads([params, copies["eager"], copies["torch"], back_params, theirs_params], seed=step)
        for opt in (fused, *others.values(), back, theirs):
            opt.step()
    compare_optimizers(fused, others["eager"], params, copies["eager"], KEYS)
    compare_optimizers(fused, others["torch"], params, copies["torch"], KEYS, check_step=False)
    compare_optimizers(back, theirs, back_params, theirs_params, KEYS, check_step=False)
