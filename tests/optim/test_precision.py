"""fastmup.optim.precision: the rounding of stored parameters (the torch
reference) and the optimizer options that choose it."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fastmup
from fastmup.optim import MuAdam, MuAdamW, MuESGD, MuSGD, precision, rademacher
from fastmup.plan.spec import MASTER_BUFFER, REMAINDER_BUFFER

from tests.fp32_patterns import SPECIAL_BITS, fp32_patterns, from_bits


def _bits16(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16).to(torch.int64) & 0xFFFF


def _bits32(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32).to(torch.int64) & 0xFFFFFFFF


# ----------------------------------------------------------------------
# the remainder split
# ----------------------------------------------------------------------
def test_remainder_round_trips_every_class():
    x = fp32_patterns(1 << 18)
    b, rem = precision.encode_remainder(x)
    assert b.dtype == torch.bfloat16 and rem.dtype == torch.int16
    back = precision.decode_remainder(b, rem)
    assert torch.equal(_bits32(back), _bits32(x))  # NaN payloads and signs of zero included


def test_remainder_parameter_is_nearest_with_ties_away():
    x = fp32_patterns(1 << 18)
    finite = ~torch.isnan(x)
    b = precision.round_nearest_away_bf16(x)
    u = _bits32(x)
    nearest = ((u >> 16) + ((u & 0xFFFF) >= 0x8000)) & 0xFFFF  # magnitude rounding: sign-magnitude bits
    assert torch.equal(_bits16(b)[finite], nearest[finite])
    # it differs from torch's round-to-nearest-even exactly at the ties whose kept half is even
    rne = _bits16(x.to(torch.bfloat16))
    tie = (u & 0xFFFF) == 0x8000
    differ = (rne != _bits16(b)) & finite
    assert torch.equal(differ, finite & tie & ((u >> 16) % 2 == 0))


def test_round_to_nearest_even_cannot_be_split_in_16_bits():
    """Why the split rounds ties away: under nearest-even, a tie below an odd
    bf16 and the value just above it... both leave the same (param, low bits)."""
    below_odd = torch.tensor([0x3F818000], dtype=torch.int64)  # hi 0x3F81 (odd), tie: RNE -> 0x3F82
    even = torch.tensor([0x3F828000], dtype=torch.int64)  # hi 0x3F82 (even), tie: RNE -> 0x3F82
    x = from_bits(torch.cat([below_odd, even]))
    rne = _bits16(x.to(torch.bfloat16))
    assert rne[0] == rne[1] and (_bits32(x) & 0xFFFF).unique().numel() == 1


def test_remainder_quiet_nans_stay_nan():
    x = from_bits(torch.tensor([0x7FFFFFFF, 0xFFFFFFFF, 0x7FFF8000, 0x7FC00000, 0xFFC00001], dtype=torch.int64))
    b, rem = precision.encode_remainder(x)
    assert torch.isnan(b.float()).all()
    assert torch.equal(_bits32(precision.decode_remainder(b, rem)), _bits32(x))


def test_remainder_specials():
    x = from_bits(torch.tensor(SPECIAL_BITS, dtype=torch.int64))
    b, rem = precision.encode_remainder(x)
    finite_or_inf = ~torch.isnan(x)
    assert torch.equal(b.float()[finite_or_inf & torch.isinf(x)], x[finite_or_inf & torch.isinf(x)])
    assert torch.equal(_bits16(b)[:2], torch.tensor([0, 0x8000]))  # ±0 keep their sign
    assert torch.equal(_bits32(precision.decode_remainder(b, rem)), _bits32(x))


def test_remainder_of_a_bf16_value_is_zero():
    b = torch.randn(4096).to(torch.bfloat16)
    _, rem = precision.encode_remainder(b.float())
    assert not rem.any()
    assert torch.equal(precision.decode_remainder(b, torch.zeros_like(rem)), b.float())


# ----------------------------------------------------------------------
# stochastic rounding
# ----------------------------------------------------------------------
ALL_R = torch.arange(1 << 16, dtype=torch.int64)


def _sr_mean(x: float, dtype: torch.dtype) -> float:
    """The exact mean over every 16-bit r of SR(x)."""
    xs = torch.full((1 << 16,), x, dtype=torch.float32)
    return precision.stochastic_round(xs, dtype, ALL_R).double().mean().item()


@pytest.mark.parametrize(
    "x",
    [1.0 + 2**-9, -3.0 - 2**-11 * 3, 1e-3, 3.3e38, 1e-40, -2.5e-39, 7.0, 2**-126 + 2**-140],
)
def test_bf16_stochastic_rounding_is_unbiased(x):
    x = float(torch.tensor(x, dtype=torch.float32))
    mean = _sr_mean(x, torch.bfloat16)
    assert mean == x  # every r once: the mean is exact (sums of 2^16 bf16 are exact in float64)


@pytest.mark.parametrize("x", [1.0 + 2**-12, -1000.3, 6.1e-5, 60000.0, 0.1])
def test_fp16_stochastic_rounding_is_unbiased_for_normals(x):
    x = float(torch.tensor(x, dtype=torch.float32))
    assert _sr_mean(x, torch.float16) == x


@pytest.mark.parametrize("x", [3e-7, -1.234e-6, 5.9e-5, 1e-9])
def test_fp16_stochastic_rounding_subnormals_within_2_pow_minus_16_ulp(x):
    x = float(torch.tensor(x, dtype=torch.float32))
    mean = _sr_mean(x, torch.float16)
    ulp = 2.0**-24
    assert abs(x) - ulp * 2**-16 <= abs(mean) <= abs(x)  # rounded toward zero by less than 2^-16 ulp


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_picks_a_neighbour(dtype):
    x = fp32_patterns(1 << 14)
    x = x[torch.isfinite(x) & (x.abs() < torch.finfo(dtype).max)]
    r = torch.randint(0, 1 << 16, (x.numel(),), generator=torch.Generator().manual_seed(3))
    out = precision.stochastic_round(x, dtype, r).float()
    down = precision.stochastic_round(x, dtype, torch.zeros_like(r)).float()  # r = 0: toward zero
    up = precision.stochastic_round(x, dtype, torch.full_like(r, 0xFFFF)).float()  # r max: away, unless exact
    assert ((out == down) | (out == up)).all()
    # (fp16 subnormals: the probability is floored to a multiple of 2^-16, so
    # a value less than 2^-16 ulp above t is never rounded up)
    slack = 0.0 if dtype == torch.bfloat16 else 2.0**-40
    assert (down.abs() <= x.abs()).all() and (up.abs() >= x.abs() - slack).all()
    exact = x.to(dtype).float() == x
    assert torch.equal(down[exact], x[exact]) and torch.equal(up[exact], x[exact])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_of_inf_and_nan(dtype):
    x = torch.tensor([float("inf"), -float("inf"), float("nan")])
    for r in (0, 0xFFFF):
        out = precision.stochastic_round(x, dtype, torch.full((3,), r))
        assert out[0] == float("inf") and out[1] == -float("inf") and torch.isnan(out[2])


def _spec_bits(seed: int, step: int, tensor_id: int, element: int) -> int:
    """The module docstring's formula, in Python integers."""
    prefix = rademacher.draw_prefix(seed, precision.ROUNDING_COUNTER | step)
    key = rademacher.tensor_key(prefix, tensor_id, element >> 32)
    word = rademacher.mix32(((element & 0xFFFFFFFF) >> 1) ^ key)
    return (word >> (16 * (element & 1))) & 0xFFFF


