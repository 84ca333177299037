"""ESGD-M on the ``cpu`` backend (csrc/esgd_math.h on the host) against the
eager reference (fastmup.optim.esgd._single_tensor_esgd).

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

from fastmup import ext
from fastmup.ext import build as ext_build
from fastmup.optim import ESGD

pytestmark = [
    pytest.mark.skipif(
        bool(ext_build.missing_requirements("cpu")),
        reason="the cpu backend cannot be built here: missing " + "; ".join(ext_build.missing_requirements("cpu")),
    ),
    pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True"),
]

EPS32 = 2.0**-23


@pytest.fixture(scope="module")
def cpu_ext():
    return ext.load("cpu")


def storage_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One ulp of ``dtype`` at the magnitude of ``x`` (float32 result)."""
    mant_bits = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    _, exp = torch.frexp(x.float().abs())
    e = torch.clamp(exp.float() - 1, min=math.log2(torch.finfo(dtype).tiny))
    return torch.pow(2.0, e - mant_bits)


def check(actual, expected, bound, what):
    a, e = actual.float(), expected.float()
    tol = 8 * EPS32 * bound.float()
    if expected.dtype != torch.float32:
        tol = tol + storage_ulp(e, expected.dtype)
    ok = (a == e) | ((a - e).abs() <= tol) | (a.isnan() & e.isnan())
    if not bool(ok.all()):
        i = (~ok).nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int((~ok).sum())}/{e.numel()} beyond tolerance; first at {i}: cpu {a[tuple(i)].item()!r} "
            f"eager {e[tuple(i)].item()!r} tol {tol[tuple(i)].item()!r}"
        )


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
    "fp32+bf16state": (torch.float32, torch.bfloat16),  # HVP steps: the reference runs (lossy HVP conversion)
}


@pytest.mark.parametrize("case", list(GROUP_CASES))
@pytest.mark.parametrize("mode", list(DTYPES))
def test_cpu_matches_eager_one_step_at_a_time(cpu_ext, case, mode):
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
    for step in range(8):  # HVP on calls 0, 1, 4, 7
        active = (lambda i: True) if step >= 2 else (lambda i: i not in late)
        hvp = ref.should_create_graph()
        assert hvp == cpu.should_create_graph()
        for opt, ps in ((ref, ref_params), (cpu, cpu_params)):
            opt.zero_grad(set_to_none=True)
            loss_of(ps, coeffs, active).backward(create_graph=hvp)
        before = {i: (p.detach().clone(), {k: v.clone() for k, v in ref.state[p].items()}) for i, p in enumerate(ref_params)}
        grads = [None if p.grad is None else p.grad.detach().clone() for p in ref_params]
        ref.step()
        cpu.step()
        for i, (rp, cp) in enumerate(zip(ref_params, cpu_params)):
            rs, cs = ref.state[rp], cpu.state[cp]
            if grads[i] is None:
                assert not cs or float(cs["step"]) == float(rs.get("step", 0)), i
                continue
            for key in ("step", "exp_avg_bias_corr", "exp_avg_d_bias_corr", "lr_warmup_cumprod"):
                assert cs[key].dtype == rs[key].dtype and float(cs[key]) == float(rs[key]), (step, i, key)
            p0, s0 = before[i]
            g = grads[i].float()
            m0 = s0["exp_avg"].float() if "exp_avg" in s0 else torch.zeros_like(g)
            d0 = s0["exp_avg_d"].float() if "exp_avg_d" in s0 else torch.zeros_like(g)
            m, d = rs["exp_avg"].float(), rs["exp_avg_d"].float()
            check(cs["exp_avg"], rs["exp_avg"], m0.abs() + g.abs(), f"step {step} tensor {i} exp_avg")
            h2 = (2 * coeffs[i].float() * p0.float()) ** 2  # |hvp|² (|z| = 1)
            check(cs["exp_avg_d"], rs["exp_avg_d"], d0.abs() + (h2 if hvp else 0), f"step {step} tensor {i} exp_avg_d")
            group = ref.param_groups[0 if i < split else 1]
            lr, (b1, b2) = group["lr"], group["betas"]
            v = b1 if group["v"] is None or group["variant"] == "max" else group["v"]
            bc1, bc2, cum = (float(rs[k]) for k in ("exp_avg_bias_corr", "exp_avg_d_bias_corr", "lr_warmup_cumprod"))
            step_size = lr * (1 - cum)
            coef = step_size / (1 - bc1 * v)
            corr = 1.0 if group["variant"] == "max" else math.sqrt(max(1 - bc2, 1e-300))
            denom = d.double().sqrt() / corr + group["eps"]
            bound = p0.float().abs() + rp.detach().float().abs() + (coef * (m.abs() + g.abs() + m0.abs()) / denom).float()
            check(cp.detach(), rp.detach(), bound, f"step {step} tensor {i} param")
            if bc2 == 1.0:  # not started: the param must not move at all
                assert torch.equal(cp.detach(), p0) and torch.equal(rp.detach(), p0), (step, i)
            # reset the cpu side to the reference (one-step comparisons)
            with torch.no_grad():
                cp.copy_(rp)
                cs["exp_avg"].copy_(rs["exp_avg"])
                cs["exp_avg_d"].copy_(rs["exp_avg_d"])
    assert all(torch.isfinite(p).all() for p in cpu_params)


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
