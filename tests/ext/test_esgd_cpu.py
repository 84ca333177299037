"""ESGD-M on the ``cpu`` backend (csrc/esgd_math.h on the host) against the
eager reference (fastmup.optim.esgd._single_tensor_esgd).

What is checked:

* one step at a time (:func:`check_step`) on tensor sets of every host tile
  and block boundary, two param groups, five dtype modes and four
  hyperparameter sets;
* the same one-step comparison on an MLP and a small transformer
  (tests/models.py) under MuESGD, fp32 and bf16, the ``ema`` and ``max``
  cases of the Triton backend's test (tests/kernels/test_esgd.py), HVP and
  non-HVP steps: the two sides' grads and HVPs (same probes) are checked
  bit-identical first, and every step must reach the host module's fused
  ``esgd`` exactly once (no fallback to the reference);
* AMP: grads and HVPs scaled by 1024 with ``grad_scale = 1024`` give the
  unscaled reference's step (HVP and non-HVP steps); ``found_inf`` skips
  everything;
* the separable quadratic's float64 closed form, and a 12-step MLP trajectory.

Every model and AMP comparison also asserts that the reference's step moves
the compared values by more than the tolerance (the param on every step, m
and d where they change), so a cpu step that did nothing, or skipped a
scalar factor, fails.

Tolerances of the one-step comparisons (after each step the cpu side's params
and state are reset to the reference's, the float64 scalar state advances on
both sides independently and is compared EXACTLY: both multiply the same
doubles in the same order):

* fp32 storage: both sides evaluate the same formula op for op in fp32, but
  torch's vectorised kernels may fuse a multiply-add (``lerp``, ``addcmul``)
  that the portable host build (-ffp-contract=off) rounds twice.  Each of the
  ~10 roundings of an element's update then differs by at most one ulp of an
  intermediate.  The intermediates of ``m`` are bounded by ``|m_old| + |g|``,
  those of ``d`` by ``|d_old| + |h|²`` (ema) and those of the parameter by
  ``|p_old|`` and ``|coef|·(|m| + |g|)/denom`` (``m̃`` is a lerp of ``m`` and
  ``g``; when it cancels its absolute error is still an ulp of ``|m| + |g|``;
  a few-ulp relative error of ``d`` moves ``denom`` and hence the update by a
  few ulps relative).  The test allows 8 eps32 times those bounds: a few ulps
  with a margin, while a wrong term (a missing bias correction, a wrong
  warm-up factor, a skipped decay) moves values by >1e-3 relative.
* bf16/fp16 storage: the fp32 results before the final rounding obey the
  bound above; rounding each to storage moves it by at most half a storage
  ulp, so the stored values differ by at most one storage ulp of the value
  (plus the fp32 bound, which matters next to zero only).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fastmup.optim import ESGD, MuESGD
from fastmup.optim import esgd as esgd_module
from tests.ext import needs_cpu_build
from tests.models import lm_batch, loss_fn, make_mlp, make_transformer, mlp_batch, set_shapes

pytestmark = [
    needs_cpu_build,
    pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True"),
]

EPS32 = 2.0**-23


def storage_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One ulp of ``dtype`` at the magnitude of ``x`` (float32 result)."""
    mant_bits = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    _, exp = torch.frexp(x.float().abs())
    e = torch.clamp(exp.float() - 1, min=math.log2(torch.finfo(dtype).tiny))
    return torch.pow(2.0, e - mant_bits)


def tolerance(expected, bound):
    """The docstring's bound: 8 eps32 times the magnitude bound, plus one
    storage ulp of the expected value for bf16/fp16 storage."""
    tol = 8 * EPS32 * bound.float()
    if expected.dtype != torch.float32:
        tol = tol + storage_ulp(expected.float(), expected.dtype)
    return tol


def within(actual, expected, bound):
    a, e = actual.float(), expected.float()
    return (a == e) | ((a - e).abs() <= tolerance(expected, bound)) | (a.isnan() & e.isnan())


def check(actual, expected, bound, what):
    ok = within(actual, expected, bound)
    if not bool(ok.all()):
        a, e, tol = actual.float(), expected.float(), tolerance(expected, bound)
        i = (~ok).nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int((~ok).sum())}/{e.numel()} beyond tolerance; first at {i}: cpu {a[tuple(i)].item()!r} "
            f"eager {e[tuple(i)].item()!r} tol {tol[tuple(i)].item()!r}"
        )


