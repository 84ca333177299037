"""The shared planning layer: errors, state_dict round trips, AMP, plan cache."""
import copy
import gc
import io
import weakref

import pytest
import torch
from torch import nn

import fastmup
from fastmup.infshape import InfDim, InfShape
from fastmup.optim import MuAdam, MuAdamW, MuSGD

from .conftest import MODELS, assert_same, available_backends, build, clone, loss_of, max_diff, train

OPTIMIZERS = [
    (MuAdam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    (MuAdamW, dict(lr=1e-2)),
    (MuSGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
]


def _snapshot(model, opt):
    return copy.deepcopy([p.detach().clone() for p in model.parameters()]), copy.deepcopy(opt.state_dict())


def _unchanged(model, opt, snap):
    params, sd = snap
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    now = opt.state_dict()
    assert now["param_groups"] == sd["param_groups"]
    assert now["state"].keys() == sd["state"].keys()
    for k in now["state"]:
        for name, v in now["state"][k].items():
            assert torch.equal(v, sd["state"][k][name]), (k, name)


# ----------------------------------------------------------------------------
# bad input: a clear error, nothing changed
# ----------------------------------------------------------------------------
def test_params_without_base_shapes_name_the_parameter():
    model = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(ValueError, match=r"'0\.weight'.*set_base_shapes"):
        MuAdam(model.named_parameters(), lr=1e-3)
    with pytest.raises(ValueError, match=r"parameter #0 of param group 0 \(shape \(4, 3\)\).*set_base_shapes"):
        MuSGD(model.parameters(), lr=1e-3)


def test_parameter_in_two_groups():
    model = build("mlp", 16)
    with pytest.raises(ValueError, match="more than one parameter group"):
        MuAdam([{"params": [model.inp.weight]}, {"params": [model.inp.weight, model.inp.bias]}])


def test_add_param_group_error_leaves_optimizer_unchanged():
    model = build("mlp", 16)
    opt = MuAdam([model.inp.weight], lr=1e-3)
    with pytest.raises(ValueError, match="betas"):
        opt.add_param_group({"params": [model.inp.bias], "betas": (0.9, 1.5)})
    bare = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="set_base_shapes"):
        opt.add_param_group({"params": [model.out.weight, bare]})
    assert len(opt.param_groups) == 1 and model.out.weight not in opt._mults


@pytest.mark.parametrize(
    "cls,kw,match",
    [
        (MuAdam, dict(lr=-1.0), "lr"),
        (MuAdam, dict(eps=-1e-8), "eps"),
        (MuAdam, dict(betas=(1.0, 0.9)), r"betas\[0\]"),
        (MuAdamW, dict(weight_decay=-0.1), "weight_decay"),
        (MuSGD, dict(lr=0.1, momentum=-0.5), "momentum"),
        (MuSGD, dict(lr=0.1, nesterov=True), "nesterov"),
        (MuAdam, dict(backend="fast"), "backend"),
        (MuAdam, dict(state_dtype=torch.int32), "state_dtype"),
    ],
)
def test_invalid_hyperparameters(cls, kw, match):
    model = build("mlp", 16)
    with pytest.raises(ValueError, match=match):
        cls(model.parameters(), **kw)


def test_more_than_two_infinite_dims():
    p = nn.Parameter(torch.zeros(4, 4, 4))
    p.infshape = InfShape([InfDim(2, 4), InfDim(2, 4), InfDim(2, 4)])
    with pytest.raises(NotImplementedError, match=r"3 infinite dimensions"):
        MuAdam([p])


@pytest.mark.parametrize(
    "cls,kw",
    OPTIMIZERS[:2] + [pytest.param(MuSGD, dict(OPTIMIZERS[2][1], backend="cpu"), marks=pytest.mark.skipif(
        "cpu" not in available_backends(), reason="the cpu backend cannot be built here"))],
)
def test_sparse_gradient_is_an_error_and_changes_nothing(cls, kw):
    """Adam takes no sparse gradients (as torch's); SGD takes them on the
    eager path only, so a requested fused backend refuses them."""
    model = build("mlp", 16)
    opt = cls(model.parameters(), **kw)
    train("mlp", model, opt, steps=1)
    snap = _snapshot(model, opt)
    loss_of("mlp", model, MODELS["mlp"][1]()).backward()
    model.hidden.weight.grad = model.hidden.weight.grad.to_sparse()
    with pytest.raises(RuntimeError, match=r"sparse gradient"):
        opt.step()
    _unchanged(model, opt, snap)


def test_error_before_first_step_creates_no_state():
    model = build("mlp", 16)
    opt = MuAdam(model.named_parameters(), lr=1e-3)
    loss_of("mlp", model, MODELS["mlp"][1]()).backward()
    model.out.bias.grad = model.out.bias.grad.to_sparse()
    with pytest.raises(RuntimeError, match=r"'out\.bias'"):
        opt.step()
    assert len(opt.state) == 0


# ----------------------------------------------------------------------------
# state_dict: exact round trips and bit-identical resumption
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kw", OPTIMIZERS)
def test_resume_is_bit_identical(kind, cls, kw, backend):
    model = build(kind, 16)
    opt = cls(model.parameters(), **kw, backend=backend)
    train(kind, model, opt, steps=2)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)

    train(kind, model, opt, steps=3, seed=9)

    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = build(kind, 16)
    resumed.load_state_dict(ckpt["model"])
    ropt = cls(resumed.parameters(), **kw, backend=backend)
    ropt.load_state_dict(ckpt["opt"])
    train(kind, resumed, ropt, steps=3, seed=9)
    assert max_diff(model, resumed) == 0.0
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(value, ropt.state[q][key]), key


