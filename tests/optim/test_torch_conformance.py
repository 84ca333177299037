"""MuAdam, MuAdamW and MuSGD at base width behave as torch.optim's Adam, AdamW and SGD.

Driven by torch's own optimizer database (``torch.testing._internal.
common_optimizers``: the configurations and the error inputs that torch's
generic optimizer suite runs), for every backend that runs on CPU tensors
here: ``auto`` (the default), ``eager``, ``cpu`` when the host extension
builds, and ``triton`` under Triton's interpreter.

At base width every μP multiplier is 1, so the expected numbers are
torch.optim's.  Tolerances:

* ``eager`` and ``auto`` with a float learning rate: bit-identical in
  float32 and float64 (the reference performs torch's single-tensor ops;
  ``auto`` steps float64 and non-contiguous tensors on it);
* the fused backends (``cpu``, ``triton``, and ``auto`` on float32): one
  fp32 rounding per step may differ (a fused multiply-add, a reciprocal
  where torch divides), so ``rtol=1e-5, atol=1e-6`` after 7 steps;
* a Tensor learning rate: torch computes ``lr / bias_correction`` in the lr
  tensor's dtype (float32) where fastmup computes it in float64, so fp32
  rounding of the step size (``rtol=1e-5, atol=1e-6``).
"""
from __future__ import annotations

import copy
import io
import pickle
import warnings
from typing import Any, Iterable

import pytest
import torch
from torch import nn
from torch import Tensor
from torch.nn import Parameter

from torch.optim.optimizer import register_optimizer_step_pre_hook

from fastmup.infshape import InfDim, InfShape
from fastmup.optim import MuAdam, MuAdamW, MuSGD

from .conftest import available_backends

common_optimizers = pytest.importorskip(
    "torch.testing._internal.common_optimizers", reason="this torch has no optimizer database (common_optimizers)"
)
OptimizerErrorEnum = common_optimizers.OptimizerErrorEnum

PAIRS = {"Adam": (MuAdam, torch.optim.Adam), "AdamW": (MuAdamW, torch.optim.AdamW), "SGD": (MuSGD, torch.optim.SGD)}
INFOS = {info.optim_cls.__name__: info for info in common_optimizers.optim_db if info.optim_cls.__name__ in PAIRS}


def _triton_interpreted() -> bool:
    import importlib.util
    import os

    return importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"


BACKENDS = ["auto"] + available_backends() + (["triton"] if _triton_interpreted() else [])
FUSED = [b for b in BACKENDS if b not in ("auto", "eager")]
#: what ``auto`` picks for CPU tensors here
AUTO_IS_FUSED = "cpu" in BACKENDS


# ----------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------
def at_base_width(params: Any) -> Any:
    """Give every tensor in ``params`` (a tensor, a list, named params or
    param groups) a base-width infshape: all μP multipliers 1."""

    def visit(x):
        if isinstance(x, Tensor):
            if not hasattr(x, "infshape"):
                x.infshape = InfShape([InfDim(None, d) for d in x.shape])
        elif isinstance(x, dict):
            visit(x.get("params", []))
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)

    visit(params)
    return params





def inputs(name: str, dtype=torch.float32):
    """torch's configurations for this optimizer, and each with foreach=True / fused=True."""
    info = INFOS[name]
    configs = common_optimizers._get_optim_inputs_including_global_cliquey_kwargs(
        "cpu", dtype, info, skip=("differentiable",)
    )
    return [pytest.param(c.kwargs, id=c.desc.replace(" ", "_")) for c in configs]


def build(name: str, params, kwargs: dict, backend: str):
    mu_cls, _ = PAIRS[name]
    return mu_cls(at_base_width(params), backend=backend, **copy.deepcopy(kwargs))


def torch_kwargs(kwargs: dict) -> dict:
    kw = copy.deepcopy(kwargs)
    kw["foreach"] = False  # torch's single-tensor path: the one the reference performs
    kw.pop("fused", None)
    return kw