SCALARS = ("step", "exp_avg_bias_corr", "exp_avg_d_bias_corr", "lr_warmup_cumprod")


def tensor_rows(opt):
    """id(param) -> its row of the optimizer's hyperparameter table (the
    tensor's own lr and weight decay, μP multipliers applied)."""
    rows = {}
    for batch in opt._batches:
        for i, owner in enumerate(esgd_module._owners(batch)):
            rows[id(owner)] = dict(zip(batch.columns, (float(x) for x in batch.rows[i])))
    return rows


def check_step(ref, cpu, ref_params, cpu_params, befores, grads, hvps, where):
    """One step of ``cpu`` against one step of ``ref`` (eager) from identical
    params, state, grads and HVPs, with the tolerances of the module docstring.

    ``befores[i]``: the reference's param and state before the step;
    ``grads[i]``: the unscaled gradient (None: no grad this step); ``hvps``:
    None on a non-HVP step, else per tensor the HVP or any tensor of its
    magnitude (None: zero).  The float64 scalar state must be bit-identical.

    Returns, per tensor with a grad, the quantities the reference's step
    changed by more than the tolerance (``{"exp_avg", "exp_avg_d", "param"}``):
    where a quantity is listed, a cpu step that left it alone (or got it as
    wrong as that) would fail the comparison.
    """
    rows = tensor_rows(ref)
    moved = {}
    for i, (rp, cp) in enumerate(zip(ref_params, cpu_params)):
        rs, cs = ref.state.get(rp, {}), cpu.state.get(cp, {})
        what = f"{where} tensor {i} {tuple(rp.shape)} {rp.dtype}"
        if grads[i] is None:
            assert not cs or float(cs["step"]) == float(rs.get("step", 0)), what
            continue
        assert set(cs) == set(rs), f"{what}: state {sorted(cs)} vs {sorted(rs)}"
        for key in SCALARS:
            assert cs[key].dtype == rs[key].dtype and float(cs[key]) == float(rs[key]), f"{what} {key}"
        p0, s0 = befores[i]
        g = grads[i].float()
        m0 = s0["exp_avg"].float() if "exp_avg" in s0 else torch.zeros_like(g)
        d0 = s0["exp_avg_d"].float() if "exp_avg_d" in s0 else torch.zeros_like(g)
        m, d = rs["exp_avg"].float(), rs["exp_avg_d"].float()
        h2 = torch.zeros_like(g) if hvps is None or hvps[i] is None else hvps[i].float() ** 2
        row = rows[id(rp)]
        v, eps, is_max = row["v"], row["eps"], row["variant"] != 0.0
        bc1, bc2, cum = (float(rs[k]) for k in ("exp_avg_bias_corr", "exp_avg_d_bias_corr", "lr_warmup_cumprod"))
        step_size = row["lr"] * (1 - cum)
        coef = step_size / (1 - bc1 * v)
        corr = 1.0 if is_max else math.sqrt(max(1 - bc2, 1e-300))
        denom = d.double().sqrt() / corr + eps
        bounds = {
            "exp_avg": m0.abs() + g.abs(),
            "exp_avg_d": d0.abs() + h2,  # |d_old| + |h|²: ema and max alike
            "param": p0.float().abs() + rp.detach().float().abs() + (coef * (m.abs() + g.abs() + m0.abs()) / denom).float(),
        }
        pairs = {
            "exp_avg": (cs["exp_avg"], rs["exp_avg"], s0.get("exp_avg")),
            "exp_avg_d": (cs["exp_avg_d"], rs["exp_avg_d"], s0.get("exp_avg_d")),
            "param": (cp.detach(), rp.detach(), p0),
        }
        moved[i] = set()
        for key, (actual, expected, old) in pairs.items():
            check(actual, expected, bounds[key], f"{what} {key}")
            old = torch.zeros_like(expected) if old is None else old
            if not bool(within(old, expected, bounds[key]).all()):
                moved[i].add(key)
        if bc2 == 1.0:  # not started: the param must not move at all
            assert torch.equal(cp.detach(), p0) and torch.equal(rp.detach(), p0), what
    return moved


@torch.no_grad()
def reset_to_reference(cpu, cpu_params, ref, ref_params):
    """The cpu side's params, m and d := the reference's (in place); the
    scalar state advances on both sides independently (compared exactly)."""
    for cp, rp in zip(cpu_params, ref_params):
        cp.copy_(rp)
        for key in ("exp_avg", "exp_avg_d"):
            if key in ref.state.get(rp, {}):
                cpu.state[cp][key].copy_(ref.state[rp][key])