def test_rounding_bits_are_the_documented_hash():
    seed, step, tid = 987654321, 5, 3
    start = (1 << 32) - 51  # odd: the first element is a pair's high half; the run crosses 2^32
    bits = precision.rounding_bits(seed, step, tid, 100, start=start)
    for k in (0, 1, 2, 49, 50, 51, 98, 99):
        assert bits[k].item() == _spec_bits(seed, step, tid, start + k), k


def test_rounding_bits_are_uniform_and_uncorrelated():
    """The round-up decisions that stochastic rounding makes from these bits:
    uniform, and neighbours (the two halves of one word among them) and the
    same element at the next step independent, within 5 standard errors."""
    n = 1 << 20
    r = precision.rounding_bits(12345, 7, 2, n)
    counts = torch.bincount(r >> 8, minlength=256).double()
    chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum().item()
    assert chi2 < 400, chi2  # 255 degrees of freedom: p < 1e-7 above 400
    bound = 5 / n**0.5
    for p in (0.5, 0.1, 0.9):
        up = (r < p * 65536).double()
        up -= up.mean()
        for lag in (1, 2, 3, 8, 16, 64):
            corr = (up[:-lag] * up[lag:]).mean() / up.var()
            assert abs(corr) < bound, (p, lag, corr)
        nxt = (precision.rounding_bits(12345, 8, 2, n) < p * 65536).double()
        nxt -= nxt.mean()
        corr = (up * nxt).mean() / (up.std() * nxt.std())
        assert abs(corr) < bound, (p, "step", corr)