def model_params(dtype, seed: int = 1, contiguous: bool = True) -> list[Parameter]:
    """The model of torch's derived-optimizer tests plus an empty param."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1), nn.Sigmoid()).to(dtype)
    params = [Parameter(p.detach().clone()) for p in model.parameters()]
    if not contiguous:  # same values, strided storage
        params = [Parameter(torch.stack([p.detach(), torch.zeros_like(p)], dim=-1)[..., 0]) for p in params]
        assert not params[0].is_contiguous()
    params.append(Parameter(torch.empty((0,), dtype=dtype)))
    return params


def forward_backward(params: list[Parameter], step: int) -> None:
    """A loss through the model; no gradients on step 3 (zero_grad only), as in torch's tests."""
    for p in params:
        p.grad = None
    if step == 3:
        return
    w1, b1, w2, b2 = params[:4]
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=w1.dtype).reshape(3, 2) * (1 + step)
    y = torch.sigmoid(torch.sigmoid(x @ w1.T + b1) @ w2.T + b2)
    (y.sum() + 0 * params[4].sum()).backward()


def train(opt, params, steps: int = 7, start: int = 0) -> None:
    for t in range(start, start + steps):
        forward_backward(params, t)
        opt.step()


def assert_params_match(mine, theirs, *, exact: bool, what: str = "") -> None:
    for i, (a, b) in enumerate(zip(mine, theirs)):
        assert torch.isfinite(a).all(), f"{what} param {i} is not finite: {a}"
        if exact:
            assert torch.equal(a, b), f"{what} param {i}: {a} != {b} (max diff {(a - b).abs().max() if a.numel() else 0})"
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} param {i}: {m}")


def assert_states_match(mine: torch.optim.Optimizer, theirs: torch.optim.Optimizer, params_m, params_t, *, exact: bool) -> None:
    for pm, pt in zip(params_m, params_t):
        sm, st = mine.state.get(pm, {}), theirs.state.get(pt, {})
        assert set(st) <= set(sm), (sorted(sm), sorted(st))
        for key, value in st.items():
            ours = sm[key]
            if key == "step":
                assert float(ours) == float(value), (key, ours, value)
            elif exact:
                assert torch.equal(ours, value), key
            else:
                torch.testing.assert_close(ours, value, rtol=1e-5, atol=1e-6)


def exact_for(backend: str, dtype: torch.dtype, kwargs: dict) -> bool:
    if isinstance(kwargs.get("lr"), Tensor) or any(isinstance(b, Tensor) for b in kwargs.get("betas", ())):
        return False
    return backend == "eager" or (backend == "auto" and (dtype == torch.float64 or not AUTO_IS_FUSED))


