import functools
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastmup.sharpness import KeskarResult, keskar_sharpness, keskar_sharpness_result

CENTER = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
DELTA = 1e-3


class Bowl(nn.Module):
    """Per-sample loss ½ Σ a (w - x)²; with data c ± δ the full loss is
    minimised exactly at w = c, while single batches have non-zero gradients."""

    def __init__(self, curvature: float) -> None:
        super().__init__()
        self.w = nn.Parameter(CENTER.clone())
        self.root_a = curvature**0.5

    def forward(self, x):
        return self.root_a * (self.w - x)


def half_sq(out, target):
    return 0.5 * out.pow(2).sum(-1).mean()


def bowl_loader():
    x = torch.stack([CENTER + DELTA, CENTER - DELTA])
    return DataLoader(TensorDataset(x, torch.zeros(2)), batch_size=1, shuffle=False)


def expected_bowl_sharpness(a: float, eps: float) -> float:
    # The ascent ends in a corner of the box, |w - c| = r = eps(|c| + 1);
    # averaging over c ± δ gives L1 = ½ a Σ (r² + δ²) and L0 = ½ a Σ δ².
    r = eps * (CENTER.abs() + 1)
    loss0 = 0.5 * a * 3 * DELTA**2
    loss1 = 0.5 * a * float((r.pow(2) + DELTA**2).sum())
    return 100 * (loss1 - loss0) / (1 + loss0)


def bowl_sharpness(a, eps, **kw):
    kw.setdefault("lr", 0.5)
    kw.setdefault("max_steps", 100)
    kw.setdefault("progress", False)
    return keskar_sharpness(Bowl(a), half_sq, bowl_loader(), epsilon=eps, **kw)


def test_bowl_matches_closed_form_and_grows_with_epsilon():
    values = [bowl_sharpness(1.0, eps) for eps in (3e-3, 1e-2, 1e-1)]
    for eps, v in zip((3e-3, 1e-2, 1e-1), values):
        assert v == pytest.approx(expected_bowl_sharpness(1.0, eps), rel=1e-9)
    assert 0 <= values[0] < values[1] < values[2]


def test_sharper_bowl_is_sharper():
    flat = bowl_sharpness(0.25, 1e-2)
    sharp = bowl_sharpness(4.0, 1e-2)
    assert flat == pytest.approx(expected_bowl_sharpness(0.25, 1e-2), rel=1e-9)
    assert sharp == pytest.approx(expected_bowl_sharpness(4.0, 1e-2), rel=1e-9)
    assert sharp > 10 * flat


def test_result_fields_and_max():
    model = Bowl(1.0)
    res = keskar_sharpness_result(
        model, half_sq, bowl_loader(), epsilon=1e-2, lr=0.5, max_steps=40, eval_every=5, progress=False
    )
    assert isinstance(res, KeskarResult)
    assert res.steps == 40
    assert res.loss0 == pytest.approx(0.5 * 3 * DELTA**2, rel=1e-12)
    assert res.sharpness == pytest.approx(100 * (res.loss1 - res.loss0) / (1 + res.loss0), rel=1e-12)
    assert res.max_sharpness >= res.sharpness >= 0
    as_max = keskar_sharpness(
        Bowl(1.0), half_sq, bowl_loader(), epsilon=1e-2, lr=0.5, max_steps=40, eval_every=5,
        return_max=True, progress=False,
    )
    assert as_max == res.max_sharpness
    full = keskar_sharpness(
        Bowl(1.0), half_sq, bowl_loader(), epsilon=1e-2, lr=0.5, max_steps=40, return_result=True, progress=False
    )
    # Default: one evaluation at the end, so the max is the final value.
    assert full.max_sharpness == full.sharpness == pytest.approx(expected_bowl_sharpness(1.0, 1e-2), rel=1e-9)


def test_custom_optimizer_factories():
    for factory in (torch.optim.Adam, functools.partial(torch.optim.SGD, momentum=0.9)):
        v = bowl_sharpness(1.0, 1e-2, optimizer=factory, lr=0.05, max_steps=200)
        assert v == pytest.approx(expected_bowl_sharpness(1.0, 1e-2), rel=1e-6)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3))
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.frozen(self.body(x))))


