"""mup 1.0's split param groups: ``impl=``, ``process_param_groups``, and
resuming from a mup optimizer's checkpoint.  mup runs beside fastmup on the
same seeds; results are compared bit for bit (torch optimizers on the same
groups, or fastmup's eager reference)."""
import io

import pytest
import torch
from torch import nn

import fastmup
from fastmup.optim import mup_groups
from fastmup.optim.mup_groups import mup_param_groups, process_param_groups, regroup_state_dict

mup = pytest.importorskip("mup")

try:
    from tests.models import make_mlp, make_mup_mlp, make_mup_transformer, make_transformer, set_shapes
except ImportError:
    from models import make_mlp, make_mup_mlp, make_mup_transformer, make_transformer, set_shapes

WIDTH = 32


def pair(kind="mlp", seed=0):
    ours_fn, theirs_fn = {"mlp": (make_mlp, make_mup_mlp), "transformer": (make_transformer, make_mup_transformer)}[kind]
    torch.manual_seed(seed)
    ours = set_shapes(ours_fn, WIDTH)
    torch.manual_seed(seed)
    theirs = set_shapes(theirs_fn, WIDTH, lib=mup)
    return ours, theirs


def batches(kind, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return [(torch.randn(8, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]
    return [(torch.randint(0, 37, (2, 8), generator=g), torch.randint(0, 37, (2, 8), generator=g)) for _ in range(n)]


def train(model, opt, data, scheduler=None):
    for x, y in data:
        opt.zero_grad()
        out = model(x)
        nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_identical(a, b):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{n}: max diff {(p - q).abs().max().item()}"


def groups_of(model, split_biases):
    """The user's param groups: all params, or weights and biases apart
    (no weight decay on biases, another lr)."""
    if not split_biases:
        return list(model.parameters())
    weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights}, {"params": biases, "weight_decay": 0.0, "lr": 3e-3}]


def summary(opt):
    return [({k: v for k, v in g.items() if k != "params"}, [id(p) for p in g["params"]]) for g in opt.param_groups]


# ---------------------------------------------------------------------------
# impl=


@pytest.mark.parametrize("split_biases", [False, True])
@pytest.mark.parametrize(
    "ours,theirs,impl,kw",
    [
        ("MuAdam", "MuAdam", torch.optim.RMSprop, dict(lr=1e-2, weight_decay=1e-3, alpha=0.9)),
        ("MuAdam", "MuAdam", torch.optim.Adagrad, dict(lr=1e-2, weight_decay=1e-3)),
        ("MuAdam", "MuAdam", torch.optim.Adamax, dict(lr=1e-2)),
        ("MuSGD", "MuSGD", torch.optim.ASGD, dict(lr=1e-2, weight_decay=1e-3)),
        ("MuSGD", "MuSGD", torch.optim.Rprop, dict(lr=1e-3)),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_impl_builds_the_groups_mup_builds(ours, theirs, impl, kw, split_biases):
    model, twin = pair()
    opt = getattr(fastmup, ours)(groups_of(model, split_biases), impl=impl, **kw)
    ref = getattr(mup, theirs)(groups_of(twin, split_biases), impl=impl, **kw)
    assert type(opt) is type(ref) is impl
    assert [g for g, _ in summary(opt)] == [g for g, _ in summary(ref)]
    names = {id(p): n for n, p in model.named_parameters()}
    twin_names = {id(p): n for n, p in twin.named_parameters()}
    assert [[names[i] for i in ids] for _, ids in summary(opt)] == [[twin_names[i] for i in ids] for _, ids in summary(ref)]
    data = batches("mlp", 3)
    train(model, opt, data)
    train(twin, ref, data)
    assert_identical(model, twin)


def test_impl_with_several_multipliers_and_named_parameters():
    """A transformer (tied readout) given by name, Adam-like and SGD-like."""
    model, twin = pair("transformer")
    opt = fastmup.MuAdam(model.named_parameters(), impl=torch.optim.RMSprop, lr=1e-2)
    ref = mup.MuAdam(twin.parameters(), impl=torch.optim.RMSprop, lr=1e-2)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups] == [1e-2 / 4, 1e-2]
    assert all("param_names" in g for g in opt.param_groups)
    data = batches("transformer", 2)
    train(model, opt, data)
    train(twin, ref, data)
    assert_identical(model, twin)
    opt = fastmup.MuSGD(model.named_parameters(), impl=torch.optim.ASGD, lr=1e-2)
    ref = mup.MuSGD(twin.parameters(), impl=torch.optim.ASGD, lr=1e-2)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups]
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in ref.param_groups] == [4, 12, 0]
    train(model, opt, data)
    train(twin, ref, data)
    assert_identical(model, twin)