@pytest.fixture
def spy(cpu_ext, monkeypatch):
    """Records what the optimizers hand to :func:`fastmup.optim.esgd.esgd`
    (per backend, the HVPs by id of the param) and the calls that reach the
    host module's fused ``esgd`` (their ``hvp_step`` flag): a cpu step that
    fell back to the eager reference records no fused call."""
    calls = {"hvps": {}, "fused": []}
    real_esgd, real_run = esgd_module.esgd, cpu_ext.esgd

    def esgd(batch, *, backend="eager", hvps=None, **kw):
        if hvps is not None:
            for owner, h in zip(esgd_module._owners(batch), hvps):
                calls["hvps"][(backend, id(owner))] = None if h is None else h.detach().clone()
        return real_esgd(batch, backend=backend, hvps=hvps, **kw)

    def run(args, **kw):
        calls["fused"].append(bool(args.hvp_step))
        return real_run(args, **kw)

    monkeypatch.setattr(esgd_module, "esgd", esgd)  # MuESGD.step looks it up per call
    monkeypatch.setattr(cpu_ext, "esgd", run)  # fastmup.ext looks it up per launch
    return calls


# sizes: empty, one element, odd, a host tile (1024) +-1, a host block (2**15) +-1
SIZES = [0, 1, 7, 1023, 1025, 2**15 - 1, 2**15 + 1, 3 * 5 * 7 * 11]


