"""fastmup.kernels.adam: MuAdam / MuAdamW with backend="triton" against the eager reference."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("triton")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import fastmup  # noqa: E402
from fastmup.kernels import _common, adam as kernel  # noqa: E402
from fastmup.optim import MuAdam, MuAdamW  # noqa: E402

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
    infshape,
    launches,
    make_params,
    set_grads,
    sync,
    tensor_specs,
    twin,
)

KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
BLOCK, TILE = kernel.BLOCK, kernel.TILE


# ----------------------------------------------------------------------
# random tensor sets, groups and dtypes against eager
# ----------------------------------------------------------------------
@st.composite
def adam_cases(draw):
    """Up to 3 groups with independent hyperparameters (β = 0 included,
    amsgrad / maximize / decoupled decay on some groups only)."""
    specs = draw(tensor_specs(BLOCK, TILE))
    n = len(specs)
    dtypes, state_dtype = draw_dtypes(draw, n)
    ngroups, assign = draw_assignment(draw, n)
    groups = [
        dict(
            lr=draw(st.sampled_from([1e-3, 1e-2, 0.1])),
            weight_decay=draw(st.sampled_from([0.0, 0.01, 0.1])),
            betas=(draw(st.sampled_from([0.0, 0.5, 0.9])), draw(st.sampled_from([0.0, 0.9, 0.999]))),
            eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
            amsgrad=draw(st.booleans()),
            maximize=draw(st.booleans()),
            decoupled_weight_decay=draw(st.booleans()),  # Adam and AdamW groups in one launch
            decoupled_wd=draw(st.booleans()),
        )
        for _ in range(ngroups)
    ]
    return dict(specs=specs, dtypes=dtypes, state_dtype=state_dtype, groups=groups, assign=assign, **draw_extras(draw, n))


@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=adam_cases())
def test_matches_eager(case):
    """STEPS steps, each one launch per dtype signature, each compared with
    eager (params, state, step counts) and then synchronised: the kernel's
    own state feeds its next step, and every comparison is one step deep."""
    fused_params = make_params(case["specs"], case["dtypes"], seed=case["seed"])
    eager_params = twin(fused_params)
    fused = build_optimizer(MuAdam, fused_params, case, "triton")
    eager = build_optimizer(MuAdam, eager_params, case, "eager")
    for step in range(STEPS):
        set_grads([fused_params, eager_params], seed=case["seed"] + step, scales=case["grad_scales"], missing=case["missing"][step])
        before = launches("adam")
        fused.step()
        eager.step()
        assert launches("adam") - before == expected_launches(fused_params)
        compare_optimizers(fused, eager, fused_params, eager_params, KEYS)
        sync(fused, eager, fused_params, eager_params)


# ----------------------------------------------------------------------
# bf16 / fp16 (one rounding of the fp32 computation), conversions, alignment
# ----------------------------------------------------------------------
SPECS = [((BLOCK + 1,), [None]), ((33, 65), [8, 16]), ((TILE - 1,), [100]), ((1,), [None])]


@pytest.mark.parametrize("dtype,state_dtype", [(torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_low_precision_is_one_rounding_of_fp32(dtype, state_dtype, amsgrad):
    """One step from the same start: the bf16/fp16 result is the fp32 result
    rounded once (at most one storage ulp apart; fp32 state within fp32 ulps)."""
    params = make_params(SPECS, [dtype] * len(SPECS), seed=3)
    ref_params = twin(params, torch.float32)
    kw = dict(lr=0.05, weight_decay=0.1, amsgrad=amsgrad)
    fused = MuAdamW(params, backend="triton", state_dtype=state_dtype, **kw)
    ref = MuAdamW(ref_params, backend="eager", **kw)
    set_grads([params], seed=4)
    for p, q in zip(params, ref_params):
        q.grad = p.grad.float()  # the same (rounded) grads, in fp32
    fused.step()
    ref.step()
    for i, (p, q) in enumerate(zip(params, ref_params)):
        assert_within_one_rounding(p.detach(), q.detach(), f"param {i}")
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
            got, want = fused.state[p][key], ref.state[q][key]
            if got.dtype == torch.float32:
                assert_fp32_close(got, want, f"param {i} {key}")
            else:
                assert_within_one_rounding(got, want, f"param {i} {key}")


@triton.jit
def _convert_kernel(src_ptr, dst_ptr, n, SRC: tl.constexpr, DST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = _common.upcast(tl.load(src_ptr + offs, mask=mask), SRC)
    tl.store(dst_ptr + offs, _common.downcast(x, DST), mask=mask)


def _same_bits(a, b):
    ints = {4: torch.int32, 2: torch.int16}
    return (a.view(ints[a.element_size()]) == b.view(ints[b.element_size()])) | (a.isnan() & b.isnan())


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy, on purpose (-> inf)
def test_storage_conversions_are_torchs():
    """Every bf16 loads exactly; fp32 stores to bf16/fp16 round to nearest
    even like torch (ties, subnormals, overflow to inf, nan), bit for bit.
    (Triton's interpreter truncates fp32 -> bf16 and mis-loads bf16
    subnormals: the kernels' own conversions must not.)"""
    every_bf16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).to(DEVICE)
    out = torch.empty(every_bf16.shape, dtype=torch.float32, device=DEVICE)
    _convert_kernel[(64,)](every_bf16, out, every_bf16.numel(), SRC=tl.bfloat16, DST=tl.float32, BLOCK=1024)
    assert _same_bits(out, every_bf16.float()).all()
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([
        torch.randn(4096, generator=gen) * 3,
        torch.randint(-(2**31), 2**31 - 1, (4096,), generator=gen, dtype=torch.int32).view(torch.float32),  # any bits
        1 + torch.arange(1, 64) * 2.0**-9,  # bf16 ties and near-ties around 1
        torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-40, -3e-39, 3.39e38, 65519.0, 65520.0, 6e-8, 2.0**-25]),
    ]).to(DEVICE)
    for tl_dtype, dtype in ((tl.bfloat16, torch.bfloat16), (tl.float16, torch.float16)):
        out = torch.empty(values.shape, dtype=dtype, device=DEVICE)
        _convert_kernel[(triton.cdiv(values.numel(), 1024),)](values, out, values.numel(), SRC=tl.float32, DST=tl_dtype, BLOCK=1024)
        assert _same_bits(out, values.to(dtype)).all(), dtype


