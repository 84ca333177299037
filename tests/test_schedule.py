import io
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmup.schedule import KneeLR, knee_factor

GOLDEN = [0.5, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0, 0, 0]  # W=2, E=3, T=10, peak 1


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def _two_groups(model, opt_cls, lr0=1.0, lr1=0.25, **kw):
    return opt_cls(
        [
            {"params": model[0].parameters(), "lr": lr0},
            {"params": model[2].parameters(), "lr": lr1},
        ],
        **kw,
    )


def _train(model, opt, sched, steps):
    """Normal loop; records the lr each optimizer step actually used."""
    used = []
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(5, 4, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        # float(): a tensor lr is updated in place, so record its value now.
        used.append([float(g["lr"]) for g in opt.param_groups])
        opt.step()
        sched.step()
    return used


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.AdamW])
def test_golden_sequence(opt_cls):
    model = _model()
    opt = opt_cls(model.parameters(), lr=1.0)
    sched = KneeLR(opt, warmup_steps=2, explore_steps=3, total_steps=10)
    used = [lr[0] for lr in _train(model, opt, sched, 12)]
    assert used == pytest.approx(GOLDEN, abs=1e-12, rel=0)


def test_positional_signature_and_initial_lr():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=3.0)
    sched = KneeLR(opt, 2, 3, 10)
    # Right after construction the groups hold lr(1).
    assert opt.param_groups[0]["lr"] == pytest.approx(1.5, abs=1e-12)
    assert sched.get_last_lr() == pytest.approx([1.5], abs=1e-12)


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.AdamW])
def test_groups_keep_ratios(opt_cls):
    model = _model()
    opt = _two_groups(model, opt_cls)
    sched = KneeLR(opt, warmup_steps=2, explore_steps=3, total_steps=10)
    used = _train(model, opt, sched, 12)
    assert [u[0] for u in used] == pytest.approx(GOLDEN, abs=1e-12)
    assert [u[1] for u in used] == pytest.approx([0.25 * g for g in GOLDEN], abs=1e-12)


def test_peak_lr_is_group0_peak_and_others_scale():
    model = _model()
    opt = _two_groups(model, torch.optim.AdamW, lr0=0.01, lr1=0.04)
    sched = KneeLR(opt, warmup_steps=0, explore_steps=2, total_steps=4, peak_lr=0.5)
    used = _train(model, opt, sched, 5)
    assert [u[0] for u in used] == pytest.approx([0.5, 0.5, 0.25, 0.0, 0.0], abs=1e-12)
    assert [u[1] for u in used] == pytest.approx([2.0, 2.0, 1.0, 0.0, 0.0], abs=1e-12)
    assert sched.base_lrs == [0.01, 0.04]  # initial lrs are not rewritten


def test_no_warmup_and_no_decay_phase():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    # D = T - W - E = 0: straight to zero after the plateau, no ZeroDivisionError.
    sched = KneeLR(opt, warmup_steps=0, explore_steps=4, total_steps=4)
    used = [u[0] for u in _train(model, opt, sched, 6)]
    assert used == [2.0, 2.0, 2.0, 2.0, 0.0, 0.0]
    assert [knee_factor(s, 1, 3, 4) for s in range(1, 7)] == [1, 1, 1, 1, 0, 0]


def test_default_explore_is_half_the_post_warmup_budget():
    opt = torch.optim.SGD(_model().parameters(), lr=1.0)
    assert KneeLR(opt, warmup_steps=2, total_steps=12).explore_steps == 5
    opt = torch.optim.SGD(_model().parameters(), lr=1.0)
    assert KneeLR(opt, total_steps=9).explore_steps == 4


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(warmup_steps=-1, explore_steps=1, total_steps=5), "warmup_steps"),
        (dict(warmup_steps=0, explore_steps=-2, total_steps=5), "explore_steps"),
        (dict(warmup_steps=0, explore_steps=0, total_steps=0), "total_steps"),
        (dict(warmup_steps=3, explore_steps=3, total_steps=5), "warmup_steps \\+ explore_steps"),
        (dict(warmup_steps=6, explore_steps=0, total_steps=5), "warmup_steps"),
        (dict(warmup_steps=0, explore_steps=1, total_steps=5, peak_lr=-1.0), "peak_lr"),
        (dict(warmup_steps=0, explore_steps=1, total_steps=5, peak_lr=float("nan")), "peak_lr"),
    ],
)
def test_bad_arguments(kwargs, name):
    opt = torch.optim.SGD(_model().parameters(), lr=1.0)
    with pytest.raises(ValueError, match=name):
        KneeLR(opt, **kwargs)


