"""ESGD-M (eager reference): closed form, schedule, errors, resumption, probes, μP.

The Triton backend is tested against this reference in tests/kernels/test_esgd.py.
"""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmup
from fastmup.infshape import InfDim, InfShape
from fastmup.optim import ESGD, MuESGD
from fastmup.optim import rademacher
from fastmup.optim.esgd import esgd, esgd_per_tensor_torch
from fastmup.optim.multipliers import mup_multipliers

from .conftest import build, clone

# torch warns once per create_graph backward about the param <-> grad cycle;
# the tests reset grads to None, which breaks it.
pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")

HVP_CALLS = [*range(20), 29, 39, 49, 59]  # defaults: d_warmup=20, update_d_every=10


# ----------------------------------------------------------------------------
# the separable quadratic: hvp² = a² whatever the probe, so the trajectory is
# deterministic and has a closed form (written here independently, in numpy)
# ----------------------------------------------------------------------------
A = np.array([0.5, 2.0, 3.0, 0.1, 1.0, 7.0, 0.02, 12.0])
W0 = np.array([1.0, -2.0, 0.5, 3.0, -1.0, 0.25, 4.0, -0.75])
QUAD = dict(lr=0.05, betas=(0.8, 0.95), lr_warmup=0.9, eps=1e-3, weight_decay=0.05)


def closed_form(steps, *, variant, lr, betas, lr_warmup, eps, weight_decay, v=None, d_warmup=20, update_d_every=10):
    """float64 trajectory of ESGD-M on L = ½ Σ a w², and the calls that ran an HVP."""
    b1, b2 = betas
    v = b1 if (v is None or variant == "max") else v
    w = W0.copy()
    m = np.zeros_like(w)
    d = np.zeros_like(w)
    bc1 = bc2 = cum = 1.0
    calls = []
    for t in range(steps):
        hvp = t < d_warmup or (t > d_warmup - 1 and (t - (d_warmup - 1)) % update_d_every == 0)
        if hvp:
            calls.append(t)
        g = A * w
        m = b1 * m + (1 - b1) * g
        bc1 *= b1
        if hvp:
            d = b2 * d + (1 - b2) * A**2 if variant == "ema" else np.maximum(b2 * d, A**2)
            bc2 *= b2
        if variant == "ema" or hvp:
            cum *= lr_warmup
        if bc2 == 1.0:
            continue
        corr = math.sqrt(1 - bc2) if variant == "ema" else 1.0
        step_size = lr * (1 - cum)
        w = w * (1 - weight_decay * step_size) - step_size / (1 - bc1 * v) * (v * m + (1 - v) * g) / (np.sqrt(d) / corr + eps)
    return w, calls


def run_quadratic(backend, dtype, steps=60, **kw):
    w = nn.Parameter(torch.tensor(W0, dtype=dtype))
    a = torch.tensor(A, dtype=dtype)
    opt = ESGD([w], backend=backend, **kw)
    calls = []
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        hvp = opt.should_create_graph()
        if hvp:
            calls.append(t)
        (0.5 * (a * w * w).sum()).backward(create_graph=hvp)
        opt.step()
    return w.detach().double().numpy(), calls, opt


QUAD_CASES = [
    dict(variant="ema", v=0.6, **QUAD),
    dict(variant="ema", **QUAD),  # v = beta1: Nesterov
    dict(variant="max", **QUAD),
]