@triton.jit
def _bias_division_kernel(x_ptr, d_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    d = tl.load(d_ptr + offs, mask=mask, other=1.0)
    tl.store(out_ptr + offs, kernel._div_bias_correction(x, d, tl.div_rn(1.0, d)), mask=mask)


def _near_midpoint_pairs(significands):
    """``(x, d)`` significand pairs in ``[1, 2)`` (``d`` from the odd integers
    ``significands`` in ``[2^23, 2^24)``, over 2^23) whose quotient lies within
    the one-correction division's error bound of a rounding boundary: the
    only pairs where it could round differently from ``x / d``.

    With ``y = RN(1/d)`` and ``e = |1 - d·y|`` the corrected quotient is
    ``x/d + (q0 - x/d)·(1 - d·y)`` before its rounding, ``|q0 - x/d| <=
    2^-24 + (x/d)·e``; a midpoint ``m = M·2^-25`` is within that of ``x/d``
    only if ``|X·2^25 - M·D| <= K`` (``x = X·2^-23``, ``d = D·2^-23``), and
    for each residue ``r`` in ``[-K, K]`` the congruence ``M·D = -r (mod 2^25)``
    has one solution ``M`` per 2^25."""
    xs, ds = [], []
    for D in significands:
        d = np.float32(D * 2.0**-23)
        y = np.float32(1.0) / d
        e = abs(1.0 - float(d) * float(y))  # exact in float64
        K = math.ceil(float(d) * (2.0**-24 + 2.0 / float(d) * e) * e * 2.0**48) + 1
        inverse = pow(int(D), -1, 2**25)
        for r in range(-K, K + 1):
            M = (-r * inverse) % 2**25
            for M in (M, M + 2**25):
                X, rest = divmod(M * int(D) + r, 2**25)
                if 2**24 < M < 2**26 and rest == 0 and 2**23 <= X < 2**24:
                    xs.append(X * 2.0**-23)
                    ds.append(float(d))
    return xs, ds


def test_bias_correction_division_is_ieee():
    """``_div_bias_correction`` is ``x / d`` bit for bit on its domain (``x``
    a square root, ``d = sqrt(1 - β2^t)``): the special values, pairs
    whose quotient is near a rounding boundary (where one correction step
    could go wrong; significands of ``d`` just below 1 and 2 included),
    scaled over the domain's exponents, and square roots of random fp32
    values over random bias corrections."""
    gen = np.random.default_rng(0)
    odd = np.concatenate([
        (2**24 - 1 - 2 * np.arange(256)),  # d just below 2 (and 1): the largest reciprocal errors
        (2**23 + 1 + 2 * np.arange(256)),
        gen.integers(2**22, 2**23, 2048) * 2 + 1,
    ])
    xs, ds = _near_midpoint_pairs(odd)
    assert len(xs) > 3 * len(odd)
    x = np.array(xs, dtype=np.float32) * np.exp2(gen.integers(-74, 64, len(xs))).astype(np.float32)
    d = np.array(ds, dtype=np.float32) * np.exp2(gen.integers(-27, 1, len(ds))).astype(np.float32)
    bc2 = [math.sqrt(1 - b**t) for b in (0.0, 0.9, 0.999, 0.99999, 1 - 2**-52) for t in (1, 2, 3, 10, 1000, 10**6)]
    special = [0.0, -0.0, float("inf"), float("nan"), math.sqrt(2.0**-149), math.sqrt(3.4028234e38), 1.0, 3.0]
    sx, sd = zip(*[(a, b) for a in special for b in bc2 + [0.0, 1.0, 2.0**-27]])
    v = gen.integers(0, 0x7F800001, 100_000, dtype=np.uint32).view(np.float32)  # any value >= 0, inf included
    x = np.concatenate([x, np.array(sx, dtype=np.float32), np.sqrt(v)])
    d = np.concatenate([d, np.array(sd, dtype=np.float32), np.array(bc2, dtype=np.float32)[gen.integers(0, len(bc2), len(v))]])
    x, d = torch.from_numpy(x).to(DEVICE), torch.from_numpy(d).to(DEVICE)
    out = torch.empty_like(x)
    _bias_division_kernel[(triton.cdiv(x.numel(), 1024),)](x, d, out, x.numel(), BLOCK=1024)
    assert _same_bits(out, x / d).all()


def test_unaligned_params_take_the_unhinted_path():
    """A param that is a view at an odd offset (not 16-byte aligned) turns the
    alignment hints off for its batch, and the results stay eager's."""
    storage = torch.randn(3 + BLOCK + 5, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    odd = nn.Parameter(storage[3:])  # contiguous, 12 bytes past an aligned address
    odd.infshape = infshape(odd.shape, [None])
    params = [odd] + make_params(SPECS[1:], [torch.float32] * 3, seed=6)
    eager_params = twin(params)
    fused, eager = MuAdam(params, lr=0.01, backend="triton"), MuAdam(eager_params, lr=0.01, backend="eager")
    for step in range(2):
        set_grads([params, eager_params], seed=step)
        fused.step()
        eager.step()
    assert odd.data_ptr() % 16 != 0 and not fused._batches[0].launch_plan(kernel.BLOCK).aligned
    compare_optimizers(fused, eager, params, eager_params, KEYS)
    aligned = make_params(SPECS, [torch.float32] * len(SPECS), seed=6)
    other = MuAdam(aligned, lr=0.01, backend="triton")
    set_grads([aligned], seed=0)
    other.step()
    assert other._batches[0].launch_plan(kernel.BLOCK).aligned


# ----------------------------------------------------------------------
# AMP
# ----------------------------------------------------------------------
def _pair(specs=SPECS, dtype=torch.float32, **kw):
    params = make_params(specs, [dtype] * len(specs), seed=5)
    eager_params = twin(params)
    return params, eager_params, MuAdam(params, backend="triton", **kw), MuAdam(eager_params, backend="eager", **kw)


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], [{k: v.clone() for k, v in opt.state[p].items()} for p in params]


def test_grad_scale_divides_grads():
    """grad_scale = 1024 with grads x 1024 is the unscaled step (power of two:
    the division is exact), and matches eager given the same grad_scale."""
    params, eager_params, fused, eager = _pair(lr=0.01, amsgrad=True)
    plain_params = twin(params)
    plain = MuAdam(plain_params, backend="triton", lr=0.01, amsgrad=True)
    scale = torch.tensor(1024.0, device=DEVICE)
    for step in range(STEPS):
        set_grads([params, eager_params], seed=step, scales=[1024.0] * len(params))
        set_grads([plain_params], seed=step)
        fused.grad_scale = eager.grad_scale = scale
        fused.step()
        eager.step()
        plain.step()
    compare_optimizers(fused, eager, params, eager_params, KEYS)
    for p, q in zip(params, plain_params):
        assert torch.equal(p, q)


@pytest.mark.parametrize("scale", [3.0, 1000.0])
def test_any_grad_scale_matches_eager(scale):
    """A grad_scale that is not a power of two takes the kernel's dividing
    pass (powers of two multiply by the exact reciprocal): eager's results."""
    params, eager_params, fused, eager = _pair(lr=0.01, weight_decay=0.1, amsgrad=True)
    for step in range(STEPS):
        set_grads([params, eager_params], seed=step, scales=[scale] * len(params))
        fused.grad_scale = eager.grad_scale = torch.tensor(scale, device=DEVICE)
        fused.step()
        eager.step()
    compare_optimizers(fused, eager, params, eager_params, KEYS)


def test_found_inf_skips_everything_on_device():
    params, eager_params, fused, eager = _pair(lr=0.01, weight_decay=0.1, amsgrad=True)
    for step in range(2):
        set_grads([params, eager_params], seed=step)
        fused.step()
        eager.step()
    values, state = _snapshot(fused, params)
    # A step whose grads overflowed: inf everywhere, found_inf = 1.
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    fused.grad_scale = torch.tensor([65536.0], device=DEVICE)
    fused.found_inf = torch.tensor([1.0], device=DEVICE)
    before = launches("adam")
    fused.step()
    assert launches("adam") == before + 1  # the skip happens inside the launch: no host sync
    for p, v, s in zip(params, values, state):
        assert torch.equal(p, v)
        for k in s:
            assert torch.equal(fused.state[p][k], s[k]), k  # incl. step: not advanced
    # found_inf = 0: an ordinary step again, in step with eager.
    fused.found_inf = torch.tensor([0.0], device=DEVICE)
    fused.grad_scale = None
    set_grads([params, eager_params], seed=2)
    fused.step()
    eager.step()
    compare_optimizers(fused, eager, params, eager_params, KEYS)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="GradScaler('cpu') run")