def test_rounding_bits_differ_by_step_tensor_and_seed():
    a = precision.rounding_bits(0, 1, 0, 4096)
    assert a.min() >= 0 and a.max() < (1 << 16)
    for other in (precision.rounding_bits(0, 2, 0, 4096), precision.rounding_bits(0, 1, 1, 4096), precision.rounding_bits(1, 1, 0, 4096)):
        assert (a == other).float().mean() < 0.01


# ----------------------------------------------------------------------
# the optimizer options
# ----------------------------------------------------------------------
def _model(width=64, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.inp = nn.Linear(6, w)
            self.hidden = nn.Linear(w, w)
            self.out = fastmup.MuReadout(w, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))

    model = Net(width)
    fastmup.set_base_shapes(model, Net(8), delta=Net(16))
    return model.to(dtype)


def _train(model, opt, steps, seed=0, scaler=None):
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g).to(dtype)
        opt.zero_grad()
        loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()


OPTIMIZERS = [
    (MuAdam, dict(lr=3e-3, weight_decay=0.01)),
    (MuAdamW, dict(lr=3e-3, weight_decay=0.1, amsgrad=True)),
    (MuSGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)),
    (MuSGD, dict(lr=0.05)),
]


@pytest.mark.parametrize("cls,kw", OPTIMIZERS)
def test_remainder_and_fp32_masters_give_identical_trajectories(cls, kw):
    runs = {}
    for mode in ("fp32", "remainder"):
        model = _model()
        opt = cls(model.parameters(), backend="eager", master_weights=mode, **kw)
        _train(model, opt, 6)
        runs[mode] = (model, opt)
    (m1, o1), (m2, o2) = runs["fp32"], runs["remainder"]
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
        st1, st2 = o1.state[p1], o2.state[p2]
        assert st1[MASTER_BUFFER].dtype == torch.float32 and st2[REMAINDER_BUFFER].dtype == torch.int16
        assert REMAINDER_BUFFER not in st1 and MASTER_BUFFER not in st2
        assert torch.equal(precision.decode_remainder(p2, st2[REMAINDER_BUFFER]), st1[MASTER_BUFFER])


