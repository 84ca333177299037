"""Fused ESGD-M (Triton, run on the CPU under TRITON_INTERPRET=1) against the eager reference.

* probes: the Triton generator draws exactly the torch generator's signs;
* the separable quadratic: the float64 closed form of tests/optim/test_esgd.py;
* random tensor sets / groups / dtypes (hypothesis), an MLP and a
  transformer: step by step, from identical params, state, grads, probes and
  HVPs, the fused step equals the eager step.  The kernel performs torch's
  fp32 operations one for one (its fused multiply-adds included), so m and d
  come out bit-identical on an FMA CPU and p within an ulp of the update
  (torch's CPU sqrt is not always correctly rounded): fp32 params within
  ``FP32_ULPS`` ulps of the tensor's magnitude before or after the step
  (see :func:`assert_param_matches`; measured <= 2), state within conftest's
  fp32 bound; bf16/fp16 within one storage ulp (both round once from fp32
  values an ulp apart); the float64 scalar state bit-identical (the same
  double operations);
* one launch per dtype signature for the step, one for the probes;
* AMP: grad_scale divides grads and HVPs, found_inf skips on the device.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from fastmup.optim import ESGD, MuESGD  # noqa: E402
from fastmup.optim.esgd import draw_probes  # noqa: E402
from tests.models import lm_batch, loss_fn, make_mlp, make_transformer, mlp_batch, set_shapes  # noqa: E402
from tests.optim.test_esgd import HVP_CALLS, QUAD_CASES, W0, closed_form, run_quadratic  # noqa: E402

from .conftest import (  # noqa: E402
    DEVICE,
    FP32_ULPS,
    INTERPRETED,
    MAX_EXAMPLES,
    STEPS,
    assert_matches,
    build_optimizer,
    draw_assignment,
    draw_dtypes,
    draw_extras,
    launches,
    make_params,
    sync,
    tensor_specs,
    twin,
)

pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")

SCALARS = ("step", "exp_avg_bias_corr", "exp_avg_d_bias_corr", "lr_warmup_cumprod")


def assert_param_matches(actual, expected, before, what):
    """A param after one step.  fp32: FP32_ULPS ulps of the larger of the
    tensor's magnitudes before and after the step.  The step is p·decay +
    update with |update| up to ~lr (ESGD-M normalises by curvature): where
    the two nearly cancel, the result carries the rounding of its operands,
    not of its own small size.  m and d are computed op for op as torch does
    (bit-identical on an FMA CPU); p differs by an ulp of the update now and
    then because torch's CPU sqrt is not always correctly rounded.  bf16/fp16:
    one storage ulp (conftest)."""
    if actual.dtype != torch.float32:
        assert_matches(actual, expected, what)
        return
    if expected.numel() == 0:
        return
    a, e = actual.double(), expected.double()
    # Magnitudes of the finite entries: a step that overflows an entry to
    # inf or nan in both backends (a large lr on a steep loss) must not
    # turn the bound into nan.
    magnitude = max((t[t.isfinite()].abs().max().item() if t.isfinite().any() else 0.0) for t in (e, before.double()))
    bound = FP32_ULPS * torch.finfo(torch.float32).eps * magnitude
    err = (a - e).abs()
    ok = (err <= bound) | (a == e) | (a.isnan() & e.isnan())
    assert ok.all(), f"{what}: {int((~ok).sum())} entries off, worst {err[~ok].max().item():.3g} (bound {bound:.3g})"


def compare_steps(fused, eager, fused_params, eager_params, befores, where):
    """Params (see assert_param_matches), m and d (conftest tolerances), and
    the float64 scalar state and step counts bit for bit."""
    for i, (p, q, b) in enumerate(zip(fused_params, eager_params, befores)):
        assert_param_matches(p.detach(), q.detach(), b, f"{where} param {i} {tuple(p.shape)} {p.dtype}")
        sp, sq = fused.state.get(p, {}), eager.state.get(q, {})
        assert set(sp) == set(sq), f"{where} param {i}: state {sorted(sp)} vs {sorted(sq)}"
        for key in ("exp_avg", "exp_avg_d"):
            if key in sq:
                assert sp[key].dtype == sq[key].dtype
                assert_matches(sp[key], sq[key], f"{where} param {i} {key}")
        for key in SCALARS:
            if key in sq:
                assert sp[key].dtype == sq[key].dtype and torch.equal(sp[key], sq[key]), f"{where} param {i} {key}"


def _params_with_grads(shapes_dtypes, seed=0, missing=()):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, (shape, dtype) in enumerate(shapes_dtypes):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype).to(DEVICE))
        if i not in missing:
            p.grad = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
        params.append(p)
    return params


# ----------------------------------------------------------------------------
# random tensor sets, groups, dtypes and hyperparameters
# ----------------------------------------------------------------------------
@st.composite
def esgd_cases(draw):
    """Up to 3 groups with independent hyperparameters (β = 0, v = 0 or 1,
    no warm-up, both variants in one launch), tensors of every launch boundary."""
    from fastmup.kernels import esgd as kernel

    specs = draw(tensor_specs(kernel.BLOCK, kernel.TILE))
    n = len(specs)
    dtypes, state_dtype = draw_dtypes(draw, n)
    ngroups, assign = draw_assignment(draw, n)
    groups = []
    for _ in range(ngroups):
        variant = draw(st.sampled_from(["ema", "max"]))
        groups.append(
            dict(
                lr=draw(st.sampled_from([0.01, 0.3, 1.0])),
                weight_decay=draw(st.sampled_from([0.0, 0.1])),
                betas=(draw(st.sampled_from([0.0, 0.5, 0.9])), draw(st.sampled_from([0.0, 0.9, 0.999]))),
                v=None if variant == "max" else draw(st.sampled_from([None, 0.0, 0.7, 1.0])),
                lr_warmup=draw(st.sampled_from([0.0, 0.9, 0.99])),
                eps=draw(st.sampled_from([1e-8, 1e-4])),
                variant=variant,
                decoupled_wd=draw(st.booleans()),
            )
        )
    return dict(specs=specs, dtypes=dtypes, state_dtype=state_dtype, groups=groups, assign=assign, **draw_extras(draw, n))


def _quartic_loss(params, weights, present):
    """Σ c·p⁴/4 + ½(Σ mean p)²: a diagonal Hessian plus a dense cross-parameter block."""
    loss = 0.0
    coupling = 0.0
    for i, (p, c) in enumerate(zip(params, weights)):
        if i in present:
            x = p.float()
            loss = loss + (c * x**4).sum() / 4  # empty tensors too: a zero gradient with a graph
            if p.numel():
                coupling = coupling + x.mean()
    return loss + 0.5 * coupling**2


@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=esgd_cases())
def test_matches_eager(case):
    """STEPS steps (HVP on calls 0, 1, 3), each one probe launch (HVP steps)
    and one step launch per dtype signature, each compared with eager
    (params, m, d, bit-identical scalar state) and then synchronised."""
    fused_params = make_params(case["specs"], case["dtypes"], seed=case["seed"])
    eager_params = twin(fused_params)
    fused = build_optimizer(MuESGD, fused_params, case, "triton")
    eager = build_optimizer(MuESGD, eager_params, case, "eager")
    for opt in (fused, eager):
        opt.d_warmup, opt.update_d_every, opt.probe_seed = 2, 2, case["seed"]
    gen = torch.Generator().manual_seed(case["seed"])
    for step in range(STEPS):
        weights = [case["grad_scales"][i] * (torch.rand(p.shape, generator=gen) + 0.5) for i, p in enumerate(fused_params)]
        present = set(range(len(fused_params))) - case["missing"][step]
        hvp = fused.should_create_graph()
        for params, opt in ((fused_params, fused), (eager_params, eager)):
            opt.zero_grad(set_to_none=True)
            if present:
                _quartic_loss(params, weights, present).backward(create_graph=hvp)
        counts = launches("esgd"), launches("rademacher")
        befores = [q.detach().clone() for q in eager_params]
        fused.step()
        eager.step()
        signatures = {p.dtype for p in fused_params if p.grad is not None}
        assert launches("esgd") - counts[0] == len(signatures)
        nonempty = {p.dtype for p in fused_params if p.grad is not None and p.numel()}
        assert launches("rademacher") - counts[1] == (len(nonempty) if hvp else 0)
        compare_steps(fused, eager, fused_params, eager_params, befores, f"step {step}")
        sync(fused, eager, fused_params, eager_params)


# ----------------------------------------------------------------------------
# probes
# ----------------------------------------------------------------------------
def test_probe_kernel_draws_the_torch_generators_signs():
    specs = [((3, 5), torch.float32), ((0,), torch.float32), ((5000,), torch.bfloat16), ((7, 1100), torch.float32),
             ((1,), torch.float16), ((4096,), torch.float32), ((33,), torch.bfloat16)]
    params = _params_with_grads(specs, missing=(3,))  # tensor ids skip a param without grad
    opt = ESGD(params, backend="triton", seed=2**40 + 5)
    opt.probe_counter = 2**33 + 1
    batches = opt._plan()
    assert len(batches) == 3  # fp32, bf16, fp16
    before = launches("rademacher")
    for batch in batches:
        fused = draw_probes(batch, opt.probe_seed, opt.probe_counter, backend="triton")
        eager = draw_probes(batch, opt.probe_seed, opt.probe_counter, backend="eager")
        assert len(fused) == len(eager) == len(batch)
        for f, e, g in zip(fused, eager, batch.grads):
            assert f.dtype == g.dtype and f.shape == g.shape and f.is_contiguous()
            assert torch.equal(f, e)
    assert launches("rademacher") - before == sum(1 for b in batches if any(p.numel() for p in b.params))


# ----------------------------------------------------------------------------
# the separable quadratic
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("kw", QUAD_CASES, ids=lambda kw: f"{kw['variant']}-v{kw.get('v')}")
def test_quadratic_closed_form(kw):
    w, calls, _ = run_quadratic("triton", torch.float32, **kw)
    expected, expected_calls = closed_form(60, **kw)
    assert calls == expected_calls == HVP_CALLS
    # as for the eager fp32 case (tests/optim/test_esgd.py): measured 6e-8 of max|w0|
    np.testing.assert_allclose(w, expected, rtol=0, atol=5e-7 * np.abs(W0).max())


# ----------------------------------------------------------------------------
# models: step by step against the eager reference
# ----------------------------------------------------------------------------
def _model(kind, dtype):
    torch.manual_seed(0)
    fn, batch = (make_mlp, mlp_batch) if kind == "mlp" else (make_transformer, lm_batch)
    model = set_shapes(fn, 16)
    return model.to(dtype).to(DEVICE), batch


def _sync(dst_model, dst_opt, src_model, src_opt):
    """Make the fused side's params and state equal to the reference's."""
    with torch.no_grad():
        for p, q in zip(dst_model.parameters(), src_model.parameters()):
            p.copy_(q)
            for key, value in src_opt.state.get(q, {}).items():
                dst_opt.state[p][key].copy_(value)


CASES = [
    dict(variant="ema", lr=0.5, betas=(0.8, 0.95), v=0.6, weight_decay=0.1, lr_warmup=0.9),
    dict(variant="max", lr=0.5, betas=(0.9, 0.9), weight_decay=0.05, lr_warmup=0.8, eps=1e-3),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: kw["variant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_fused_step_matches_eager(kind, dtype, kw):
    eager_model, make_batch = _model(kind, dtype)
    fused_model, _ = _model(kind, dtype)
    schedule = dict(d_warmup=2, update_d_every=2)  # HVP on calls 0 and 1, not on 2: both kinds of step
    eager = MuESGD(eager_model.parameters(), backend="eager", **schedule, **kw)
    fused = MuESGD(fused_model.parameters(), backend="triton", **schedule, **kw)
    for t in range(3):
        _sync(fused_model, fused, eager_model, eager)
        x, y = make_batch(seed=t)
        x = x.to(DEVICE, dtype) if x.is_floating_point() else x.to(DEVICE)
        hvp = eager.should_create_graph()
        assert fused.should_create_graph() == hvp
        befores = [q.detach().clone() for q in eager_model.parameters()]
        for model, opt in ((eager_model, eager), (fused_model, fused)):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y.to(DEVICE)).backward(create_graph=hvp)
            opt.step()
        compare_steps(fused, eager, list(fused_model.parameters()), list(eager_model.parameters()), befores,
                      f"step {t} ({'HVP' if hvp else 'no HVP'})")
    assert fused.probe_counter == eager.probe_counter == 2


def test_one_launch_per_signature_and_step():
    params = _params_with_grads([((40, 3), torch.float32), ((9000,), torch.float32), ((17,), torch.bfloat16)])
    opt = ESGD(params, backend="triton", d_warmup=1, update_d_every=2)

    def step(hvp):
        for p in params:
            p.grad = None
        loss = sum((p.float() ** 2).sum() for p in params)
        loss.backward(create_graph=hvp)
        before = launches("esgd"), launches("rademacher")
        opt.step()
        return launches("esgd") - before[0], launches("rademacher") - before[1]

    assert opt.should_create_graph()
    assert step(True) == (2, 2)  # two dtype signatures
    assert not opt.should_create_graph()
    assert step(False) == (2, 0)
    assert opt.should_create_graph()
    assert step(True) == (2, 2)


def test_empty_and_multi_block_tensors():
    specs = [((0,), torch.float32), ((3 * 4096 + 5,), torch.float32), ((2, 0, 3), torch.float32), ((10,), torch.float32)]
    fused_params = _params_with_grads(specs)
    eager_params = [torch.nn.Parameter(p.detach().clone()) for p in fused_params]
    fused = ESGD(fused_params, backend="triton", lr=0.3, weight_decay=0.1, d_warmup=1, update_d_every=2)
    eager = ESGD(eager_params, backend="eager", lr=0.3, weight_decay=0.1, d_warmup=1, update_d_every=2)
    gen = torch.Generator().manual_seed(3)
    for t in range(4):
        scales = [torch.rand(p.shape, generator=gen) + 0.5 for p in fused_params]
        hvp = eager.should_create_graph()
        for params, opt in ((fused_params, fused), (eager_params, eager)):
            for p in params:
                p.grad = None
            sum(((s * p**4).sum() for s, p in zip(scales, params))).backward(create_graph=hvp)
            opt.step()
        for i, (p, q) in enumerate(zip(fused_params, eager_params)):
            assert_matches(p.detach(), q.detach(), f"step {t} param {i}")
            for key in SCALARS:
                assert torch.equal(fused.state[p][key], eager.state[q][key]), (t, i, key)
    assert all(fused.state[p]["step"].item() == 4 for p in fused_params)


@pytest.mark.parametrize("scale", [3.0, 1000.0])
def test_any_grad_scale_matches_eager(scale):
    """A grad_scale that is not a power of two takes the kernel's dividing
    pass, for grads and HVPs alike: eager's results and scalar state."""
    params = _params_with_grads([((300,), torch.float32), ((5, 7), torch.float32)])
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused, eager = ESGD(params, backend="triton", lr=0.3), ESGD(twins, backend="eager", lr=0.3)
    for t in range(2):
        for ps, opt in ((params, fused), (twins, eager)):
            for p in ps:
                p.grad = None
            (scale * sum((p**4).sum() for p in ps)).backward(create_graph=True)
            opt.grad_scale = torch.tensor(scale)
            opt.step()
        for i, (p, q) in enumerate(zip(params, twins)):
            assert_matches(p.detach(), q.detach(), f"step {t} param {i}")
            for key in SCALARS:
                assert torch.equal(fused.state[p][key], eager.state[q][key]), (t, i, key)