def test_grad_scaler_end_to_end():
    """torch.amp.GradScaler drives both backends identically, including a
    skipped step (an inf in a grad) and the scale update after it."""
    torch.manual_seed(0)
    models = []
    for backend in ("triton", "eager"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        for p in model.parameters():
            p.infshape = infshape(p.shape, [None] * p.dim())
        opt = MuAdam(model.parameters(), lr=0.01, backend=backend)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        models.append((model, opt, scaler))
    x = torch.randn(8, 6)
    for step in range(STEPS):
        for model, opt, scaler in models:
            opt.zero_grad()
            loss = model(x).square().mean()
            scaler.scale(loss).backward()
            if step == 1:
                model[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
    (a, oa, sa), (b, ob, sb) = models
    assert sa.get_scale() == sb.get_scale() == 2.0**9  # one skipped step halved the scale
    compare_optimizers(oa, ob, list(a.parameters()), list(b.parameters()), KEYS)
    assert float(oa.state[a[0].weight]["step"]) == STEPS - 1


# ----------------------------------------------------------------------
# grads missing, empty tensors
# ----------------------------------------------------------------------
def test_params_without_grad_and_empty_params():
    specs = [((0,), [None]), ((5,), [None]), ((7,), [None]), ((0, 3), [None, None])]
    params, eager_params, fused, eager = _pair(specs, lr=0.1)
    frozen = params[2].detach().clone()
    for step in range(STEPS):
        set_grads([params, eager_params], seed=step, missing={2})
        fused.step()
        eager.step()
    assert torch.equal(params[2], frozen) and params[2] not in fused.state
    assert fused.state[params[0]]["exp_avg"].shape == (0,)
    compare_optimizers(fused, eager, params, eager_params, KEYS)
    # A step where only empty tensors have grads: a batch with no blocks, no launch.
    set_grads([params], seed=9, missing={1, 2})
    before = launches("adam")
    fused.step()
    assert launches("adam") == before


# ----------------------------------------------------------------------
# one launch per dtype signature; the plan is cached
# ----------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.inp = nn.Linear(6, width)
        self.hidden = nn.Linear(width, 2 * width)
        self.hidden2 = nn.Linear(2 * width, width, bias=False)
        self.norm = nn.LayerNorm(width)
        self.out = fastmup.MuReadout(width, 3)

    def forward(self, x):
        x = torch.relu(self.hidden(torch.relu(self.inp(x))))
        return self.out(self.norm(self.hidden2(x)))


def mup_model(width: int = 32) -> nn.Module:
    torch.manual_seed(0)
    model = MLP(width)
    fastmup.set_base_shapes(model, MLP(8), delta=MLP(16))
    return model.to(DEVICE)


def twin_model(model: nn.Module) -> nn.Module:
    other = copy.deepcopy(model)
    for p, q in zip(model.parameters(), other.parameters()):
        q.infshape = p.infshape
    return other


def many_groups(model: nn.Module, lr: float = 1e-2):
    """Four groups with different hyperparameters over matrices, vectors and the readout."""
    named = dict(model.named_parameters())
    return [
        dict(params=[named["hidden.weight"], named["hidden2.weight"]], lr=lr, weight_decay=0.1, amsgrad=True),
        dict(params=[named["inp.weight"], named["inp.bias"]], lr=2 * lr, betas=(0.8, 0.95), maximize=True),
        dict(params=[named["hidden.bias"], named["norm.weight"], named["norm.bias"]], lr=lr / 3, eps=1e-6, decoupled_weight_decay=True, weight_decay=0.05),
        dict(params=[named["out.weight"], named["out.bias"]], lr=lr, decoupled_wd=True, weight_decay=0.01),
    ]


def _backward(model, seed):
    torch.manual_seed(seed)
    model(torch.randn(4, 6, device=DEVICE)).square().mean().backward()


def test_one_launch_for_many_groups_and_multipliers():
    model = mup_model()
    ref = twin_model(model)
    opt = MuAdam(many_groups(model), backend="triton")
    ref_opt = MuAdam(many_groups(ref), backend="eager")
    assert len({p.infshape.width_mult() for p in model.parameters()}) > 1  # several μP multipliers
    for step in range(STEPS):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            _backward(m, step)
        before = launches("adam")
        opt.step()
        ref_opt.step()
        assert launches("adam") - before == 1
    compare_optimizers(opt, ref_opt, list(model.parameters()), list(ref.parameters()), KEYS)


def test_mixed_precision_model_is_two_launches():
    model = mup_model()
    model.hidden.to(torch.bfloat16)  # bf16 weights and bias keep their infshape
    model.norm.to(torch.bfloat16)
    params = list(model.parameters())
    opt = MuAdam(params, lr=1e-2, backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    before = launches("adam")
    opt.step()
    assert launches("adam") - before == 2
    assert sorted(str(b.signature.param_dtype) for b in opt._batches) == ["torch.bfloat16", "torch.float32"]


def test_replay_rebuilds_nothing_and_replans_when_needed():
    model = mup_model()
    ref = twin_model(model)
    opt = MuAdam(many_groups(model), backend="triton")
    ref_opt = MuAdam(many_groups(ref), backend="eager")

    def step(seed, zero=False):
        for m, o in ((model, opt), (ref, ref_opt)):
            if zero:
                o.zero_grad(set_to_none=True)
                _backward(m, seed)
            else:  # same grad tensors, new values
                with torch.no_grad():
                    for p in m.parameters():
                        torch.manual_seed(seed)
                        p.grad.copy_(torch.randn_like(p))
        opt.step()
        ref_opt.step()

    for m in (model, ref):
        _backward(m, 0)
    step(0)
    batches = list(opt._batches)
    plans = [b.launch_plan(kernel.BLOCK) for b in batches]
    rows = [b.device_rows() for b in batches]
    step(1)
    assert all(a is b for a, b in zip(opt._batches, batches))  # no re-plan
    assert all(b.launch_plan(kernel.BLOCK) is p for b, p in zip(batches, plans))  # no rebuilt pointers / maps
    # A new lr: same batches, same plan, same device table, new values in it.
    old = [r.clone() for r in rows]
    for o in (opt, ref_opt):
        o.param_groups[1]["lr"] *= 0.5
    step(2)
    assert all(a is b for a, b in zip(opt._batches, batches))
    assert all(b.device_rows() is r for b, r in zip(batches, rows))
    assert any(not torch.equal(r, o) for r, o in zip(rows, old))
    compare_optimizers(opt, ref_opt, list(model.parameters()), list(ref.parameters()), KEYS)
    # zero_grad(set_to_none=True) + backward: new grad tensors.  The plans
    # stay; the grad row of their pointer tables follows the new addresses.
    for t in (3, 4):
        step(t, zero=True)
        assert all(a is b for a, b in zip(opt._batches, batches))
        assert all(b.launch_plan(kernel.BLOCK) is p for b, p in zip(batches, plans))
        for b, p in zip(batches, plans):
            assert p.pointers[1].tolist() == [q.grad.data_ptr() for q in b.owners]
        compare_optimizers(opt, ref_opt, list(model.parameters()), list(ref.parameters()), KEYS)
    # a param without a gradient this step: the same plan, that tensor skipped
    for t in (5, 6):
        for o in (opt, ref_opt):
            o.zero_grad(set_to_none=True)
        for m in (model, ref):
            _backward(m, t)
            if t == 5:
                next(m.parameters()).grad = None
        opt.step()
        ref_opt.step()
        assert all(a is b for a, b in zip(opt._batches, batches))
        assert all(b.launch_plan(kernel.BLOCK) is p for b, p in zip(batches, plans))
        compare_optimizers(opt, ref_opt, list(model.parameters()), list(ref.parameters()), KEYS)


# ----------------------------------------------------------------------
# state_dict interoperability
# ----------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(lr=1e-2), dict(lr=1e-2, weight_decay=0.1, amsgrad=True), dict(lr=1e-2, betas=(0.5, 0.9), maximize=True)], ids=str)
@pytest.mark.parametrize("decoupled", [False, True], ids=["Adam", "AdamW"])
def test_state_dict_round_trip_with_eager_and_torch(kw, decoupled):
    """triton -> eager fastmup and torch.optim, then torch -> triton, each
    continuing like the optimizer it came from (width == base: μP is plain Adam)."""
    ours, theirs = (MuAdamW, torch.optim.AdamW) if decoupled else (MuAdam, torch.optim.Adam)
    specs = [((17, 65), [None, None]), ((BLOCK + 1,), [None]), ((3,), [None])]
    params = make_params(specs, [torch.float32] * 3, seed=7)
    fused = ours(params, backend="triton", **kw)
    for step in range(2):
        set_grads([params], seed=step)
        fused.step()
    saved = copy.deepcopy(fused.state_dict())  # as torch.save / torch.load would
    copies = {name: twin(params) for name in ("eager", "torch")}
    others = {"eager": ours(copies["eager"], backend="eager", **kw), "torch": theirs(copies["torch"], **kw)}
    for opt in others.values():
        opt.load_state_dict(copy.deepcopy(saved))
    for step in range(2, 4):
        set_grads([params, copies["eager"], copies["torch"]], seed=step)
        fused.step()
        for opt in others.values():
            opt.step()
    compare_optimizers(fused, others["eager"], params, copies["eager"], KEYS)
    compare_optimizers(fused, others["torch"], params, copies["torch"], KEYS)
    # ... and back: torch's state continues under the triton backend.
    back_params = twin(copies["torch"])
    back = ours(back_params, backend="triton", **kw)
    back.load_state_dict(copy.deepcopy(others["torch"].state_dict()))
    for step in range(4, 6):
        set_grads([back_params, copies["torch"]], seed=step)
        back.step()
        others["torch"].step()
    compare_optimizers(back, others["torch"], back_params, copies["torch"], KEYS)