def test_bad_argument_types():
    opt = torch.optim.SGD(_model().parameters(), lr=1.0)
    with pytest.raises(TypeError, match="total_steps"):
        KneeLR(opt, 0, 3)
    with pytest.raises(TypeError, match="explore_steps"):
        KneeLR(opt, 0, 2.5, 10)
    opt0 = torch.optim.SGD(_model().parameters(), lr=0.0)
    with pytest.raises(ValueError, match="group 0"):
        KneeLR(opt0, 0, 2, 10, peak_lr=1.0)


def test_normal_loop_does_not_warn():
    model = _model()
    opt = _two_groups(model, torch.optim.AdamW)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = KneeLR(opt, warmup_steps=1, explore_steps=2, total_steps=6)
        _train(model, opt, sched, 8)


@pytest.mark.parametrize("load_optimizer", [True, False])
@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.AdamW])
def test_resume_is_exact(opt_cls, load_optimizer):
    kw = dict(warmup_steps=2, explore_steps=3, total_steps=10)
    opt_kw = dict(momentum=0.9) if opt_cls is torch.optim.SGD else {}

    ref_model = _model()
    ref_opt = _two_groups(ref_model, opt_cls, **opt_kw)
    ref_sched = KneeLR(ref_opt, **kw)
    ref_used = _train(ref_model, ref_opt, ref_sched, 12)

    model = _model()
    opt = _two_groups(model, opt_cls, **opt_kw)
    sched = KneeLR(opt, **kw)
    first = _train(model, opt, sched, 7)
    buf = io.BytesIO()
    torch.save({"sched": sched.state_dict(), "opt": opt.state_dict(), "model": model.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model2 = _model()
    model2.load_state_dict(ckpt["model"])
    opt2 = _two_groups(model2, opt_cls, **opt_kw)
    sched2 = KneeLR(opt2, **kw)  # leaves lr(1) in the groups until loaded
    if load_optimizer:
        opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Continue with the same data stream position as the reference run.
        gen_used = []
        gen = torch.Generator().manual_seed(1)
        for i in range(12):
            x = torch.randn(5, 4, generator=gen)
            if i < 7:
                continue
            loss = model2(x).pow(2).mean()
            opt2.zero_grad()
            loss.backward()
            gen_used.append([float(g["lr"]) for g in opt2.param_groups])
            opt2.step()
            sched2.step()
    assert first + gen_used == ref_used  # bit-identical, not approximately
    if load_optimizer:
        for p, q in zip(model2.parameters(), ref_model.parameters()):
            assert torch.equal(p, q)


def test_closed_form_jump():
    opt = torch.optim.SGD(_model().parameters(), lr=1.0)
    sched = KneeLR(opt, 2, 3, 10)
    with pytest.warns(UserWarning):  # torch deprecates step(epoch)
        sched.step(6)
    assert opt.param_groups[0]["lr"] == pytest.approx(GOLDEN[6], abs=1e-12)
    assert sched._get_closed_form_lr() == pytest.approx([GOLDEN[6]], abs=1e-12)
    assert sched._lr_at(1) == pytest.approx([0.5], abs=1e-12)


def test_tensor_lr():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.5), foreach=False)
    sched = KneeLR(opt, 2, 3, 10)
    used = [u[0] for u in _train(model, opt, sched, 12)]
    assert used == pytest.approx([0.5 * g for g in GOLDEN], abs=1e-7)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)


@settings(max_examples=200, deadline=None)
@given(
    w=st.integers(0, 20),
    e=st.integers(0, 20),
    d=st.integers(0, 20),
    peak=st.floats(1e-4, 10.0),
)
def test_shape_matches_definition(w, e, d, peak):
    t = w + e + d
    if t == 0:
        return
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = KneeLR(opt, w, e, t)
    got = []
    for _ in range(t + 3):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for s, lr in enumerate(got, start=1):
        if s <= w:
            want = peak * s / w
        elif s <= w + e:
            want = peak
        else:
            want = max(0.0, peak - peak * (s - w - e) / d) if d else 0.0
        assert lr == pytest.approx(want, abs=1e-12 * max(1.0, peak))
        assert 0.0 <= lr <= peak * (1 + 1e-15)