@pytest.mark.parametrize("kw", QUAD_CASES, ids=lambda kw: f"{kw['variant']}-v{kw.get('v')}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_quadratic_closed_form(kw, dtype):
    w, calls, _ = run_quadratic("eager", dtype, **kw)
    expected, expected_calls = closed_form(60, **kw)
    assert calls == expected_calls == HVP_CALLS
    assert np.abs(expected).max() > 0.1  # the trajectory has not collapsed to 0
    # float64: the reference computes in float64 (measured 3e-17 of max|w0|).
    # float32: each step rounds w once (half an ulp) and its update by a few
    # ulps of the update; the map contracts, so the error stays near one ulp
    # of max|w| (measured 6e-8 of max|w0|); 5e-7 is an 8x margin and far
    # below any wrong term (a missing bias correction or warm-up moves w by >1e-3).
    tol = 1e-14 if dtype == torch.float64 else 5e-7
    np.testing.assert_allclose(w, expected, rtol=0, atol=tol * np.abs(W0).max())


def test_hvp_schedule():
    w = nn.Parameter(torch.zeros(2))
    opt = ESGD([w], update_d_every=3, d_warmup=2)
    seen = []
    for t in range(12):
        seen.append(opt.should_create_graph())
        opt.step()  # no grad: only the counters move
    assert [t for t, s in enumerate(seen) if s] == [0, 1, 4, 7, 10]
    opt = ESGD([w], update_d_every=1, d_warmup=1)
    for _ in range(4):
        assert opt.should_create_graph()
        opt.step()


@pytest.mark.parametrize("variant", ["ema", "max"])
def test_no_update_before_a_tensors_first_hvp(variant):
    """The seed divides 0/0 for a param whose first step is not an HVP step;
    fastmup leaves it untouched until its first HVP (no NaN)."""
    a = nn.Parameter(torch.tensor([1.0, -2.0]))
    b = nn.Parameter(torch.tensor([0.5, 3.0]))
    opt = ESGD([a, b], lr=0.1, lr_warmup=0.5, weight_decay=0.1, variant=variant, d_warmup=2, update_d_every=3)
    for t in range(8):  # HVP calls: 0, 1, 4, 7
        opt.zero_grad(set_to_none=True)
        use_b = t >= 2
        loss = (a**2).sum() + ((b**4).sum() if use_b else 0.0)
        loss.backward(create_graph=opt.should_create_graph())
        before = b.detach().clone()
        opt.step()
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        if t in (2, 3):  # b has a gradient but has not seen an HVP yet
            assert torch.equal(b, before), t
            assert opt.state[b]["exp_avg_d_bias_corr"].item() == 1.0
        if t == 4:
            assert not torch.equal(b, before)
    st = opt.state[b]
    assert st["step"].item() == 6
    assert st["exp_avg_bias_corr"].item() == pytest.approx(0.9**6)
    assert st["exp_avg_d_bias_corr"].item() == pytest.approx(0.999**2)
    expected_cum = 0.5**6 if variant == "ema" else 0.5**2  # max: warm-up counts HVP steps
    assert st["lr_warmup_cumprod"].item() == pytest.approx(expected_cum)


def test_state_layout_and_dtypes():
    model = build("mlp", 16)
    opt = MuESGD(model.parameters(), state_dtype=torch.bfloat16)
    model(torch.randn(2, 12)).logsumexp(-1).sum().backward(create_graph=True)
    opt.step()
    st = opt.state[model.hidden.weight]
    assert set(st) == {"exp_avg", "exp_avg_d", "step", "exp_avg_bias_corr", "exp_avg_d_bias_corr", "lr_warmup_cumprod"}
    assert st["exp_avg"].dtype == st["exp_avg_d"].dtype == torch.bfloat16
    assert st["step"].dtype == torch.float32
    for key in ("exp_avg_bias_corr", "exp_avg_d_bias_corr", "lr_warmup_cumprod"):
        assert st[key].dtype == torch.float64 and st[key].dim() == 0
    assert st["exp_avg_bias_corr"].item() == 0.9 and st["lr_warmup_cumprod"].item() == 0.99


# ----------------------------------------------------------------------------
# bad input: a clear error, params and optimizer state unchanged
# ----------------------------------------------------------------------------
def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _assert_unchanged(model, opt, snap):
    params, sd = snap
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    now = opt.state_dict()
    assert now["esgd"] == sd["esgd"]
    assert now["state"].keys() == sd["state"].keys()
    for k in now["state"]:
        for name, value in now["state"][k].items():
            assert torch.equal(value, sd["state"][k][name]), (k, name)


def _mlp_loss(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.cross_entropy(model(torch.randn(8, 12, generator=g)), torch.randint(0, 5, (8,), generator=g))


@pytest.mark.parametrize("trained_steps", [0, 20])  # 20: the next call (20) is not an HVP step
def test_missing_create_graph_is_a_clear_error(trained_steps):
    model = build("mlp", 16)
    opt = MuESGD(model.parameters(), lr=0.1)
    for t in range(trained_steps):
        opt.zero_grad(set_to_none=True)
        _mlp_loss(model, t).backward(create_graph=opt.should_create_graph())
        opt.step()
    while not opt.should_create_graph():  # walk to the next HVP step
        opt.zero_grad(set_to_none=True)
        _mlp_loss(model).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    _mlp_loss(model).backward()  # forgot create_graph
    snap = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"create_graph.*should_create_graph"):
        opt.step()
    _assert_unchanged(model, opt, snap)


def test_gradient_accumulation_without_graph_is_a_clear_error():
    model = build("mlp", 16)
    opt = MuESGD(model.parameters(), lr=0.1)
    _mlp_loss(model, 0).backward()
    _mlp_loss(model, 1).backward()  # accumulated, neither with a graph
    snap = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match="create_graph"):
        opt.step()
    _assert_unchanged(model, opt, snap)
    assert opt.state == {}  # not even initialised