@pytest.mark.parametrize("cls,kw", OPTIMIZERS[:3])
def test_fp32_master_follows_an_fp32_run(cls, kw):
    """The master of a bf16 parameter takes the steps an fp32 parameter takes
    with the same gradients (and fp32 state): bit for bit."""
    torch.manual_seed(0)
    shape = (48, 32)
    p16 = nn.Parameter(torch.randn(shape).to(torch.bfloat16))
    p32 = nn.Parameter(p16.detach().float())
    for p in (p16, p32):
        p.infshape = fastmup.infshape.InfShape([fastmup.infshape.InfDim(16, 48), fastmup.infshape.InfDim(8, 32)])
    o16 = cls([p16], backend="eager", master_weights="fp32", state_dtype=torch.float32, **kw)
    o32 = cls([p32], backend="eager", state_dtype=torch.float32, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grad = torch.randn(shape, generator=g).to(torch.bfloat16)
        p16.grad, p32.grad = grad.clone(), grad.float()
        o16.step()
        o32.step()
    assert torch.equal(o16.state[p16][MASTER_BUFFER], p32.detach())
    assert torch.equal(p16.detach(), precision.round_nearest_away_bf16(p32.detach()))


def test_small_updates_stall_in_bf16_and_survive_with_the_modes():
    """lr·grad = 2^-12 per step on weights near 1 (bf16 ulp 2^-7): round to
    nearest never moves them; stochastic rounding moves them by the right
    amount on average, the masters exactly."""
    steps, update = 64, 2.0**-12
    results = {}
    for kw in (dict(), dict(stochastic_rounding=True), dict(master_weights="fp32"), dict(master_weights="remainder")):
        p = nn.Parameter(torch.full((4096,), 1.0 + 2**-5, dtype=torch.bfloat16))
        p.infshape = fastmup.infshape.InfShape([fastmup.infshape.InfDim(None, 4096)])
        opt = MuSGD([p], lr=update, backend="eager", **kw)
        for _ in range(steps):
            p.grad = torch.full_like(p, -1.0)
            opt.step()
        results[kw.get("master_weights") or ("stochastic" if kw else "nearest")] = p.detach().double()
    start, moved = 1.0 + 2**-5, steps * update
    assert (results["nearest"] == start).all()
    # each element ends on one of the two bf16 neighbours of the exact value
    # start + moved, with mean start + moved: std of the mean 2^-7 / 2 / sqrt(4096)
    sr = results["stochastic"].mean().item() - start
    assert abs(sr - moved) < 0.1 * moved
    exact = start + moved  # 1 + 2^-5 + 2^-6: a bf16 value, reached exactly by the masters
    assert (results["fp32"] == exact).all() and (results["remainder"] == exact).all()


def test_stochastic_rounding_is_reproducible_and_seeded():
    runs = []
    for seed in (0, 0, 1):
        model = _model()
        opt = MuAdamW(model.parameters(), lr=1e-3, backend="eager", stochastic_rounding=True, rounding_seed=seed)
        _train(model, opt, 3)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))


@pytest.mark.parametrize("kw", [dict(stochastic_rounding=True, rounding_seed=7), dict(master_weights="fp32"), dict(master_weights="remainder")])
@pytest.mark.parametrize("cls", [MuAdamW, MuSGD])
def test_resumed_run_is_bit_identical(cls, kw):
    extra = dict(momentum=0.9) if cls is MuSGD else {}
    model = _model()
    opt = cls(model.parameters(), lr=1e-2, backend="eager", **kw, **extra)
    _train(model, opt, 3, seed=0)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, 3, seed=1)

    resumed = _model(seed=5)
    resumed.load_state_dict(saved_model)
    opt2 = cls(resumed.parameters(), lr=1e-2, backend="eager", **{k: v for k, v in kw.items() if k != "rounding_seed"}, **extra)
    opt2.load_state_dict(saved_opt)
    assert opt2.rounding_seed == opt.rounding_seed
    _train(resumed, opt2, 3, seed=1)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt2.state[q][key]) and value.dtype == opt2.state[q][key].dtype


def test_state_dict_round_trips_master_buffers_exactly():
    model = _model()
    opt = MuAdam(model.parameters(), lr=1e-2, backend="eager", master_weights="remainder")
    _train(model, opt, 2)
    sd = opt.state_dict()
    assert sd["precision"] == {"rounding_seed": 0}
    opt2 = MuAdam(model.parameters(), lr=1e-2, backend="eager", master_weights="remainder")
    opt2.load_state_dict(copy.deepcopy(sd))
    for p in model.parameters():
        r1, r2 = opt.state[p][REMAINDER_BUFFER], opt2.state[p][REMAINDER_BUFFER]
        assert r2.dtype == torch.int16 and torch.equal(r1, r2)