def test_grad_scale_and_found_inf_on_device():
    params = _params_with_grads([((300,), torch.float32), ((5, 7), torch.float32)])
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = ESGD(params, backend="triton", lr=0.3)
    eager = ESGD(twins, backend="eager", lr=0.3)
    scale = 256.0
    for t in range(2):
        for ps, opt, s in ((params, fused, scale), (twins, eager, 1.0)):
            for p in ps:
                p.grad = None
            (s * sum((p**4).sum() for p in ps)).backward(create_graph=True)
            opt.grad_scale = torch.tensor(s)
            opt.found_inf = torch.tensor(0.0)
            opt.step()
        for p, q in zip(params, twins):
            assert_matches(p.detach(), q.detach(), f"step {t}")
    # found_inf: nothing is written, the tickets still reset
    snapshot = [(p.detach().clone(), copy.deepcopy(fused.state[p])) for p in params]
    for p in params:
        p.grad = None
    sum((p**4).sum() for p in params).backward(create_graph=True)
    fused.grad_scale, fused.found_inf = None, torch.tensor(1.0)
    fused.step()
    for p, (value, state) in zip(params, snapshot):
        assert torch.equal(p, value)
        assert all(torch.equal(fused.state[p][k], v) for k, v in state.items())
    from fastmup.kernels import esgd as kernel

    assert int(fused._batches[0].launch_plan(kernel.BLOCK).tickets.abs().sum()) == 0


def test_missing_create_graph_leaves_everything_unchanged():
    model, make_batch = _model("mlp", torch.float32)
    opt = MuESGD(model.parameters(), backend="triton")
    x, y = make_batch()
    loss_fn(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="should_create_graph"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.state == {} and opt.steps == 0


@pytest.mark.skipif(not INTERPRETED, reason="float64 params: the eager path only")
def test_float64_is_refused_with_a_clear_message():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = ESGD([p], backend="triton")
    (p**2).sum().backward(create_graph=True)
    with pytest.raises(TypeError, match="eager"):
        opt.step()