def test_sparse_gradients_are_refused():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = ESGD(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight, before) and opt.state[emb.weight] == {} and opt.steps == 0


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(1.0, 0.9)), r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (dict(v=1.5), "v="),
        (dict(lr_warmup=1.0), "lr_warmup"),
        (dict(eps=-1.0), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(update_d_every=0), "update_d_every"),
        (dict(d_warmup=0), "d_warmup"),
        (dict(variant="adam"), "variant"),
        (dict(variant="max", v=0.5), "Nesterov"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_invalid_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        ESGD([nn.Parameter(torch.zeros(3))], **kw)


def test_compiled_backends_are_accepted():
    """csrc has ESGD-M (tests/ext/test_esgd_cpu.py): backend='cpu' works and
    'auto' resolves on CPU as for Adam (cpu when the host module can be built)."""
    from fastmup import ext

    if not ext.available("cpu"):
        pytest.skip("the cpu backend cannot be built here")
    assert ESGD([nn.Parameter(torch.zeros(3))], backend="cpu").backend == "cpu"
    assert ESGD([nn.Parameter(torch.zeros(3))]).backend == "cpu"  # auto on CPU


# ----------------------------------------------------------------------------
# resumption, probes, RNG independence
# ----------------------------------------------------------------------------
def _train(model, opt, steps, first=0):
    for t in range(first, first + steps):
        opt.zero_grad(set_to_none=True)
        _mlp_loss(model, t).backward(create_graph=opt.should_create_graph())
        opt.step()


@pytest.mark.parametrize("variant", ["ema", "max"])
def test_resumed_run_is_bit_identical(variant):
    model = build("mlp", 16)
    opt = MuESGD(model.parameters(), lr=0.5, weight_decay=0.01, variant=variant, seed=7)
    _train(model, opt, 23)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_opt["esgd"] == dict(steps=23, steps_since_d=4, probe_seed=7, probe_counter=20, update_d_every=10, d_warmup=20)
    _train(model, opt, 17, first=23)

    twin = build("mlp", 16, seed=5)  # other initial weights
    twin.load_state_dict(saved_model)
    opt2 = MuESGD(twin.parameters(), lr=0.5, weight_decay=0.01, variant=variant)  # default seed
    opt2.load_state_dict(saved_opt)
    torch.manual_seed(1234)  # the global RNG plays no part
    _train(twin, opt2, 17, first=23)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert opt2.state_dict()["esgd"] == opt.state_dict()["esgd"]


def test_original_state_dict_format_loads():
    model = build("mlp", 16)
    opt = MuESGD(model.parameters())
    _train(model, opt, 3)
    sd = opt.state_dict()
    del sd["esgd"]
    sd["global_state"] = dict(update_d_every=5, d_warmup=2, steps=30, steps_since_d=4)
    opt.load_state_dict(sd)
    assert (opt.steps, opt.steps_since_d, opt.update_d_every, opt.d_warmup) == (30, 4, 5, 2)
    assert opt.should_create_graph() is False


def test_probes_follow_the_counter_based_generator():
    """The HVP sees exactly fastmup.optim.rademacher's probes: with a
    diagonal quadratic hvp = a·z, so exp_avg_d after one step is (1-β2)·a²
    and the sign pattern can be read off a non-diagonal quadratic."""
    w1 = nn.Parameter(torch.ones(40))
    w2 = nn.Parameter(torch.ones(3, 7))
    opt = ESGD([w1, w2], seed=11, betas=(0.9, 0.0))  # β2 = 0: d = hvp²
    # L = ½ Σ c·w²  +  s·Σw1·Σw2  -> hvp(w1) = c·z1 + s·Σz2
    c1, c2, s = torch.linspace(1, 2, 40), torch.linspace(1, 3, 21).view(3, 7), 0.25
    loss = 0.5 * (c1 * w1**2).sum() + 0.5 * (c2 * w2**2).sum() + s * w1.sum() * w2.sum()
    loss.backward(create_graph=True)
    opt.step()
    z1 = rademacher.rademacher((40,), 11, 0, 0)
    z2 = rademacher.rademacher((3, 7), 11, 0, 1)
    torch.testing.assert_close(opt.state[w1]["exp_avg_d"], (c1 * z1 + s * z2.sum()) ** 2)
    torch.testing.assert_close(opt.state[w2]["exp_avg_d"], (c2 * z2 + s * z1.sum()) ** 2)
    assert opt.probe_counter == 1


def test_training_does_not_touch_the_global_rng():
    model = build("mlp", 16)
    opt = MuESGD(model.parameters())
    state = torch.random.get_rng_state()
    _train(model, opt, 3)
    assert torch.equal(state, torch.random.get_rng_state())


def test_rademacher_torch_path_matches_the_specification():
    for seed, counter, tid in [(0, 0, 0), (2**64 - 1, 2**40 + 3, 17), (123456789, 5, 2**32 - 1)]:
        z = rademacher.rademacher((5, 13), seed, counter, tid, dtype=torch.bfloat16)
        expected = [rademacher.probe_sign(seed, counter, tid, e) for e in range(65)]
        assert z.view(-1).float().tolist() == expected
        # a non-contiguous output is filled in row-major order of its shape
        t = torch.empty(13, 5).t()
        assert torch.equal(rademacher.fill_rademacher_(t, seed, counter, tid), z.float())
    # element indices beyond 2**37 (2**32 words of 32 signs): the high half of the word index
    prefix = rademacher.draw_prefix(3, 4)
    for start in (2**37 - 40, 2**37 + 7):
        got = rademacher._signs(prefix, 9, start, 40, "cpu").tolist()
        assert got == [rademacher.probe_sign(3, 4, 9, start + e) for e in range(40)]


def test_rademacher_statistics():
    """Balanced, and uncorrelated across elements, tensors and draws (±4σ)."""
    n = 1 << 18
    z = rademacher.rademacher((n,), 5, 0, 0)
    others = [z[1:] * z[:-1], z * rademacher.rademacher((n,), 5, 0, 1), z * rademacher.rademacher((n,), 5, 1, 0),
              z * rademacher.rademacher((n,), 6, 0, 0), z[32:] * z[:-32]]
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    for x in [z, *others]:
        assert abs(x.mean().item()) < 4 / math.sqrt(n)


def test_mixing_function_is_the_documented_one():
    assert rademacher.mix32(0) == 0
    x = 0x12345678
    x ^= x >> 16
    x = (x * 0x21F0AAAD) % 2**32
    x ^= x >> 15
    x = (x * 0x735A2D97) % 2**32
    x ^= x >> 15
    assert rademacher.mix32(0x12345678) == x


# ----------------------------------------------------------------------------
# groups, μP multipliers, ESGD without μP, the per-tensor baseline
# ----------------------------------------------------------------------------
def test_esgd_family_multipliers_in_the_table():
    model = build("mlp", 32)  # base 8: m = 4
    opt = MuESGD(model.parameters(), lr=1.0, weight_decay=0.5)
    _train(model, opt, 1)
    batch = opt._batches[0]
    value = {id(p): (batch.value(i, "lr"), batch.value(i, "weight_decay")) for i, p in enumerate(batch.params)}
    assert value[id(model.inp.weight)] == pytest.approx((2.0, 0.25))  # vector-like: η·√m, λ/√m
    assert value[id(model.hidden2.weight)] == pytest.approx((0.5, 1.0))  # hidden: η/√m, λ·√m
    assert value[id(model.out.bias)] == (1.0, 0.5)  # finite
    for p in model.parameters():
        assert value[id(p)] == tuple(m.apply(x) for m, x in zip(mup_multipliers(p.infshape, "esgd"), (1.0, 0.5)))


def test_esgd_without_mup_accepts_plain_params_and_equals_muesgd_at_base_width():
    plain = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 5))
    ESGD(plain.parameters(), param_lr_scales={plain[0].weight: 0.5})  # no infshape needed
    model = build("mlp", 8)  # width == base: μP multipliers are all 1
    twin = clone(model)
    _train(model, MuESGD(model.parameters(), lr=0.3, weight_decay=0.1), 12)
    _train(twin, ESGD(twin.parameters(), lr=0.3, weight_decay=0.1), 12)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_param_groups_with_their_own_variant_and_hyperparameters():
    model = build("mlp", 16)
    groups = [
        {"params": [model.inp.weight, model.inp.bias], "variant": "max", "lr": 0.2},
        {"params": [p for n, p in model.named_parameters() if not n.startswith("inp.")], "v": 0.7, "betas": (0.95, 0.99)},
    ]
    opt = MuESGD(groups, lr=0.5)
    _train(model, opt, 3)
    batch = opt._batches[0]
    i = next(k for k, p in enumerate(batch.params) if p is model.inp.weight)
    j = next(k for k, p in enumerate(batch.params) if p is model.hidden.weight)
    assert batch.value(i, "variant") == 1.0 and batch.value(i, "v") == 0.9
    assert batch.value(j, "variant") == 0.0 and batch.value(j, "v") == 0.7 and batch.value(j, "beta1") == 0.95
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_grad_scale_and_found_inf():
    """AMP: grads and HVPs are divided by grad_scale; found_inf skips the step
    (counters aside) without touching params or per-tensor state."""
    model = build("mlp", 16)
    twin = clone(model)
    opt, ref = MuESGD(model.parameters(), lr=0.3), MuESGD(twin.parameters(), lr=0.3)
    for t in range(3):
        for m, o, scale in ((model, opt, 1024.0), (twin, ref, 1.0)):
            o.zero_grad(set_to_none=True)
            (scale * _mlp_loss(m, t)).backward(create_graph=o.should_create_graph())
            o.grad_scale = torch.tensor(scale)
            o.found_inf = torch.tensor(0.0)
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    snap = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad(set_to_none=True)
    _mlp_loss(model).backward(create_graph=True)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), snap))
    for k, st in opt.state_dict()["state"].items():
        assert all(torch.equal(v, state[k][n]) for n, v in st.items())