def test_torch_state_loads_with_masters_from_the_params():
    model = _model()
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train(model, torch_opt, 2)
    opt = MuAdamW(model.parameters(), lr=1e-3, backend="eager", master_weights="fp32")
    opt.load_state_dict(torch_opt.state_dict())
    before = [p.detach().clone() for p in model.parameters()]
    opt._plan()  # the plan creates the masters
    for p, b in zip(model.parameters(), before):
        assert torch.equal(opt.state[p][MASTER_BUFFER], b.float())
    _train(model, opt, 1)


def test_fastmup_state_into_torch_and_back():
    model = _model()
    opt = MuAdamW(model.parameters(), lr=1e-3, backend="eager", master_weights="fp32")
    _train(model, opt, 2)
    sd = opt.state_dict()
    stripped = precision.strip_master_weights(sd)
    assert all(MASTER_BUFFER not in s for s in stripped["state"].values())
    assert all(MASTER_BUFFER in s for s in sd["state"].values())  # the original is left alone
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch_opt.load_state_dict(sd)  # torch keeps the master, unused, cast to bf16
    _train(model, torch_opt, 1)
    back = MuAdamW(model.parameters(), lr=1e-3, backend="eager", master_weights="fp32")
    with pytest.warns(RuntimeWarning, match="master_weight"):
        back.load_state_dict(torch_opt.state_dict())
    back._plan()
    for p in model.parameters():  # built again from the parameters, not the stale cast copy
        assert torch.equal(back.state[p][MASTER_BUFFER], p.detach().float())


def test_found_inf_leaves_masters_and_params_unchanged():
    model = _model()
    opt = MuAdamW(model.parameters(), lr=1e-2, backend="eager", master_weights="remainder")
    _train(model, opt, 1)
    params = list(model.parameters())
    before = [(p.detach().clone(), opt.state[p][REMAINDER_BUFFER].clone()) for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    opt.grad_scale = torch.tensor([1024.0])
    opt.found_inf = torch.tensor([1.0])
    opt.step()
    for p, (value, rem) in zip(params, before):
        assert torch.equal(p, value) and torch.equal(opt.state[p][REMAINDER_BUFFER], rem)


def test_grad_scale_and_param_lr_scales_keep_the_modes_identical():
    runs = []
    for mode in ("fp32", "remainder"):
        model = _model()
        scales = {model.hidden.weight: 0.5}
        opt = MuAdam(model.parameters(), lr=1e-2, backend="eager", master_weights=mode, param_lr_scales=scales)
        opt.grad_scale = torch.tensor([3.0])  # not a power of two: divided by
        opt.found_inf = torch.tensor([0.0])
        _train(model, opt, 3)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_sync_master_weights_after_changing_params():
    model = _model()
    opt = MuSGD(model.parameters(), lr=0.0, backend="eager", master_weights="fp32")
    _train(model, opt, 1)
    with torch.no_grad():
        model.hidden.weight.mul_(2)
    opt.sync_master_weights()
    _train(model, opt, 1)  # lr 0: the parameter is the synced master's copy
    assert torch.equal(opt.state[model.hidden.weight][MASTER_BUFFER], model.hidden.weight.detach().float())


def test_switching_master_weights_off_drops_the_buffers():
    model = _model()
    opt = MuAdam(model.parameters(), lr=1e-3, backend="eager", master_weights="fp32")
    _train(model, opt, 1)
    opt.param_groups[0]["master_weights"] = None
    _train(model, opt, 1)
    assert all(MASTER_BUFFER not in opt.state[p] for p in model.parameters())
    opt.param_groups[0]["master_weights"] = "remainder"
    _train(model, opt, 1)
    assert all(REMAINDER_BUFFER in opt.state[p] for p in model.parameters())


def test_per_group_options_and_fp32_params():
    model = _model()
    model.out.float()  # an fp32 readout beside bf16 matrices
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.startswith("out")], "stochastic_rounding": True, "master_weights": None},
        {"params": list(model.out.parameters())},
    ]
    opt = MuAdam(groups, lr=1e-3, backend="eager", master_weights="fp32")
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    assert all(MASTER_BUFFER not in opt.state[p] for p in model.parameters())  # fp32 is its own master
    storages = {b.signature.storage for b in opt._batches}
    assert storages == {"stochastic", "nearest"}