# ----------------------------------------------------------------------
# numerics: every configuration of torch's database, float32 and float64
# ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_matches_torch(name, backend, dtype):
    """Seven steps (one without gradients) on torch's model plus an empty
    param, for each of torch's configurations; params and state against
    torch's single-tensor implementation."""
    if backend in ("cpu", "triton") and dtype == torch.float64:
        pytest.skip("fused kernels take float32, bfloat16 and float16 (auto runs float64 on the eager path)")
    _, torch_cls = PAIRS[name]
    for config in inputs(name, dtype):
        kwargs = config.values[0]
        mine_params, their_params = model_params(dtype), model_params(dtype)
        mine = build(name, mine_params, kwargs, backend)
        theirs = torch_cls(their_params, **torch_kwargs(kwargs))
        train(mine, mine_params)
        train(theirs, their_params)
        exact = exact_for(backend, dtype, kwargs)
        assert_params_match(mine_params, their_params, exact=exact, what=f"{config.id}:")
        assert_states_match(mine, theirs, mine_params, their_params, exact=exact)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_non_contiguous_params(name, backend):
    """``auto`` and ``eager`` step non-contiguous params exactly as torch;
    a requested fused backend refuses them with a clear error and changes nothing."""
    _, torch_cls = PAIRS[name]
    kwargs = dict(lr=1e-2, weight_decay=0.1) | ({"momentum": 0.9} if name == "SGD" else {})
    mine_params, their_params = model_params(torch.float32, contiguous=False), model_params(torch.float32, contiguous=False)
    mine = build(name, mine_params, kwargs, backend)
    theirs = torch_cls(their_params, **torch_kwargs(kwargs))
    if backend in FUSED:
        forward_backward(mine_params, 0)
        before = [p.detach().clone() for p in mine_params]
        with pytest.raises(RuntimeError, match=r"parameter #0 of param group 0.*not|non-contiguous"):
            mine.step()
        assert all(torch.equal(p, q) for p, q in zip(mine_params, before)) and not mine.state
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(mine, mine_params)
    train(theirs, their_params)
    strided = [i for i, p in enumerate(mine_params) if not p.is_contiguous()]
    assert len(strided) >= 3
    assert_params_match([mine_params[i] for i in strided], [their_params[i] for i in strided], exact=True)
    assert_params_match(mine_params, their_params, exact=exact_for(backend, torch.float32, {}))
    notices = [w for w in caught if "eager reference path" in str(w.message)]
    assert len(notices) == (1 if backend == "auto" and AUTO_IS_FUSED else 0), [str(w.message) for w in caught]