def test_per_tensor_baseline_matches_the_optimizer():
    """esgd_per_tensor_torch (the benchmark's unfused baseline) computes the same step."""
    torch.manual_seed(0)
    params = [torch.randn(7, 5), torch.randn(5), torch.randn(0)]
    grads = [torch.randn_like(p) for p in params]
    hvp_seq = [[torch.randn_like(p) for p in params] if t in (0, 1, 4) else None for t in range(6)]
    base = [p.clone() for p in params]
    m, d = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    scal = [dict(exp_avg_bias_corr=1.0, exp_avg_d_bias_corr=1.0, lr_warmup_cumprod=1.0) for _ in params]
    kw = dict(lr=0.5, betas=(0.8, 0.9), v=0.6, lr_warmup=0.7, eps=1e-3, weight_decay=0.1)
    ours = [nn.Parameter(p.clone()) for p in params]
    opt = ESGD(ours, **kw)
    for hv in hvp_seq:
        esgd_per_tensor_torch(base, grads, m, d, scal, hv, **kw)
        for p, g in zip(ours, grads):
            p.grad = g
        # drive the batch entry point directly with the same HVPs
        batches = opt._plan()
        opt._refresh_rows(batches)
        with torch.no_grad():
            esgd(batches[0], backend="eager", hvps=hv)
    for p, q in zip(ours, base):
        torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------