@pytest.mark.parametrize(
    "ours,impl,kw,expect",
    [
        ("MuAdam", torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3), dict(decoupled_weight_decay=False)),
        ("MuAdam", torch.optim.AdamW, dict(lr=1e-2), dict(decoupled_weight_decay=True, weight_decay=0.0)),
        ("MuAdamW", torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1), dict(decoupled_weight_decay=True)),
        ("MuSGD", torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3), {}),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_impl_of_a_native_optimizer_is_the_fused_one(ours, impl, kw, expect):
    """impl=torch.optim.Adam/AdamW/SGD: fastmup's own optimizer, the same
    trajectory as mup's (which builds torch's on its split groups)."""
    model, twin = pair()
    opt = getattr(fastmup, ours)(model.parameters(), impl=impl, backend="eager", **kw)
    ref = getattr(mup, "MuSGD" if ours == "MuSGD" else "MuAdam")(twin.parameters(), impl=impl, **kw)
    assert isinstance(opt, getattr(fastmup, ours)) and len(opt.param_groups) == 1
    for key, value in expect.items():
        assert opt.param_groups[0][key] == value
    data = batches("mlp", 3)
    train(model, opt, data)
    train(twin, ref, data)
    assert_identical(model, twin)


def test_impl_extras_and_errors():
    model, twin = pair()
    # lr defaults to the impl's own default
    opt = fastmup.MuAdam(model.parameters(), impl=torch.optim.RMSprop)
    assert opt.param_groups[-1]["lr"] == 1e-2 and opt.param_groups[0]["lr"] == 1e-2 / 4
    # decoupled_wd leaves weight decay unscaled; param_lr_scales split further
    opt = fastmup.MuAdam(model.parameters(), impl=torch.optim.RMSprop, lr=1.0, weight_decay=0.5, decoupled_wd=True,
                         param_lr_scales={model.fc2.weight: 0.5})
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups] == [(0.125, 0.5, 1), (1.0, 0.5, 5)]
    with pytest.raises(TypeError, match="backend= applies to fastmup's own optimizers"):
        fastmup.MuAdam(model.parameters(), impl=torch.optim.RMSprop, backend="eager")
    with pytest.raises(TypeError, match="impl="):
        fastmup.MuAdam(model.parameters(), torch.optim.RMSprop)
    with pytest.raises(TypeError, match="by keyword"):
        fastmup.MuSGD(model.parameters(), 0.1, impl=torch.optim.ASGD)
    with pytest.raises(ValueError, match="no μP base shapes"):
        fastmup.MuAdam(make_mlp(4).parameters(), impl=torch.optim.RMSprop, lr=1e-3)
    # mup's own functional spelling: a callable impl
    opt = fastmup.MuAdam(model.parameters(), impl=lambda groups, **kw: torch.optim.RMSprop(groups, **kw), lr=1e-3)
    assert isinstance(opt, torch.optim.RMSprop)


def test_process_param_groups_as_mup():
    model, _ = pair()
    params = list(model.parameters())
    for given, kw in [(params, dict(lr=0.1)), (params, dict(lr=0.1, weight_decay=0.2)),
                      ([{"params": params[:2]}, {"params": params[2:], "lr": 0.5, "momentum": 0.9}], dict(lr=0.1))]:
        ours = process_param_groups(iter(given), **kw)
        theirs = mup.optim.process_param_groups([dict(g) if isinstance(g, dict) else g for g in given], **kw)
        assert ours == theirs
    assert fastmup.process_param_groups is fastmup.optim.process_param_groups is process_param_groups
    user = [{"params": params}]
    process_param_groups(user, lr=0.1)
    assert user == [{"params": params}]  # the user's dicts are left alone (mup writes into them)
    with pytest.raises(TypeError, match="param group 0 has no 'lr'"):
        process_param_groups(params)
    with pytest.raises(ValueError, match="empty parameter list"):
        process_param_groups([])


def test_mup_param_groups_family():
    model, _ = pair()
    with pytest.raises(ValueError, match="'adam' and 'sgd'"):
        mup_param_groups([{"params": list(model.parameters()), "lr": 1.0, "weight_decay": 0.0}], "esgd")


# ---------------------------------------------------------------------------
# resuming from a mup checkpoint


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