@pytest.mark.parametrize("cls,torch_cls,kw", [
    (MuAdam, torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
    (MuAdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (MuSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
])
def test_state_moves_to_torch_optim_and_back(cls, torch_cls, kw, backend):
    """torch's key names: a fastmup state loads into torch.optim and back (base width)."""
    model = build("mlp", 8)
    opt = cls(model.parameters(), **kw, backend=backend)
    train("mlp", model, opt, steps=2)
    twin = clone(model)
    ref = torch_cls(twin.parameters(), **kw)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    train("mlp", model, opt, steps=2, seed=3)
    train("mlp", twin, ref, steps=2, seed=3)
    assert_same(model, twin, backend)
    back_model = clone(twin)
    back = cls(back_model.parameters(), **kw, backend=backend)
    back.load_state_dict(copy.deepcopy(ref.state_dict()))
    train("mlp", twin, ref, steps=2, seed=4)
    train("mlp", back_model, back, steps=2, seed=4)
    assert_same(back_model, twin, backend)


def test_fp32_state_of_bf16_params_survives_load():
    """torch casts loaded state to the param dtype; fastmup keeps state_dtype."""
    model = build("mlp", 16).to(torch.bfloat16)
    opt = MuAdam(model.parameters(), lr=1e-2, state_dtype=torch.float32)
    model(torch.randn(4, 12, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    opt2 = MuAdam(model.parameters(), lr=1e-2, state_dtype=torch.float32)
    opt2.load_state_dict(sd)
    for p in model.parameters():
        assert opt2.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(opt2.state[p]["exp_avg"], opt.state[p]["exp_avg"])


def test_load_state_dict_mismatch_is_clear():
    model = build("mlp", 16)
    opt = MuAdam(model.parameters())
    other = MuAdam([{"params": [model.inp.weight]}, {"params": [model.inp.bias]}])
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict(other.state_dict())


# ----------------------------------------------------------------------------
# plan cache, skipping, AMP, hooks
# ----------------------------------------------------------------------------
def _grad_rows(batch):
    """The grad rows of the pointer tables the backend asked the batch for."""
    return [table[key.index("grad")].tolist() for key, table in batch._pointers.items() if "grad" in key]


needs_cpu_backend = pytest.mark.skipif("cpu" not in available_backends(), reason="the cpu backend cannot be built here")


@needs_cpu_backend
def test_plan_is_reused_and_follows_new_gradients():
    model = build("mlp", 16)
    opt = MuAdam(model.parameters(), lr=1e-3, backend="cpu")
    train("mlp", model, opt, steps=1)
    first = opt._batches
    loss_of("mlp", model, MODELS["mlp"][1]()).backward()  # accumulates into the same .grad
    opt.step()
    assert opt._batches is first
    # the usual loop: fresh gradient tensors every step.  The plan stays, its
    # pointer tables follow the new addresses, and the step uses them.
    twin = clone(model)
    ref = MuAdam(twin.parameters(), lr=1e-3, backend="eager")
    ref.load_state_dict(opt.state_dict())
    for _ in range(2):
        batch = MODELS["mlp"][1]()
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad(set_to_none=True)
            loss_of("mlp", m, batch).backward()
        opt.step()
        ref.step()
        assert opt._batches is first
        for b in first:
            rows = _grad_rows(b)
            assert rows and all(row == [p.grad.data_ptr() for p in b.owners] for row in rows)
    torch.testing.assert_close(list(model.parameters()), list(twin.parameters()), rtol=1e-6, atol=1e-7)
    # a param that loses its gradient keeps its place in the plan, skipped
    opt.zero_grad(set_to_none=True)
    loss_of("mlp", model, MODELS["mlp"][1]()).backward()
    model.inp.weight.grad = None
    opt.step()
    assert opt._batches is first


def test_zero_grad_frees_the_gradients():
    """The optimizer keeps no reference to a step's gradients: set_to_none
    frees them, as with torch's optimizers (no extra gradient memory during
    the next backward)."""
    model = build("mlp", 16)
    opt = MuAdam(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        loss_of("mlp", model, MODELS["mlp"][1]()).backward()
        opt.step()
    refs = [weakref.ref(p.grad) for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs)


@pytest.mark.parametrize("change", ["param data", "grad storage", "state buffer", "state storage"])
@needs_cpu_backend
def test_replanned_when_a_tensor_moves(change):
    """Whatever moves a tensor the plan addresses invalidates it (or, for a
    gradient, rebinds it), and the next step updates the tensors now in place
    (never a stale address)."""
    model = build("mlp", 16)
    opt = MuAdam(model.parameters(), lr=1e-2, backend="cpu")
    train("mlp", model, opt, steps=1)
    loss_of("mlp", model, MODELS["mlp"][1]()).backward()
    first = opt._batches
    w = model.hidden.weight
    if change == "param data":
        w.data = w.data.clone()
    elif change == "grad storage":
        w.grad.data = w.grad.data.clone()
    elif change == "state buffer":
        opt.state[w]["exp_avg"] = opt.state[w]["exp_avg"].clone()
    else:
        opt.state[w]["exp_avg_sq"].data = opt.state[w]["exp_avg_sq"].data.clone()
    before = w.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[w].items()}
    opt.step()
    if change == "grad storage":  # the plan stays and follows the new address
        assert opt._batches is first
        assert any(w.grad.data_ptr() in row for b in first for row in _grad_rows(b))
    else:
        assert opt._batches is not first
    assert not torch.equal(w, before)
    for key in ("exp_avg", "exp_avg_sq"):
        assert not torch.equal(opt.state[w][key], state_before[key]), key


def test_params_without_grad_are_skipped():
    model = build("mlp", 16)
    opt = MuAdam(model.parameters(), lr=1e-2)
    frozen = model.inp.weight.detach().clone()
    model.inp.weight.requires_grad_(False)
    train("mlp", model, opt, steps=2)
    assert torch.equal(model.inp.weight, frozen)
    assert model.inp.weight not in opt.state
    assert opt.state[model.hidden.weight]["step"].item() == 2


def test_empty_parameter_is_harmless():
    model = build("mlp", 16)
    empty = nn.Parameter(torch.zeros(0, 16))
    empty.infshape = InfShape([InfDim(None, 0), InfDim(8, 16)])
    opt = MuAdam(list(model.parameters()) + [empty], lr=1e-2)
    loss_of("mlp", model, MODELS["mlp"][1]()).backward()
    empty.grad = torch.zeros(0, 16)
    opt.step()
    assert opt.state[empty]["exp_avg"].shape == (0, 16)


def test_grad_scaler_skips_inf_steps_and_unscales():
    """GradScaler drives the optimizer through _step_supports_amp_scaling."""
    model = build("mlp", 16)
    twin = clone(model)
    opt = MuAdam(model.parameters(), lr=1e-2)
    ref = MuAdam(twin.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    batch = MODELS["mlp"][1]()
    scaler.scale(loss_of("mlp", model, batch)).backward()
    scaler.step(opt)
    scaler.update()
    loss_of("mlp", twin, batch).backward()
    ref.step()
    torch.testing.assert_close(list(model.parameters()), list(twin.parameters()), rtol=1e-6, atol=1e-7)

    before = _snapshot(model, opt)
    opt.zero_grad()
    scaler.scale(loss_of("mlp", model, batch)).backward()
    model.hidden.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    _unchanged(model, opt, before)


def test_step_hooks_run():
    model = build("mlp", 16)
    opt = MuSGD(model.parameters(), lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    train("mlp", model, opt, steps=1)
    assert calls == ["pre", "post"]


def test_closure_is_evaluated_with_grad():
    model = build("mlp", 16)
    opt = MuAdam(model.parameters(), lr=1e-2)
    batch = MODELS["mlp"][1]()

    def closure():
        opt.zero_grad()
        loss = loss_of("mlp", model, batch)
        loss.backward()
        return loss

    assert opt.step(closure) is not None
    assert opt.state[model.inp.weight]["step"].item() == 1


# ----------------------------------------------------------------------------
# tensor_hyperparameters(): the table as the user reads it
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kw", OPTIMIZERS)
def test_tensor_hyperparameters_are_the_rows_the_step_uses(cls, kw):
    """Per-tensor lr and weight decay after μP (mup's rule table) and
    param_lr_scales, the other columns from the groups; equal to the rows
    the next step's batches hold."""
    model = build("mlp", 64)
    hidden, bias = model.hidden.weight, model.inp.bias
    groups = [{"params": [hidden], "lr": 0.5, "weight_decay": 0.25}, {"params": [p for p in model.parameters() if p is not hidden]}]
    opt = cls(groups, **{**kw, "weight_decay": 0.1}, param_lr_scales={bias: 3.0})
    table = opt.tensor_hyperparameters()
    assert list(table) == [p for g in opt.param_groups for p in g["params"]]
    assert all(set(row) == set(cls.spec.columns) for row in table.values())
    m_in = hidden.infshape[1].width_mult()
    if opt.family == "adam":
        assert table[hidden]["lr"] == 0.5 / m_in and table[hidden]["weight_decay"] == 0.25 * m_in
    else:  # sgd: hidden matrices lr·m_out/m_in
        m_out = hidden.infshape[0].width_mult()
        assert table[hidden]["lr"] == pytest.approx(0.5 * m_out / m_in)
    assert table[bias]["lr"] == pytest.approx(3.0 * opt.defaults["lr"] * (1 if opt.family == "adam" else bias.infshape[0].width_mult()))
    train("mlp", model, opt, steps=1)
    for batch in opt._batches:
        for p, row in zip(batch.owners, batch.rows):
            assert [table[p][c] for c in batch.columns] == row.tolist()


# ----------------------------------------------------------------------------
# constructors: torch's arguments in the signature, the fastmup options handled once


def _plain_params():
    model = nn.Linear(2, 3)
    fastmup.set_base_shapes(model, None)  # every dim finite: μP multipliers of 1
    return list(model.parameters())


@pytest.mark.parametrize(
    "ours, theirs",
    [(MuAdam, torch.optim.Adam), (MuAdamW, torch.optim.AdamW), (MuSGD, torch.optim.SGD)],
)
def test_param_groups_have_torchs_keys_in_torchs_order(ours, theirs):
    """The group defaults are built from the constructor's signature: torch's
    keys come first, in torch's order, with torch's default values."""
    group = ours(_plain_params(), backend="eager").param_groups[0]
    expected = theirs(_plain_params(), lr=1e-3).param_groups[0]
    shared = [k for k in group if k in expected]
    assert shared == list(expected)
    assert {k: group[k] for k in shared if k != "params"} == {k: v for k, v in expected.items() if k != "params"}


def test_adamw_signature_and_positional_arguments():
    import inspect

    parameters = inspect.signature(MuAdamW).parameters
    assert list(parameters)[:6] == ["params", "lr", "betas", "eps", "weight_decay", "amsgrad"]
    assert parameters["weight_decay"].default == 1e-2
    opt = MuAdamW(_plain_params(), 3e-3, (0.8, 0.9), 1e-6, 0.5, True, maximize=True, backend="eager")
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"], group["amsgrad"]) == (3e-3, (0.8, 0.9), 1e-6, 0.5, True)
    assert group["maximize"] and group["decoupled_weight_decay"] and opt.backend == "eager"
    with pytest.raises(TypeError, match="decoupled_weight_decay"):
        MuAdamW(_plain_params(), decoupled_weight_decay=False)


@pytest.mark.parametrize("cls", [MuAdam, MuAdamW, MuSGD, fastmup.optim.MuESGD])
def test_unknown_keyword_is_a_type_error_naming_it(cls):
    with pytest.raises(TypeError, match="backnd"):
        cls(_plain_params(), backnd="eager")


def test_options_reach_the_base_constructor():
    params = _plain_params()
    opt = MuSGD(params, lr=0.1, backend="eager", state_dtype=torch.float64, param_lr_scales={params[0]: 0.5}, rounding_seed=7)
    assert (opt.backend, opt.state_dtype, opt.rounding_seed) == ("eager", torch.float64, 7)
    assert opt._lr_scales == {params[0]: 0.5}
    with pytest.raises(ValueError, match="backend='nope'"):
        MuSGD(_plain_params(), backend="nope")


@pytest.mark.parametrize("name, value", [("stochastic_rounding", True), ("master_weights", "fp32"), ("rounding_seed", 3)])
def test_esgd_refuses_the_low_precision_options_by_name(name, value):
    with pytest.raises(NotImplementedError, match=f"{name}={value!r}"):
        fastmup.optim.MuESGD(_plain_params(), **{name: value})


@pytest.mark.parametrize("checks", ["python", "compiled"])
@pytest.mark.filterwarnings("ignore:fastmup. backend='auto' steps some tensors on the eager:RuntimeWarning")
@needs_cpu_backend
def test_the_plan_checks_follow_every_change(checks, monkeypatch):
    """Both implementations of the per-step checks (Python, and compiled:
    fastmup.ext.plan_checks) keep the plan exactly when they should and step
    the tensors now in place, as the eager reference steps them."""
    monkeypatch.setenv("FASTMUP_PLAN_CHECKS", checks)
    if checks == "compiled" and fastmup.ext.plan_checks() is None:
        pytest.skip("the plan module cannot be built here")
    model = build("mlp", 16)
    twin = clone(model)
    opt = MuSGD(model.parameters(), lr=0.1, momentum=0.9, backend="auto")  # auto: a strided gradient steps on the eager path
    ref = MuSGD(twin.parameters(), lr=0.1, momentum=0.9, backend="eager")
    w, tw = model.hidden.weight, twin.hidden.weight

    def misaligned(g):
        out = torch.empty(g.numel() + 1, dtype=g.dtype)[1:].view_as(g)
        return out.copy_(g)

    changes = {
        "new gradients": lambda: None,
        "one without a gradient": lambda: setattr(model.inp.weight, "grad", None) or setattr(twin.inp.weight, "grad", None),
        "a misaligned gradient": lambda: setattr(w, "grad", misaligned(w.grad)),
        "a strided gradient": lambda: setattr(w, "grad", w.grad.t().contiguous().t()),
        "new param data": lambda: setattr(w, "data", w.data.clone()),
        "a new state buffer": lambda: opt.state[w].__setitem__("momentum_buffer", opt.state[w]["momentum_buffer"].clone()),
        "the same gradient tensors": None,
    }
    kept = {}
    train("mlp", model, opt, steps=1)
    train("mlp", twin, ref, steps=1)
    for name, change in changes.items():
        batch = MODELS["mlp"][1]()
        for m, o in ((model, opt), (twin, ref)):
            if change is not None:
                o.zero_grad(set_to_none=True)
            loss_of("mlp", m, batch).backward()
        if change is not None:
            change()
        before = opt._batches
        opt.step()
        ref.step()
        kept[name] = opt._batches is before
        torch.testing.assert_close(list(model.parameters()), list(twin.parameters()), rtol=1e-6, atol=1e-7, msg=name)
        assert {b.backend for b in opt._batches} <= {"cpu", "eager"}
        assert (opt._plan_inputs.checks is not None) == (checks == "compiled"), name
        if opt._batches is before:
            for b in opt._batches:
                assert all(row == [0 if p.grad is None else p.grad.data_ptr() for p in b.owners] for row in _grad_rows(b)), name
    assert kept == {
        "new gradients": True,
        "one without a gradient": True,
        "a misaligned gradient": False,
        "a strided gradient": False,
        "new param data": False,
        "a new state buffer": False,
        "the same gradient tensors": True,
    }
    assert w.grad is not None and tw.grad is not None