# μP: the coordinate check (docs/esgd_mup.md has the full table)
# ----------------------------------------------------------------------------
D_IN, N_OUT, COORD_BASE = 32, 10, 64
COORD_WIDTHS = (64, 256, 2048)  # 32x; 2048 is most of the test's time


class _CoordMLP(nn.Module):
    """Two hidden (width x width) matrices: every tensor's Hessian row has a
    width-sized block coupling it to a neighbour (see docs/esgd_mup.md for
    the one-hidden-matrix exception)."""

    def __init__(self, width):
        super().__init__()
        self.inp = nn.Linear(D_IN, width)
        self.hidden1 = nn.Linear(width, width)
        self.hidden2 = nn.Linear(width, width)
        self.readout = fastmup.MuReadout(width, N_OUT)

    def forward(self, x):
        x = F.relu(self.inp(x))
        x = F.relu(self.hidden1(x))
        return self.readout(F.relu(self.hidden2(x)))


def coord_check(width, steps=5, family="esgd", seed=0, batch=16):
    """``{layer: (mean |activation|, mean |activation - initial activation|)}``
    on a fixed batch after ``steps`` steps of MuESGD with its default
    hyperparameters (lr 1, warm-up 0.99, eps 1e-4; HVP on every step here)."""
    torch.manual_seed(seed)
    model = _CoordMLP(width)
    fastmup.set_base_shapes(model, _CoordMLP(COORD_BASE), delta=_CoordMLP(2 * COORD_BASE))
    gen = torch.Generator().manual_seed(1000 + seed)
    x, y = torch.randn(batch, D_IN, generator=gen), torch.randint(0, N_OUT, (batch,), generator=gen)
    opt = type("Opt", (MuESGD,), {"family": family})(model.parameters(), seed=seed)
    out = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o.detach())) for n, m in model.named_children()]
    model(x)
    initial = dict(out)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward(create_graph=opt.should_create_graph())
        opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return {n: (out[n].abs().mean().item(), (out[n] - initial[n]).abs().mean().item()) for n in out}