CHECKPOINTS = [
    ("mlp", "MuAdam", dict(lr=1e-2, weight_decay=1e-3), False),
    ("mlp", "MuAdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True), True),
    ("mlp", "MuSGD", dict(lr=0.1, momentum=0.9, weight_decay=1e-3), True),
    ("transformer", "MuAdamW", dict(lr=1e-2, weight_decay=0.1), False),
    ("transformer", "MuSGD", dict(lr=0.1, momentum=0.9, nesterov=True), True),
]


@pytest.mark.parametrize("kind,name,kw,split_biases", CHECKPOINTS)
def test_mup_checkpoint_resumes_with_the_same_trajectory(kind, name, kw, split_biases):
    """mup trains 2 steps and saves; fastmup, built on the user's groups,
    loads model and optimizer and trains 2 more: the same as mup's 2 more."""
    _, twin = pair(kind)
    ref = getattr(mup, name)(groups_of(twin, split_biases), **kw)
    data = batches(kind, 4)
    train(twin, ref, data[:2])
    ckpt = roundtrip({"model": twin.state_dict(), "opt": ref.state_dict()})
    assert len(ckpt["opt"]["param_groups"]) > (2 if split_biases else 1)  # mup's split layout

    torch.manual_seed(5)  # another init: everything comes from the checkpoint
    model = set_shapes(make_mlp if kind == "mlp" else make_transformer, WIDTH)
    model.load_state_dict(ckpt["model"])
    opt = getattr(fastmup, name)(groups_of(model, split_biases), **kw, backend="eager")
    opt.load_state_dict(ckpt["opt"])
    assert len(opt.param_groups) == (2 if split_biases else 1)
    assert opt.param_groups[0]["lr"] == kw["lr"] and opt.param_groups[0]["weight_decay"] == kw.get("weight_decay", 0.0)
    for p, q in zip(model.parameters(), twin.parameters()):
        for key, value in ref.state[q].items():
            assert torch.equal(opt.state[p][key], value), key
    train(model, opt, data[2:])
    train(twin, ref, data[2:])
    assert_identical(model, twin)
    # and fastmup's own checkpoint of the resumed run loads as before
    again = getattr(fastmup, name)(groups_of(model, split_biases), **kw, backend="eager")
    own = roundtrip(opt.state_dict())
    assert regroup_state_dict(again, own) is own
    again.load_state_dict(own)
    assert [g["lr"] for g in again.param_groups] == [g["lr"] for g in opt.param_groups]


def test_mup_checkpoint_with_an_lr_scheduler():
    """Scheduler state is per group: the optimizer takes the base values (lr,
    initial_lr) from the unscaled group of each split, and
    regroup_scheduler_state_dict does the same for the scheduler's lists."""
    model, twin = pair()
    kw = dict(lr=0.1, momentum=0.9)
    ref = mup.MuSGD(twin.parameters(), **kw)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda epoch: 0.5**epoch)
    data = batches("mlp", 4)
    train(twin, ref, data[:2], ref_sched)
    ckpt = roundtrip({"opt": ref.state_dict(), "sched": ref_sched.state_dict()})
    model.load_state_dict(twin.state_dict())
    opt = fastmup.MuSGD(model.parameters(), **kw, backend="eager")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5**epoch)
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(mup_groups.regroup_scheduler_state_dict(opt, ckpt["sched"]))
    assert opt.param_groups[0]["lr"] == 0.1 * 0.25 and opt.param_groups[0]["initial_lr"] == 0.1
    assert sched.base_lrs == [0.1] and sched.get_last_lr() == [0.1 * 0.25]
    train(model, opt, data[2:], sched)
    train(twin, ref, data[2:], ref_sched)
    assert_identical(model, twin)
    assert mup_groups.regroup_scheduler_state_dict(opt, sched.state_dict()) == sched.state_dict()


def test_foreign_layouts_are_refused_with_a_reason():
    model, twin = pair()
    ref = mup.MuAdam(twin.parameters(), lr=1e-2)
    train(twin, ref, batches("mlp", 1))
    sd = ref.state_dict()
    opt = fastmup.MuAdam(model.parameters(), lr=1e-2, backend="eager")
    bad = {**sd, "param_groups": [dict(g) for g in sd["param_groups"]]}
    bad["param_groups"][0]["lr"] = 1e-2  # the matrix group's lr should be lr/4
    with pytest.raises(ValueError, match=r"param group 0 has lr=0.01, but as mup 1.0's split .* lr=0.0025"):
        opt.load_state_dict(bad)
    # neither layout: the usual error, optimizer unchanged
    with pytest.raises(ValueError, match="the loaded state dict has 1 parameters"):
        opt.load_state_dict({"state": {}, "param_groups": sd["param_groups"][:1]})
    assert opt.param_groups[0]["lr"] == 1e-2 and not opt.state
    # ESGD-M has no mup counterpart: nothing is translated
    esgd = fastmup.MuESGD(model.parameters(), lr=1e-2)
    assert mup_groups.regroup_state_dict(esgd, sd) is sd