# ----------------------------------------------------------------------
# bad options: a clear error, nothing changed
# ----------------------------------------------------------------------
def test_bad_option_values():
    model = _model()
    with pytest.raises(ValueError, match="master_weights"):
        MuAdam(model.parameters(), master_weights="fp16")
    with pytest.raises(ValueError, match="stochastic_rounding"):
        MuAdam(model.parameters(), stochastic_rounding=1)
    with pytest.raises(ValueError, match="stochastic_rounding=True and master_weights='fp32'"):
        MuSGD(model.parameters(), stochastic_rounding=True, master_weights="fp32")
    with pytest.raises(ValueError, match="rounding_seed"):
        MuAdam(model.parameters(), rounding_seed=1.5)


def test_bad_combinations_name_the_option_and_the_parameter():
    fp32 = _model(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"stochastic_rounding=True needs bfloat16 or float16 parameters; parameter #0"):
        MuAdam(fp32.parameters(), stochastic_rounding=True)
    with pytest.raises(ValueError, match="master_weights='remainder' needs bfloat16"):
        MuAdam(_model(dtype=torch.float16).parameters(), master_weights="remainder")
    with pytest.raises(ValueError, match="'inp.weight'"):
        MuAdam(fp32.named_parameters(), master_weights="remainder")
    MuAdam(fp32.parameters(), master_weights="fp32")  # fp32 params: their own masters, no error


def test_bad_param_group_leaves_the_optimizer_unchanged():
    model = _model()
    opt = MuAdam(list(model.hidden.parameters()), lr=1e-3, stochastic_rounding=True)
    extra = nn.Parameter(torch.zeros(3))
    extra.infshape = fastmup.infshape.InfShape([fastmup.infshape.InfDim(None, 3)])
    with pytest.raises(ValueError, match="stochastic_rounding"):
        opt.add_param_group({"params": [extra]})
    with pytest.raises(ValueError, match="master_weights"):
        opt.add_param_group({"params": list(model.inp.parameters()), "master_weights": "half"})
    assert len(opt.param_groups) == 1


def test_param_cast_after_construction_is_checked_at_the_step():
    model = _model()
    opt = MuAdam(model.parameters(), lr=1e-3, backend="eager", master_weights="remainder")
    model.float()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="master_weights='remainder'"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)) and not opt.state


def test_esgd_names_the_unsupported_option():
    model = _model()
    with pytest.raises(NotImplementedError, match="stochastic_rounding"):
        MuESGD(model.parameters(), stochastic_rounding=True)
    with pytest.raises(NotImplementedError, match="master_weights"):
        MuESGD(model.parameters(), master_weights="fp32")
    opt = MuESGD(model.parameters())
    assert "precision" not in opt.state_dict() and "master_weights" not in opt.param_groups[0]


def test_explicit_fused_backend_refuses_modes_it_lacks():
    from fastmup.optim import backend as backends

    if "stochastic" in backends.STORAGE_MODES["cpu"]:
        pytest.skip("the cpu kernels store every mode")
    model = _model()
    opt = MuAdam(model.parameters(), lr=1e-3, backend="cpu", stochastic_rounding=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(NotImplementedError, match="stochastic"):
        opt.step()