def make_params(sizes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for n in sizes:
        shape = (n,) if n % 5 else (5, n // 5)
        params.append(nn.Parameter((torch.randn(shape, generator=gen) * 2).to(dtype)))
    coeffs = [torch.rand(p.shape, generator=gen).to(dtype) + 0.1 for p in params]
    return params, coeffs


def loss_of(params, coeffs, active):
    # grad = c·p², hvp = 2·c·p·z: non-constant curvature, both grads and HVPs of any sign
    return sum(((c * p * p * p).sum() / 3) for i, (p, c) in enumerate(zip(params, coeffs)) if active(i))


GROUP_CASES = {
    "ema-qhm": dict(lr=0.05, betas=(0.8, 0.95), v=0.6, lr_warmup=0.9, eps=1e-3, weight_decay=0.05),
    "ema-nesterov": dict(lr=0.3, betas=(0.9, 0.999), lr_warmup=0.99, eps=1e-4, weight_decay=0.0),
    "max": dict(lr=0.05, betas=(0.8, 0.95), lr_warmup=0.9, eps=1e-3, weight_decay=0.05, variant="max"),
    "ema-lerp-weights-above-half": dict(lr=0.1, betas=(0.3, 0.4), v=0.2, lr_warmup=0.5, eps=1e-2, weight_decay=0.1),
}

DTYPES = {
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
    "bf16+fp32state": (torch.bfloat16, torch.float32),
    "fp32+bf16state": (torch.float32, torch.bfloat16),  # the HVP is read in the grads' dtype: no rounding
}


@pytest.mark.parametrize("case", list(GROUP_CASES))
@pytest.mark.parametrize("mode", list(DTYPES))
def test_cpu_matches_eager_one_step_at_a_time(spy, case, mode):
    dtype, state_dtype = DTYPES[mode]
    kw = GROUP_CASES[case]
    seed = 1 + list(GROUP_CASES).index(case)
    ref_params, coeffs = make_params(SIZES, dtype, seed)
    cpu_params = [nn.Parameter(p.detach().clone()) for p in ref_params]
    # two param groups; the last tensors get their first grad on step 2 (a
    # non-HVP step: they must not move until their first HVP, step 4)
    split = 3
    mk = lambda ps, backend: ESGD(  # noqa: E731
        [dict(params=ps[:split]), dict(params=ps[split:], lr=kw["lr"] * 2)],
        backend=backend, d_warmup=2, update_d_every=3, state_dtype=state_dtype, **kw
    )
    ref, cpu = mk(ref_params, "eager"), mk(cpu_params, "cpu")
    assert cpu.backend == "cpu"
    late = set(range(len(SIZES) - 2, len(SIZES)))
    hvp_steps = []
    for step in range(8):  # HVP on calls 0, 1, 4, 7
        active = (lambda i: True) if step >= 2 else (lambda i: i not in late)
        hvp = ref.should_create_graph()
        hvp_steps.append(hvp)
        assert hvp == cpu.should_create_graph()
        for opt, ps in ((ref, ref_params), (cpu, cpu_params)):
            opt.zero_grad(set_to_none=True)
            loss_of(ps, coeffs, active).backward(create_graph=hvp)
        befores = [(p.detach().clone(), {k: v.clone() for k, v in ref.state[p].items()}) for p in ref_params]
        grads = [None if p.grad is None else p.grad.detach().clone() for p in ref_params]
        ref.step()
        cpu.step()
        # |hvp| = |2·c·p·z| = 2·|c·p| (|z| = 1)
        hvps = [2 * c.float() * p0.float() for c, (p0, _) in zip(coeffs, befores)] if hvp else None
        check_step(ref, cpu, ref_params, cpu_params, befores, grads, hvps, f"step {step}")
        reset_to_reference(cpu, cpu_params, ref, ref_params)
    assert all(torch.isfinite(p).all() for p in cpu_params)
    # one fused launch per step (one dtype signature), HVP steps included
    assert spy["fused"] == hvp_steps == [True, True, False, False, True, False, False, True]


def test_found_inf_skips_everything(cpu_ext):
    params, coeffs = make_params([5, 3000], torch.float32, 0)
    opt = ESGD(params, backend="cpu")
    loss_of(params, coeffs, lambda i: True).backward(create_graph=True)
    opt.step()
    snapshot = [p.detach().clone() for p in params], {k: v.clone() for k, v in opt.state[params[0]].items()}
    opt.zero_grad(set_to_none=True)
    loss_of(params, coeffs, lambda i: True).backward(create_graph=True)
    opt.found_inf = torch.ones(1)
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(snapshot[0], params))
    assert all(torch.equal(v, opt.state[params[0]][k]) for k, v in snapshot[1].items())


def test_only_empty_tensors_still_advance_the_scalar_state(cpu_ext):
    p = nn.Parameter(torch.zeros(0))
    opt = ESGD([p], backend="cpu", betas=(0.5, 0.25), d_warmup=1, update_d_every=2)
    for _ in range(3):  # HVP, -, HVP
        opt.zero_grad(set_to_none=True)
        (p * p).sum().backward(create_graph=opt.should_create_graph())
        opt.step()
    st = opt.state[p]
    assert float(st["step"]) == 3 and float(st["exp_avg_bias_corr"]) == 0.125 and float(st["exp_avg_d_bias_corr"]) == 0.0625


# ---------------------------------------------------------------------------
# the separable quadratic: hvp² = a², a float64 closed form (60 steps)
# ---------------------------------------------------------------------------
# The same quadratic and float64 closed form as the eager tests.
from tests.optim.test_esgd import A, HVP_CALLS, QUAD, W0, closed_form  # noqa: E402,F401


@pytest.mark.parametrize(
    "kw", [dict(variant="ema", v=0.6, **QUAD), dict(variant="ema", **QUAD), dict(variant="max", **QUAD)],
    ids=["ema-qhm", "ema-nesterov", "max"],
)
def test_quadratic_closed_form(cpu_ext, kw):
    w = nn.Parameter(torch.tensor(W0, dtype=torch.float32))
    a = torch.tensor(A, dtype=torch.float32)
    opt = ESGD([w], backend="cpu", **kw)
    calls = []
    for t in range(60):
        opt.zero_grad(set_to_none=True)
        hvp = opt.should_create_graph()
        calls += [t] if hvp else []
        (0.5 * (a * w * w).sum()).backward(create_graph=hvp)
        opt.step()
    expected, expected_calls = closed_form(60, **kw)
    assert calls == expected_calls == HVP_CALLS
    assert np.abs(expected).max() > 0.1
    # as tests/optim/test_esgd.py's float32 eager check: each step rounds w
    # once and its update by a few ulps; the map contracts, so the error stays
    # near one ulp of max|w|; 5e-7 of max|w0| is an 8x margin and far below
    # any wrong term (>1e-3).
    np.testing.assert_allclose(w.detach().double().numpy(), expected, rtol=0, atol=5e-7 * np.abs(W0).max())


# ---------------------------------------------------------------------------
# an MLP: 12 steps from the same init, eager vs cpu (HVPs with cross-layer blocks)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["ema", "max"])
def test_mlp_trajectory_matches_eager(cpu_ext, variant):
    torch.manual_seed(0)
    x, y = torch.randn(64, 10), torch.randn(64, 3)

    def net():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(10, 33), nn.Tanh(), nn.Linear(33, 17), nn.Tanh(), nn.Linear(17, 3))

    models = {}
    for backend in ("eager", "cpu"):
        model = net()
        opt = ESGD(model.parameters(), lr=0.05, weight_decay=0.01, variant=variant, backend=backend, d_warmup=4, update_d_every=3)
        assert opt.backend == backend
        losses = []
        for _ in range(12):
            opt.zero_grad(set_to_none=True)
            loss = ((model(x) - y) ** 2).mean()
            loss.backward(create_graph=opt.should_create_graph())
            opt.step()
            losses.append(loss.item())
        models[backend] = (model, losses)
    (ref, ref_losses), (cpu, cpu_losses) = models["eager"], models["cpu"]
    assert ref_losses[-1] < ref_losses[0]
    # a few-ulp difference per step, 12 steps of a smooth map: 1e-5 relative
    # (1e-3 would already be a wrong term)
    np.testing.assert_allclose(cpu_losses, ref_losses, rtol=1e-5)
    for (name, p), q in zip(ref.named_parameters(), cpu.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-5 * float(p.abs().max()), msg=name)