def test_coordinate_check_esgd_mup_rule():
    """Widths 64..2048 (32x) after 5 steps: every layer's mean |coordinate|
    stays within a factor 2 across widths, and so, within 2.5, does its change
    from initialisation (measured: <= 1.6 and <= 2.0).  The change is the
    discriminating part: under the Adam rule (lr/m for hidden matrices) it
    vanishes like ~1/√m (5x at 2048 for the input layer), under the SGD rule
    it grows like √m (x45 for the readout) -- docs/esgd_mup.md."""
    table = {w: coord_check(w) for w in COORD_WIDTHS}
    shown = {w: {k: (round(a, 3), round(d, 3)) for k, (a, d) in row.items()} for w, row in table.items()}
    for layer in table[COORD_WIDTHS[0]]:
        size = [table[w][layer][0] for w in COORD_WIDTHS]
        change = [table[w][layer][1] for w in COORD_WIDTHS]
        assert max(size) / min(size) < 2, (layer, shown)
        assert max(change) / min(change) < 2.5, (layer, shown)
        assert min(change) > 0.02, (layer, shown)  # a real update, not a frozen net


def test_per_tensor_baseline_defaults_are_the_optimizers():
    """Hyperparameters left out take MuESGD's defaults; an unknown one is an error naming it."""
    torch.manual_seed(0)
    params = [torch.randn(4, 3)]
    grads, hvps = [torch.randn(4, 3)], [torch.randn(4, 3)]

    def run(**kw):
        p, m, d = [params[0].clone()], [torch.zeros(4, 3)], [torch.zeros(4, 3)]
        scal = [dict(exp_avg_bias_corr=1.0, exp_avg_d_bias_corr=1.0, lr_warmup_cumprod=1.0)]
        esgd_per_tensor_torch(p, grads, m, d, scal, hvps, **kw)
        return p[0]

    explicit = dict(lr=1.0, betas=(0.9, 0.999), v=None, lr_warmup=0.99, eps=1e-4, weight_decay=0.0, variant="ema")
    assert torch.equal(run(), run(**explicit))
    assert not torch.equal(run(), run(lr=0.5))
    with pytest.raises(TypeError, match="bogus"):
        run(bogus=1)