def _mlp_setup():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(40, 5)
    y = torch.randint(0, 3, (40,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    crit = nn.CrossEntropyLoss()
    user_opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net.train()
    for xb, yb in loader:  # real training: running stats, grads and momentum exist
        user_opt.zero_grad()
        crit(net(xb), yb).backward()
        user_opt.step()
    crit(net(x[:8]), y[:8]).backward()  # leave non-trivial .grad behind
    net.body[3].eval()  # a mixed train/eval state must survive as well
    return net, loader, crit, user_opt


def _state(net, user_opt):
    return {
        "params": [p.detach().clone() for p in net.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in net.parameters()],
        "grad_ids": [id(p.grad) for p in net.parameters()],
        "requires_grad": [p.requires_grad for p in net.parameters()],
        "buffers": [b.clone() for b in net.buffers()],
        "training": [m.training for m in net.modules()],
        "opt_state": {
            k: {kk: vv.clone() for kk, vv in v.items()} for k, v in user_opt.state_dict()["state"].items()
        },
        "opt_groups": user_opt.state_dict()["param_groups"],
        "rng": torch.get_rng_state(),
    }


def _assert_same(a, b):
    for key in ("params", "buffers"):
        assert len(a[key]) == len(b[key])
        for s, t in zip(a[key], b[key]):
            assert torch.equal(s, t), key
    for s, t in zip(a["grads"], b["grads"]):
        assert (s is None and t is None) or torch.equal(s, t)
    assert a["grad_ids"] == b["grad_ids"]
    assert a["requires_grad"] == b["requires_grad"]
    assert a["training"] == b["training"]
    assert a["opt_groups"] == b["opt_groups"]
    assert a["opt_state"].keys() == b["opt_state"].keys()
    for k in a["opt_state"]:
        for kk in a["opt_state"][k]:
            assert torch.equal(a["opt_state"][k][kk], b["opt_state"][k][kk])
    assert torch.equal(a["rng"], b["rng"])


@pytest.mark.parametrize("ascent_mode", ["eval", "train"])
def test_model_and_user_optimizer_untouched(ascent_mode):
    net, loader, crit, user_opt = _mlp_setup()
    before = _state(net, user_opt)
    assert net.frozen.weight.grad is None and net.head.weight.grad is not None
    res = keskar_sharpness_result(
        net, crit, loader, epsilon=5e-2, lr=0.05, max_steps=12, eval_every=4,
        ascent_mode=ascent_mode, progress=True,
    )
    assert res.loss1 != res.loss0  # the ascent really moved the weights
    assert res.sharpness > 0
    _assert_same(before, _state(net, user_opt))
    # Same RNG state in, same RNG state out: repeat calls agree exactly.
    again = keskar_sharpness_result(
        net, crit, loader, epsilon=5e-2, lr=0.05, max_steps=12, eval_every=4,
        ascent_mode=ascent_mode, progress=False,
    )
    assert again == res


def test_model_restored_after_error():
    net, _, crit, user_opt = _mlp_setup()
    x = torch.randn(8, 5)
    before = _state(net, user_opt)
    one_shot = iter([(x, torch.zeros(8, dtype=torch.long))])
    with pytest.raises(ValueError, match="re-iterable"):
        keskar_sharpness(net, crit, one_shot, max_steps=3, progress=False)
    _assert_same(before, _state(net, user_opt))


def test_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    v = bowl_sharpness(1.0, 1e-2, progress=True)
    assert v == pytest.approx(expected_bowl_sharpness(1.0, 1e-2), rel=1e-9)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, a, b):
        return self.lin(a * b).squeeze(-1)


def test_tuple_inputs_and_mean_weighting():
    torch.manual_seed(0)
    model = TwoInputs()
    a, b, y = torch.randn(7, 3), torch.randn(7, 3), torch.randn(7)
    batches = [((a[:4], b[:4]), y[:4]), ((a[4:], b[4:]), y[4:])]  # uneven last batch
    res = keskar_sharpness_result(model, nn.MSELoss(), batches, max_steps=3, progress=False, device="cpu")
    with torch.no_grad():
        want = float(nn.MSELoss()(model(a, b), y))  # mean over all 7 samples
    assert res.loss0 == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=-1e-3), "epsilon"),
        (dict(lr=0.0), "lr"),
        (dict(lr=float("inf")), "lr"),
        (dict(max_steps=0), "max_steps"),
        (dict(eval_every=0), "eval_every"),
        (dict(ascent_mode="sgd"), "ascent_mode"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keskar_sharpness(Bowl(1.0), half_sq, bowl_loader(), progress=False, **kwargs)


def test_empty_loader_and_bad_inputs():
    model = Bowl(1.0)
    with pytest.raises(ValueError, match="loader"):
        keskar_sharpness(model, half_sq, [], progress=False)
    with pytest.raises(ValueError, match="loader"):
        keskar_sharpness(model, half_sq, DataLoader(TensorDataset(torch.zeros(0, 3))), progress=False)
    with pytest.raises(TypeError, match="instance"):
        keskar_sharpness(model, half_sq, bowl_loader(), optimizer=torch.optim.SGD(model.parameters(), lr=1.0))
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        keskar_sharpness(model, half_sq, bowl_loader(), progress=False)
    assert torch.equal(model.w, CENTER)


def test_result_function_takes_the_options_of_keskar_sharpness():
    """keskar_sharpness_result is keskar_sharpness(..., return_result=True):
    the same numbers; its return switches are not options of its own."""
    torch.manual_seed(0)
    model = TwoInputs()
    a, b, y = torch.randn(6, 3), torch.randn(6, 3), torch.randn(6)
    batches = [((a, b), y)]
    res = keskar_sharpness_result(model, nn.MSELoss(), batches, max_steps=4, lr=1e-2, progress=False)
    again = keskar_sharpness(model, nn.MSELoss(), batches, max_steps=4, lr=1e-2, progress=False, return_result=True)
    assert res == again
    for name in ("return_max", "return_result"):
        with pytest.raises(TypeError, match=name):
            keskar_sharpness_result(model, nn.MSELoss(), batches, **{name: True})
    with pytest.raises(TypeError, match="bogus"):
        keskar_sharpness_result(model, nn.MSELoss(), batches, bogus=1)