# ---------------------------------------------------------------------------
# an MLP and a small transformer, one step at a time (as the Triton backend's
# tests/kernels/test_esgd.py::test_fused_step_matches_eager)
# ---------------------------------------------------------------------------
def _model(kind, dtype):
    torch.manual_seed(0)
    fn, batch = (make_mlp, mlp_batch) if kind == "mlp" else (make_transformer, lm_batch)
    return set_shapes(fn, 16).to(dtype), batch


# the hyperparameters of tests/kernels/test_esgd.py::CASES
MODEL_CASES = [
    dict(variant="ema", lr=0.5, betas=(0.8, 0.95), v=0.6, weight_decay=0.1, lr_warmup=0.9),
    dict(variant="max", lr=0.5, betas=(0.9, 0.9), weight_decay=0.05, lr_warmup=0.8, eps=1e-3),
]


@pytest.mark.parametrize("kw", MODEL_CASES, ids=lambda kw: kw["variant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_model_step_matches_eager(spy, kind, dtype, kw):
    """MuESGD (μP per-tensor lr and wd) on a model: every step starts both
    sides from the same params and m, d; the grads and the HVPs (same probes)
    are checked bit-identical before the fused step is compared with the
    reference's (check_step).  HVP on calls 0, 1 and 3, not on 2."""
    ref_model, make_batch = _model(kind, dtype)
    cpu_model, _ = _model(kind, dtype)
    schedule = dict(d_warmup=2, update_d_every=2)
    ref = MuESGD(ref_model.parameters(), backend="eager", **schedule, **kw)
    cpu = MuESGD(cpu_model.parameters(), backend="cpu", **schedule, **kw)
    assert ref.backend == "eager" and cpu.backend == "cpu"
    ref_params, cpu_params = list(ref_model.parameters()), list(cpu_model.parameters())
    hvp_steps = []
    for t in range(4):
        reset_to_reference(cpu, cpu_params, ref, ref_params)
        x, y = make_batch(seed=t)
        x = x.to(dtype) if x.is_floating_point() else x
        hvp = ref.should_create_graph()
        assert cpu.should_create_graph() == hvp
        hvp_steps.append(hvp)
        for model, opt in ((ref_model, ref), (cpu_model, cpu)):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward(create_graph=hvp)
        for i, (rp, cp) in enumerate(zip(ref_params, cpu_params)):
            assert torch.equal(cp.grad, rp.grad), f"step {t} tensor {i}: the two sides' grads differ"
        befores = [(p.detach().clone(), {k: v.clone() for k, v in ref.state[p].items()}) for p in ref_params]
        grads = [p.grad.detach().clone() for p in ref_params]
        fused_before = len(spy["fused"])
        ref.step()
        cpu.step()
        # one fused call per step (one dtype signature), none on the reference's side
        assert spy["fused"][fused_before:] == [hvp], f"step {t}: fused calls {spy['fused'][fused_before:]}"
        hvps = None
        if hvp:
            hvps = [spy["hvps"][("eager", id(p))] for p in ref_params]
            for i, (h, p) in enumerate(zip(hvps, cpu_params)):
                assert torch.equal(spy["hvps"][("cpu", id(p))], h), f"step {t} tensor {i}: HVPs differ (probes?)"
        moved = check_step(ref, cpu, ref_params, cpu_params, befores, grads, hvps, f"{kind} step {t}")
        # the comparison can fail: every tensor's m, d (HVP steps) and param
        # (from the first HVP on: all steps here) change by more than the tolerance
        expected = {"exp_avg", "param"} | ({"exp_avg_d"} if hvp else set())
        stuck = {i: expected - keys for i, keys in moved.items() if expected - keys}
        assert not stuck, f"step {t}: the reference's step is within the tolerance of doing nothing: {stuck}"
    assert hvp_steps == [True, True, False, True]
    assert cpu.probe_counter == ref.probe_counter == 3


# ---------------------------------------------------------------------------
# AMP: grad_scale divides grads and HVPs (HVP and non-HVP steps)
# ---------------------------------------------------------------------------
# steps of ~10% of |p| (lr·(1 - lr_warmup) = 0.25 times g/|hvp| = p/2): larger
# than one bf16 ulp, so the check sees whether each param moved as it should
SCALE_CASES = {
    "ema": dict(lr=0.5, betas=(0.8, 0.95), v=0.6, lr_warmup=0.5, eps=1e-3, weight_decay=0.05),
    "max": dict(lr=0.5, betas=(0.8, 0.95), lr_warmup=0.5, eps=1e-3, weight_decay=0.05, variant="max"),
}


@pytest.mark.parametrize("case", list(SCALE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grad_scale_matches_unscaled_eager(spy, dtype, case):
    """The cpu side backpropagates ``1024·loss`` (grads and HVPs 1024 times
    the reference's: checked bit for bit, a power-of-two scale is exact) with
    ``grad_scale = 1024`` and ``found_inf = 0``; the reference runs unscaled
    without either.  Dividing by a power of two is exact, so the fused step
    sees the reference's inputs and check_step's tolerances apply unchanged;
    ignoring grad_scale would make m 1024 times too large."""
    scale = 1024.0
    ref_params, coeffs = make_params([1, 7, 1025, 2**15 + 1, 3 * 5 * 7 * 11], dtype, seed=11)
    cpu_params = [nn.Parameter(p.detach().clone()) for p in ref_params]
    kw = SCALE_CASES[case]
    mk = lambda ps, backend: ESGD(ps, backend=backend, d_warmup=1, update_d_every=2, **kw)  # noqa: E731
    ref, cpu = mk(ref_params, "eager"), mk(cpu_params, "cpu")
    assert cpu.backend == "cpu"
    cpu.grad_scale, cpu.found_inf = torch.tensor(scale), torch.tensor(0.0)
    hvp_steps, seen = [], {}
    for step in range(4):  # HVP on calls 0 and 2
        hvp = ref.should_create_graph()
        assert cpu.should_create_graph() == hvp
        hvp_steps.append(hvp)
        for opt, ps, s in ((ref, ref_params, 1.0), (cpu, cpu_params, scale)):
            opt.zero_grad(set_to_none=True)
            (s * loss_of(ps, coeffs, lambda i: True)).backward(create_graph=hvp)
        for i, (rp, cp) in enumerate(zip(ref_params, cpu_params)):
            assert torch.equal(cp.grad, rp.grad * scale), f"step {step} tensor {i}: scaled grad"
        befores = [(p.detach().clone(), {k: v.clone() for k, v in ref.state[p].items()}) for p in ref_params]
        grads = [p.grad.detach().clone() for p in ref_params]
        fused_before = len(spy["fused"])
        ref.step()
        cpu.step()
        assert spy["fused"][fused_before:] == [hvp]
        hvps = None
        if hvp:
            hvps = [spy["hvps"][("eager", id(p))] for p in ref_params]
            for i, (h, p) in enumerate(zip(hvps, cpu_params)):
                assert torch.equal(spy["hvps"][("cpu", id(p))], h * scale), f"step {step} tensor {i}: scaled HVP"
        moved = check_step(ref, cpu, ref_params, cpu_params, befores, grads, hvps, f"scaled step {step}")
        # the comparison can fail: every param moves by more than the
        # tolerance on every step, m and d on (at least) some step each (m of
        # the one-element bf16 tensor may stay within an ulp once: g ≈ m)
        assert all("param" in keys for keys in moved.values()), f"step {step}: {moved}"
        for i, keys in moved.items():
            seen.setdefault(i, set()).update(keys)
        reset_to_reference(cpu, cpu_params, ref, ref_params)
    assert hvp_steps == [True, False, True, False]
    assert seen == {i: {"exp_avg", "exp_avg_d", "param"} for i in range(len(ref_params))}, seen