# ----------------------------------------------------------------------
# learning rate as a Tensor, param-group hyperparameters
# ----------------------------------------------------------------------
@pytest.mark.parametrize("num_dim", [0, 1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_tensor_lr(name, backend, num_dim):
    """A one-element Tensor lr (0-d, 1-d, 2-d as torch's tests) gives
    torch's numbers, with every backend (never NaN), and follows in-place
    changes of the tensor (capturable LR schedules)."""
    _, torch_cls = PAIRS[name]
    for config in inputs(name):
        kwargs = dict(config.values[0])
        if isinstance(kwargs.get("lr"), Tensor) or kwargs.get("foreach"):
            continue  # torch refuses a Tensor lr with foreach=True (see the error inputs)
        kwargs["lr"] = torch.tensor(1e-3).reshape([1] * num_dim)
        mine_params, their_params = model_params(torch.float32), model_params(torch.float32)
        mine = build(name, mine_params, kwargs, backend)
        theirs = torch_cls(their_params, **torch_kwargs(kwargs))
        train(mine, mine_params, steps=4)
        train(theirs, their_params, steps=4)
        with torch.no_grad():
            mine.param_groups[0]["lr"].mul_(0.5)
            theirs.param_groups[0]["lr"].mul_(0.5)
        train(mine, mine_params, steps=3, start=4)
        train(theirs, their_params, steps=3, start=4)
        assert_params_match(mine_params, their_params, exact=False, what=f"{config.id}:")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_param_group_lr_and_weight_decay(name, backend):
    """Per-group lr and weight decay, one group with torch's defaults."""
    _, torch_cls = PAIRS[name]
    extra = {"momentum": 0.9} if name == "SGD" else {}

    def groups(params):
        return [
            {"params": params[:2], "weight_decay": 0.1},
            {"params": params[2:4], "lr": 3e-2, "weight_decay": 0.0},
            {"params": params[4:]},
        ]

    mine_params, their_params = model_params(torch.float32), model_params(torch.float32)
    mine = build(name, groups(mine_params), dict(lr=1e-2, **extra), backend)
    theirs = torch_cls(groups(their_params), lr=1e-2, foreach=False, **extra)
    train(mine, mine_params)
    train(theirs, their_params)
    assert_params_match(mine_params, their_params, exact=exact_for(backend, torch.float32, {}))


# ----------------------------------------------------------------------
# no-ops: zero gradients, params without gradients
# ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_zero_grads_and_missing_grads_are_noops(name, backend):
    for config in inputs(name):
        kwargs = config.values[0]
        params = model_params(torch.float32)
        opt = build(name, params, kwargs, backend)
        if opt.param_groups[0]["weight_decay"] != 0:
            continue  # weight decay moves params even with zero gradients (torch too)
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        assert all(torch.equal(p, q) for p, q in zip(params, before)), config.id
        for p in params:
            p.grad = None
        opt.step()
        assert all(torch.equal(p, q) for p, q in zip(params, before)), config.id
        fresh = model_params(torch.float32)
        untouched = build(name, fresh, kwargs, backend)
        untouched.step()
        assert not untouched.state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_gradients_that_come_and_go(name, backend):
    """Params whose gradient is missing on some steps (frozen branches,
    unused experts): skipped on those steps, their step counts not advanced,
    exactly as torch; the plan is kept (no re-planning)."""
    _, torch_cls = PAIRS[name]
    kwargs = dict(lr=1e-2, weight_decay=0.1) | ({"momentum": 0.9} if name == "SGD" else {})
    mine_params, their_params = model_params(torch.float32), model_params(torch.float32)
    mine = build(name, mine_params, kwargs, backend)
    theirs = torch_cls(their_params, **torch_kwargs(kwargs))
    plans = []
    for t in range(8):
        for params, opt in ((mine_params, mine), (their_params, theirs)):
            forward_backward(params, 0 if t == 3 else t)
            if t % 2:
                params[1].grad = None  # one bias loses its gradient every other step
            if t == 5:
                params[0].grad = None
            opt.step()
        plans.append(mine._batches)
    assert all(b is plans[1] for b in plans[1:]), "the plan was rebuilt"
    assert_params_match(mine_params, their_params, exact=exact_for(backend, torch.float32, {}))
    assert_states_match(mine, theirs, mine_params, their_params, exact=exact_for(backend, torch.float32, {}))


# ----------------------------------------------------------------------
# state dicts
# ----------------------------------------------------------------------
def _trained(name, backend, kwargs=None, steps: int = 3):
    kwargs = kwargs or dict(lr=1e-2, weight_decay=0.1) | ({"momentum": 0.9} if name == "SGD" else {"amsgrad": True})
    params = model_params(torch.float32)
    opt = build(name, params, kwargs, backend)
    train(opt, params, steps=steps)
    return params, opt, kwargs


def _resume(name, backend, kwargs, params, state_dict):
    twin = [Parameter(p.detach().clone()) for p in params]
    opt = build(name, twin, kwargs, backend)
    opt.load_state_dict(state_dict)
    return twin, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_older_state_dicts_load_and_step(name, backend):
    """A state dict without the newer group keys (torch's list, and
    fastmup's own) and with plain-number steps loads, fills defaults and
    resumes bit-identically."""
    params, opt, kwargs = _trained(name, backend)
    old = copy.deepcopy(opt.state_dict())
    dropped = set(INFOS[name].not_og_supported_flags) | {
        "maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_wd", "decoupled_weight_decay"
    }
    for group in old["param_groups"]:
        for key in dropped:
            group.pop(key, None)
    for state in old["state"].values():
        if "step" in state:
            state["step"] = state["step"].item()
    twin, resumed = _resume(name, backend, kwargs, params, old)
    assert resumed.param_groups[0].keys() == opt.param_groups[0].keys()
    train(opt, params, steps=3, start=3)
    train(resumed, twin, steps=3, start=3)
    assert_params_match(twin, params, exact=True)


@pytest.mark.parametrize("source", ["MuAdam", "torch.optim.Adam"])
def test_adamw_loading_an_adam_state_dict_still_decays_decoupled(source):
    params = model_params(torch.float32)
    adam = (build("Adam", params, dict(lr=1e-2, weight_decay=0.1), "eager") if source == "MuAdam"
            else torch.optim.Adam(params, lr=1e-2, weight_decay=0.1))
    train(adam, params, steps=2)
    sd = adam.state_dict()
    mine_params = [Parameter(p.detach().clone()) for p in params]
    their_params = [Parameter(p.detach().clone()) for p in params]
    mine = build("AdamW", mine_params, dict(lr=1e-2, weight_decay=0.1), "eager")
    theirs = torch.optim.AdamW(their_params, lr=1e-2, weight_decay=0.1, foreach=False)
    mine.load_state_dict(copy.deepcopy(sd))
    theirs.load_state_dict(copy.deepcopy(sd))
    assert all(g["decoupled_weight_decay"] for g in mine.param_groups)
    train(mine, mine_params, steps=3, start=2)
    train(theirs, their_params, steps=3, start=2)
    assert_params_match(mine_params, their_params, exact=True)


@pytest.mark.parametrize("name", list(PAIRS))
def test_named_state_dicts_to_and_from_torch(name):
    """Named params: ``param_names`` in the state dict, loadable by torch's
    optimizer and back (torch's named-state-dict test)."""
    mu_cls, torch_cls = PAIRS[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    at_base_width(list(model.parameters()))
    twin = copy.deepcopy(model)
    at_base_width(list(twin.parameters()))
    x = torch.randn(5, 3)
    mine = mu_cls(model.named_parameters(), lr=1e-2, backend="eager")
    theirs = torch_cls(twin.named_parameters(), lr=1e-2, foreach=False)
    for m, o in ((model, mine), (twin, theirs)):
        for _ in range(2):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    sd = mine.state_dict()
    assert sd["param_groups"][0]["param_names"] == [n for n, _ in model.named_parameters()]
    loaded_by_torch = torch_cls(copy.deepcopy(model).named_parameters(), lr=1e-2)
    loaded_by_torch.load_state_dict(copy.deepcopy(sd))
    back = mu_cls(model.named_parameters(), lr=1e-2, backend="eager")
    back.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert back.state_dict()["param_groups"][0]["param_names"] == sd["param_groups"][0]["param_names"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_state_dict_deterministic_and_weights_only_round_trip(name, backend):
    """Equal (not identical) params give equal state dicts; ``torch.save``
    then ``torch.load(weights_only=True)`` resumes bit-identically."""
    params, opt, kwargs = _trained(name, backend)
    params2, opt2, _ = _trained(name, backend, kwargs)
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd["param_groups"] == sd2["param_groups"]
    for k in sd["state"]:
        for key, value in sd["state"][k].items():
            assert torch.equal(value, sd2["state"][k][key]), key
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    twin, resumed = _resume(name, backend, kwargs, params, loaded)
    train(opt, params, steps=3, start=3)
    train(resumed, twin, steps=3, start=3)
    assert_params_match(twin, params, exact=True)


# ----------------------------------------------------------------------
# hooks, printing, deepcopy, pickle
# ----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PAIRS))
def test_every_hook_runs_in_order(name):
    params = model_params(torch.float32)
    opt = build(name, params, dict(lr=1e-2), "auto")
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("step_pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("step_post"))
    handle = register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global_pre"))
    try:
        forward_backward(params, 0)
        opt.step()
    finally:
        handle.remove()
    assert calls == ["global_pre", "step_pre", "step_post"]

    calls.clear()
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre_first"), prepend=True)

    def sd_post(o, sd):
        calls.append("sd_post")
        sd["extra"] = 1
        return sd

    opt.register_state_dict_post_hook(sd_post)
    sd = opt.state_dict()
    assert calls == ["sd_pre_first", "sd_pre", "sd_post"] and sd["extra"] == 1

    calls.clear()

    def load_pre(o, sd):
        calls.append("load_pre")
        sd = copy.deepcopy(sd)
        sd.pop("extra", None)
        return sd

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre_first"), prepend=True)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    opt.load_state_dict(sd)
    assert calls == ["load_pre_first", "load_pre", "load_post"]
    repr(opt)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_copies_continue_exactly(name, backend, how):
    """A deep copy or an unpickled optimizer has the same public attributes
    and continues exactly as the original."""
    params, opt, kwargs = _trained(name, backend, dict(lr=1e-2, weight_decay=0.1) | (
        {"momentum": 0.9} if name == "SGD" else {"amsgrad": True}), steps=3)
    opt.state_dtype = torch.float32 if backend != "eager" else None
    if how == "deepcopy":
        copy_ = copy.deepcopy(opt)
    else:
        copy_ = pickle.loads(pickle.dumps(opt))
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public == {k for k in vars(copy_) if not k.startswith("_")}
    assert copy_.backend == opt.backend and copy_.state_dtype == opt.state_dtype
    copied = copy_.param_groups[0]["params"] + [p for g in copy_.param_groups[1:] for p in g["params"]]
    assert all(torch.equal(a, b) and a is not b for a, b in zip(copied, params))
    train(opt, params, steps=3, start=3)
    train(copy_, copied, steps=3, start=3)
    assert_params_match(copied, params, exact=True)


# ----------------------------------------------------------------------
# errors: torch's error inputs with torch's messages, and what fastmup refuses
# ----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PAIRS))
def test_torch_error_inputs(name):
    mu_cls, _ = PAIRS[name]
    error_inputs = INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)
    assert error_inputs
    for error_input in error_inputs:
        config = error_input.optimizer_error_input
        params = at_base_width(config.params)
        kwargs = config.kwargs
        if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            if issubclass(error_input.error_type, Warning):
                with pytest.warns(error_input.error_type, match=error_input.error_regex):
                    mu_cls(params, **kwargs)
            else:
                with pytest.raises(error_input.error_type, match=error_input.error_regex):
                    mu_cls(params, **kwargs)
        else:
            opt = mu_cls(params, **kwargs)
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                opt.step()


@pytest.mark.parametrize("name", list(PAIRS))
def test_unsupported_features_say_so(name):
    mu_cls, _ = PAIRS[name]
    with pytest.raises(NotImplementedError, match="differentiable=True is not supported"):
        mu_cls(at_base_width([Parameter(torch.randn(3))]), differentiable=True)
    z = Parameter(torch.randn(3, dtype=torch.complex64))
    opt = mu_cls(at_base_width([z]), lr=1e-2)
    z.grad = torch.randn_like(z)
    with pytest.raises(TypeError, match="complex parameters are not supported"):
        opt.step()
    assert not opt.state
    # implementation switches are accepted and recorded in the groups, as torch does
    for flags in (dict(foreach=True), dict(fused=True), dict(foreach=False, fused=False)):
        opt = mu_cls(at_base_width([Parameter(torch.randn(3))]), lr=1e-2, **flags)
        assert all(opt.param_groups[0][k] == v for k, v in flags.items())


def test_sparse_gradients_as_torch():
    """torch's SGD takes sparse gradients; so does MuSGD under auto/eager (same
    numbers); torch's Adam refuses them, and so does MuAdam."""
    def run(cls, kwargs):
        torch.manual_seed(0)
        emb = nn.Embedding(10, 4, sparse=True)
        at_base_width(list(emb.parameters()))
        opt = cls(emb.parameters(), **kwargs)
        for t in range(3):
            opt.zero_grad()
            emb(torch.tensor([1, 3, 3, t])).pow(2).sum().backward()
            assert emb.weight.grad.is_sparse
            opt.step()
        return emb.weight.detach()

    for kwargs in (dict(lr=0.1), dict(lr=0.1, momentum=0.9), dict(lr=0.1, momentum=0.9, dampening=0.5, maximize=True)):
        expected = run(torch.optim.SGD, kwargs)
        for backend in ("auto", "eager"):
            # the densified gradient sums repeated indices in another order: an ulp
            torch.testing.assert_close(run(MuSGD, dict(kwargs, backend=backend)), expected, rtol=2e-7, atol=1e-7)
    with pytest.raises(RuntimeError, match="sparse gradient"):
        run(MuAdam, dict(lr=0.1))
