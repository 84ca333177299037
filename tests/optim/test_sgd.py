"""MuSGD (eager reference): parity with mup 1.0 and torch.optim.SGD."""
import pytest
import torch

from fastmup.optim import MuSGD

from .conftest import build, clone, train

mup = pytest.importorskip("mup")

CASES = [
    dict(lr=0.05),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-2),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    dict(lr=0.05, momentum=0.5, maximize=True),
]


def _identical(a, b) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{name}: max diff {(p - q).abs().max().item()}"


@pytest.mark.parametrize("kw", CASES, ids=str)
def test_parity_with_mup(kind, kw):
    model = build(kind, 32)
    twin = clone(model)
    train(kind, model, MuSGD(model.parameters(), **kw, backend="eager"))
    train(kind, twin, mup.MuSGD(twin.parameters(), **kw))
    _identical(model, twin)


@pytest.mark.parametrize("kw", CASES, ids=str)
def test_base_width_equals_torch(kind, kw):
    model = build(kind, 8)
    twin = clone(model)
    train(kind, model, MuSGD(model.parameters(), **kw, backend="eager"))
    train(kind, twin, torch.optim.SGD(twin.parameters(), **kw))
    _identical(model, twin)


def test_multipliers_follow_the_sgd_rule():
    model = build("mlp", 32)  # base 8: m = 4 for the width dims
    opt = MuSGD(model.parameters(), lr=1.0, weight_decay=1.0)
    model(torch.randn(2, 12)).sum().backward()
    opt.step()
    b = opt._batches[0]
    where = {id(p): i for i, p in enumerate(b.params)}
    lr = lambda p: b.value(where[id(p)], "lr")  # noqa: E731
    wd = lambda p: b.value(where[id(p)], "weight_decay")  # noqa: E731
    assert (lr(model.inp.weight), wd(model.inp.weight)) == (4.0, 0.25)  # vector-like: η·m, λ/m
    assert (lr(model.hidden.weight), wd(model.hidden.weight)) == (1.0, 1.0)  # (2w, w): m_out/m_in = 1
    assert (lr(model.out.weight), wd(model.out.weight)) == (4.0, 0.25)  # readout: η·m_in
    assert (lr(model.out.bias), wd(model.out.bias)) == (1.0, 1.0)  # finite


def test_momentum_state_loads_from_torch_sgd():
    """A torch.optim.SGD state (momentum_buffer, no step) continues identically."""
    model = build("mlp", 8)
    twin = clone(model)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    train("mlp", twin, ref, steps=2)
    ours_model = clone(twin)
    ours = MuSGD(ours_model.parameters(), lr=0.1, momentum=0.9, backend="eager")
    ours.load_state_dict(ref.state_dict())
    train("mlp", twin, ref, steps=3, seed=5)
    train("mlp", ours_model, ours, steps=3, seed=5)
    _identical(ours_model, twin)


def test_momentum_switched_on_later_seeds_the_buffer_like_torch():
    model = build("mlp", 8)
    twin = clone(model)
    ours = MuSGD(model.parameters(), lr=0.1, momentum=0.0, dampening=0.5, backend="eager")
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.0, dampening=0.5)
    train("mlp", model, ours, steps=2)
    train("mlp", twin, ref, steps=2)
    for opt in (ours, ref):
        opt.param_groups[0]["momentum"] = 0.9
    train("mlp", model, ours, steps=3, seed=7)
    train("mlp", twin, ref, steps=3, seed=7)
    _identical(model, twin)
