"""Parameters put in the place of ones with an infshape find it again.

Each case runs mup 1.0 beside fastmup from the same seed: mup needs a second
``set_base_shapes`` (or cannot do it at all), fastmup needs nothing, and
training from there is bit-identical (``backend="eager"``).
"""
import copy
import gc
import io
import weakref

import mup
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

import fastmup
from fastmup import infshape_registry
from fastmup.infshape import MissingInfShapeError

try:
    from tests.models import make_mlp, make_mup_mlp, make_mup_transformer, make_transformer, set_shapes
except ImportError:
    from models import make_mlp, make_mup_mlp, make_mup_transformer, make_transformer, set_shapes

WIDTH = 32


def pair(kind="mlp", seed=0):
    """The same μP model built by fastmup and by mup from one seed."""
    ours_fn, theirs_fn = {"mlp": (make_mlp, make_mup_mlp), "transformer": (make_transformer, make_mup_transformer)}[kind]
    torch.manual_seed(seed)
    ours = set_shapes(ours_fn, WIDTH)
    torch.manual_seed(seed)
    theirs = set_shapes(theirs_fn, WIDTH, lib=mup)
    for (n, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(p, q), n
    return ours, theirs


def batches(kind, n=3):
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        return [(torch.randn(8, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]
    return [(torch.randint(0, 37, (2, 8), generator=g), torch.randint(0, 37, (2, 8), generator=g)) for _ in range(n)]


def train(model, opt, kind="mlp"):
    for x, y in batches(kind):
        opt.zero_grad()
        out = model(x)
        nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        opt.step()


def assert_identical(a, b):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{n}: max diff {(p - q).abs().max().item()}"


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_deepcopy_keeps_infshapes_and_trains_like_mup(kind):
    ours, theirs = pair(kind)
    twin = copy.deepcopy(ours)
    for (n, p), q in zip(ours.named_parameters(), twin.parameters()):
        assert q.infshape == p.infshape and q.infshape is not p.infshape, n
    if kind == "transformer":
        assert twin.readout.weight is twin.embed.weight
    # mup's optimizer refuses a deep copy of its own model
    with pytest.raises(AssertionError, match="infshape"):
        mup.MuAdam(copy.deepcopy(theirs).parameters(), lr=1e-2)
    opt = fastmup.MuAdam(twin.parameters(), lr=1e-2, weight_decay=1e-3, backend="eager")
    ref = mup.MuAdam(theirs.parameters(), lr=1e-2, weight_decay=1e-3)
    train(twin, opt, kind)
    train(theirs, ref, kind)
    assert_identical(twin, theirs)


def test_averaged_model_trains_like_mup():
    """An averaged copy (SWA/EMA) fine-tuned with its own μP optimizer."""
    ours, theirs = pair()
    opt = fastmup.MuSGD(ours.parameters(), lr=0.1, momentum=0.9, backend="eager")
    ref = mup.MuSGD(theirs.parameters(), lr=0.1, momentum=0.9)
    avg, ref_avg = AveragedModel(ours), AveragedModel(theirs)
    for x, y in batches("mlp"):
        for model, o, a in ((ours, opt, avg), (theirs, ref, ref_avg)):
            o.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            o.step()
            a.update_parameters(model)
    # mup needs its base shapes set again on the copy
    mup.set_base_shapes(ref_avg.module, make_mup_mlp(8), delta=make_mup_mlp(16), rescale_params=False)
    assert fastmup.base_shapes_state(avg) == {f"module.{k}": v for k, v in fastmup.base_shapes_state(ours).items()}
    opt = fastmup.MuAdamW(avg.parameters(), lr=1e-2, weight_decay=0.1, backend="eager")
    ref = mup.MuAdamW(ref_avg.parameters(), lr=1e-2, weight_decay=0.1)
    train(avg, opt)
    train(ref_avg, ref)
    assert_identical(avg, ref_avg)


def test_meta_init_and_to_empty_train_like_mup():
    ours, theirs = pair()
    with torch.device("meta"):
        model = make_mlp(WIDTH)
        fastmup.set_base_shapes(model, make_mlp(8), delta=make_mlp(16))
    model.to_empty(device="cpu")
    assert model.fc2.weight.device.type == "cpu" and not hasattr(model.fc2.weight, "infshape")
    # μP initializers find the infshape of the new parameters
    torch.manual_seed(3)
    fastmup.init.kaiming_normal_(model.fc2.weight, mode="fan_in")
    torch.manual_seed(3)
    mup.init.kaiming_normal_(theirs.fc2.weight, mode="fan_in")
    assert torch.equal(model.fc2.weight, theirs.fc2.weight)
    model.load_state_dict(theirs.state_dict())
    assert model.readout.width_mult() == 4.0
    opt = fastmup.MuAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, backend="eager")
    ref = mup.MuAdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, opt)
    train(theirs, ref)
    assert_identical(model, theirs)


def test_load_state_dict_assign_trains_like_mup():
    ours, theirs = pair()
    model = set_shapes(make_mlp, WIDTH)
    model.load_state_dict({k: v.clone() for k, v in theirs.state_dict().items()}, assign=True)
    assert not hasattr(model.fc2.weight, "infshape")
    assert fastmup.get_infshapes(model) == fastmup.get_infshapes(ours)
    opt = fastmup.MuSGD(model.parameters(), lr=0.1, weight_decay=1e-3, backend="eager")
    ref = mup.MuSGD(theirs.parameters(), lr=0.1, weight_decay=1e-3)
    train(model, opt)
    train(theirs, ref)
    assert_identical(model, theirs)


def test_swap_tensors_conversion_keeps_infshapes():
    model = set_shapes(make_mlp, WIDTH)
    expected = {n: p.infshape for n, p in model.named_parameters()}
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to(torch.float64)  # swap_tensors moves __dict__: the infshapes go with the old tensors
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    assert fastmup.get_infshapes(model) == expected
    opt = fastmup.MuAdam(model.parameters(), lr=1e-3, backend="eager")
    assert opt._mults[model.fc2.weight][0].den == 4.0


def test_pickled_model_keeps_infshapes():
    model = set_shapes(make_mlp, WIDTH)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert fastmup.get_infshapes(loaded) == fastmup.get_infshapes(model)
    fastmup.MuAdam(loaded.parameters(), lr=1e-3)


def test_records_hold_models_weakly():
    model = set_shapes(make_mlp, WIDTH)
    record = model.fc2.__dict__[infshape_registry.ATTR]
    assert record.owner is model.fc2 and record in infshape_registry._RECORDS
    module = weakref.ref(model.fc2)
    del model
    gc.collect()
    assert module() is None and record.owner is None


def test_errors_say_which_case():
    # never given base shapes (while other models are)
    keep = set_shapes(make_mlp, WIDTH)
    with pytest.raises(ValueError, match="held by no module of a model on which fastmup.set_base_shapes was called"):
        fastmup.MuAdam(make_mlp(WIDTH).parameters())
    with pytest.raises(MissingInfShapeError, match="held by no module"):
        fastmup.init.normal_(nn.Parameter(torch.zeros(3, 4)))
    # a parameter of another size put in a recorded slot
    keep.fc2.weight = nn.Parameter(torch.zeros(WIDTH, 2 * WIDTH))
    with pytest.raises(ValueError, match=r"replaced Linear.weight.*shape \[32, 32\].*set_base_shapes again"):
        fastmup.MuAdam(keep.parameters())
    del keep
    gc.collect()


def test_error_when_no_model_has_base_shapes(monkeypatch):
    monkeypatch.setattr(infshape_registry, "_RECORDS", type(infshape_registry._RECORDS)())
    monkeypatch.setattr(infshape_registry, "_INDEX", {})
    with pytest.raises(ValueError, match="has not been called on any model"):
        fastmup.MuAdam(make_mlp(4).parameters())
