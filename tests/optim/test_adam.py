"""MuAdam / MuAdamW (eager reference): parity with mup 1.0 and torch.optim."""
import pytest
import torch

import fastmup
from fastmup.optim import MuAdam, MuAdamW

from .conftest import build, clone, max_diff, train

mup = pytest.importorskip("mup")

# weight_decay is always given: mup's MuAdamW silently defaults it to 0, while
# fastmup follows torch.optim.AdamW's default of 1e-2 (see README).
CASES = [
    dict(lr=3e-3, weight_decay=0.0),
    dict(lr=3e-3, weight_decay=0.1),
    dict(lr=3e-3, weight_decay=0.05, amsgrad=True),
    dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0, maximize=True),
]


def _identical(a, b) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{name}: max diff {(p - q).abs().max().item()}"


@pytest.mark.parametrize("kw", CASES, ids=str)
@pytest.mark.parametrize("ours,theirs", [(MuAdam, "MuAdam"), (MuAdamW, "MuAdamW")])
def test_parity_with_mup(kind, kw, ours, theirs):
    """Same update as mup's group splitting around torch.optim, at width 4x base.

    The eager reference runs the same fp32 ops as torch's single-tensor Adam
    and rounds the μP multipliers exactly like mup, so results are identical."""
    model = build(kind, 32)
    twin = clone(model)
    opt = ours(model.parameters(), **kw, backend="eager")
    ref = getattr(mup, theirs)(twin.parameters(), **kw)
    train(kind, model, opt)
    train(kind, twin, ref)
    assert max_diff(model, build(kind, 32)) > 0  # training moved the weights
    _identical(model, twin)


@pytest.mark.parametrize("kw", CASES, ids=str)
def test_base_width_equals_torch(kind, kw):
    model = build(kind, 8)  # width == base: μP is standard parametrization
    twin = clone(model)
    train(kind, model, MuAdamW(model.parameters(), **kw, backend="eager"))
    train(kind, twin, torch.optim.AdamW(twin.parameters(), **kw))
    _identical(model, twin)


def test_decoupled_wd_leaves_weight_decay_unscaled():
    """mup main branch: decoupled_wd=True keeps λ as given for hidden matrices."""
    model = build("mlp", 32)
    opt = MuAdam(model.parameters(), lr=1.0, weight_decay=0.5, decoupled_wd=True)
    model(torch.randn(2, 12)).sum().backward()
    opt.step()
    batch = opt._batches[0]
    hidden = [i for i, p in enumerate(batch.params) if p is model.hidden.weight][0]
    assert batch.value(hidden, "lr") == pytest.approx(1.0 / 4)  # fan-in 32 vs base 8
    assert batch.value(hidden, "weight_decay") == 0.5


def test_group_lr_is_base_lr_and_schedulers_set_it_absolutely():
    """Unlike mup, the μP factor is not folded into group['lr']."""
    model = build("mlp", 32)
    opt = MuAdam(model.parameters(), lr=1e-2)
    assert [g["lr"] for g in opt.param_groups] == [1e-2]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert opt.param_groups[0]["lr"] == 5e-3
    model(torch.randn(2, 12)).sum().backward()
    opt.step()
    sched.step()
    batch = opt._batches[0]
    hidden = [i for i, p in enumerate(batch.params) if p is model.hidden.weight][0]
    assert batch.value(hidden, "lr") == pytest.approx(5e-3 / 4)


def test_param_lr_scales_multiply_the_mup_multiplier():
    model = build("mlp", 32)
    opt = MuAdam(model.parameters(), lr=1.0, param_lr_scales={model.hidden.weight: 0.25})
    model(torch.randn(2, 12)).sum().backward()
    opt.step()
    batch = opt._batches[0]
    hidden = [i for i, p in enumerate(batch.params) if p is model.hidden.weight][0]
    inp = [i for i, p in enumerate(batch.params) if p is model.inp.weight][0]
    assert batch.value(hidden, "lr") == pytest.approx(0.25 / 4)
    assert batch.value(inp, "lr") == 1.0


def test_mup_style_import():
    """Code written for mup runs unchanged with `import fastmup as mup`."""
    import fastmup as mup_compat

    model = build("mlp", 16)
    opt = mup_compat.MuAdam(model.parameters(), lr=1e-3)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.backend in ("eager", "cpu")
    assert mup_compat.optim.MuAdamW is fastmup.MuAdamW
