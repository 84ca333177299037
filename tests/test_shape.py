import copy
import io
import json
import os
import pathlib

import mup
import pytest
import torch
import yaml
from torch import nn

import fastmup
from fastmup.infshape import InfDim, InfShape, MissingInfShapeError
from fastmup.shape import BaseShapesError, HiddenSizeError

try:
    from tests.models import ARCHS, BASE_WIDTH, DELTA_WIDTH, make_mlp, make_transformer, set_shapes
except ImportError:  # plain `pytest` with tests/ on sys.path
    from models import ARCHS, BASE_WIDTH, DELTA_WIDTH, make_mlp, make_transformer, set_shapes

WIDTH = 32


# ---------------------------------------------------------------------------
# helpers


def snapshot(model):
    """Everything set_base_shapes may change: values, Python attributes of params and modules."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "param_attrs": {n: dict(p.__dict__) for n, p in model.named_parameters()},
        "module_attrs": {
            n: {k: v for k, v in m.__dict__.items() if not k.startswith("_") or k in ("_width_mult", "_has_rescaled_params", "_fastmup_infshapes")}
            for n, m in model.named_modules()
        },
    }


def assert_unchanged(model, snap):
    now = snapshot(model)
    assert now["params"].keys() == snap["params"].keys()
    for n, v in snap["params"].items():
        assert torch.equal(now["params"][n], v), n
    assert now["param_attrs"] == snap["param_attrs"]
    assert now["module_attrs"].keys() == snap["module_attrs"].keys()
    for n in snap["module_attrs"]:
        assert now["module_attrs"][n].keys() == snap["module_attrs"][n].keys(), n
        for k, v in snap["module_attrs"][n].items():
            if not isinstance(v, (torch.Tensor, nn.Module)):
                assert now["module_attrs"][n][k] == v, (n, k)


def infshape_table(model):
    return {n: (p.infshape.serialize(), p.infshape.main_idx) for n, p in model.named_parameters()}


def write(path, text):
    path.write_text(text)
    return path


class Named(nn.Module):
    """Parameters whose names start with letters that str.strip('module.') eats."""

    def __init__(self, width):
        super().__init__()
        self.mlp = nn.Linear(width, width)
        self.embed = nn.Embedding(7, width)
        self.out = fastmup.MuReadout(width, 3)


class Wrapper(nn.Module):
    """Stands in for (Distributed)DataParallel: names get a `module.` prefix."""

    def __init__(self, module):
        super().__init__()
        self.module = module


# ---------------------------------------------------------------------------
# API surface


def test_all_matches_mup_public_api():
    mup_names = {
        "get_shapes", "get_infshapes", "save_base_shapes", "load_base_shapes", "zip_infshapes",
        "clear_dims", "make_base_shapes", "apply_infshapes", "set_base_shapes", "assert_hidden_size_inf",
    }
    assert set(fastmup.shape.__all__) == mup_names | {"base_shapes_state"}
    for name in fastmup.shape.__all__:
        assert callable(getattr(fastmup, name))
        assert name == "base_shapes_state" or hasattr(mup, name)


# ---------------------------------------------------------------------------
# parity with mup


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("width", [BASE_WIDTH, 24, 64])
def test_set_base_shapes_matches_mup(arch, width):
    fast_fn, mup_fn, batch = ARCHS[arch]
    torch.manual_seed(0)
    ours = set_shapes(fast_fn, width, lib=fastmup)
    torch.manual_seed(0)
    theirs = set_shapes(mup_fn, width, lib=mup)
    sa, sb = ours.state_dict(), theirs.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert infshape_table(ours) == infshape_table(theirs)
    x, _ = batch()
    assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_rescaling_really_happens(arch):
    fast_fn = ARCHS[arch][0]
    torch.manual_seed(0)
    plain = fast_fn(64)
    torch.manual_seed(0)
    model = set_shapes(fast_fn, 64)
    m = 64 / BASE_WIDTH
    ro = model.readout
    assert ro._width_mult == m
    ro_w_name = [n for n, p in model.named_parameters() if p is ro.weight][0]
    assert torch.allclose(dict(model.named_parameters())[ro_w_name], dict(plain.named_parameters())[ro_w_name] * m**0.5)
    # SP at base width: nothing changes
    torch.manual_seed(0)
    plain = fast_fn(BASE_WIDTH)
    torch.manual_seed(0)
    model = set_shapes(fast_fn, BASE_WIDTH)
    for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q), n


def test_base_none_is_standard_parametrization():
    torch.manual_seed(0)
    plain = make_mlp(WIDTH)
    torch.manual_seed(0)
    model = fastmup.set_base_shapes(make_mlp(WIDTH), None)
    for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q)
        assert p.infshape.ninf() == 0 and p.infshape.width_mult() == 1.0
    assert model.readout.width_mult() == 1.0


def test_make_base_shapes_matches_mup_and_files_are_identical(tmp_path):
    fast_fn, mup_fn, _ = ARCHS["transformer"]
    ours = fastmup.make_base_shapes(fast_fn(BASE_WIDTH), fast_fn(DELTA_WIDTH), tmp_path / "f.bsh")
    theirs = mup.make_base_shapes(mup_fn(BASE_WIDTH), mup_fn(DELTA_WIDTH), str(tmp_path / "m.bsh"))
    assert {k: v.serialize() for k, v in ours.items()} == {k: v.serialize() for k, v in theirs.items()}
    assert all(d.dim is None for s in ours.values() for d in s)
    assert (tmp_path / "f.bsh").read_text() == (tmp_path / "m.bsh").read_text()
    text = (tmp_path / "f.bsh").read_text()
    assert text.startswith("# ")
    body = yaml.safe_load(text)
    assert list(body) == sorted(body)
    assert body["embed.weight"] == [None, BASE_WIDTH] and body["qkv.weight"] == [3 * BASE_WIDTH, BASE_WIDTH]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_bsh_written_by_fastmup_is_read_by_mup(arch, tmp_path):
    fast_fn, mup_fn, _ = ARCHS[arch]
    path = tmp_path / "base.bsh"
    fastmup.make_base_shapes(fast_fn(BASE_WIDTH), fast_fn(DELTA_WIDTH), savefile=path)
    torch.manual_seed(1)
    theirs = mup.set_base_shapes(mup_fn(40), str(path))
    torch.manual_seed(1)
    ours = set_shapes(fast_fn, 40)
    assert infshape_table(ours) == infshape_table(theirs)
    for (n, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_bsh_written_by_mup_is_read_by_fastmup(arch, tmp_path):
    fast_fn, mup_fn, _ = ARCHS[arch]
    path = tmp_path / "base.bsh"
    mup.make_base_shapes(mup_fn(BASE_WIDTH), mup_fn(DELTA_WIDTH), savefile=str(path))
    torch.manual_seed(1)
    ours = fastmup.set_base_shapes(fast_fn(40), path)  # a pathlib.Path works too
    torch.manual_seed(1)
    theirs = set_shapes(mup_fn, 40, lib=mup)
    assert infshape_table(ours) == infshape_table(theirs)
    for (n, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.equal(p, q), n
    loaded = fastmup.load_base_shapes(str(path))
    assert {k: v.base_shape() for k, v in loaded.items()} == yaml.safe_load(path.read_text())


def test_savefile_writes_final_base_shapes(tmp_path):
    path = tmp_path / "sub.bsh"
    model = set_shapes(make_mlp, WIDTH, savefile=os.fspath(path))
    assert yaml.safe_load(path.read_text()) == fastmup.base_shapes_state(model)
    assert mup.load_base_shapes(str(path)).keys() == dict(model.named_parameters()).keys()


def test_save_base_shapes_accepts_model_dict_and_file_object(tmp_path):
    model = set_shapes(make_mlp, WIDTH)
    a, b = tmp_path / "a.bsh", tmp_path / "b.bsh"
    fastmup.save_base_shapes(model, a)
    fastmup.save_base_shapes(fastmup.base_shapes_state(model), b)
    buf = io.StringIO()
    fastmup.save_base_shapes(fastmup.get_infshapes(model), buf)
    assert a.read_text() == b.read_text() == buf.getvalue()
    with pytest.raises(TypeError, match="nn.Module or a dict"):
        fastmup.save_base_shapes([1, 2], tmp_path / "c.bsh")


def test_mup_infshape_dicts_are_accepted():
    bsh = mup.make_base_shapes(make_mlp(BASE_WIDTH), make_mlp(DELTA_WIDTH))
    torch.manual_seed(0)
    ours = fastmup.set_base_shapes(make_mlp(WIDTH), bsh)
    torch.manual_seed(0)
    ref = set_shapes(make_mlp, WIDTH)
    assert infshape_table(ours) == infshape_table(ref)


def test_zip_infshapes_and_get_functions_match_mup():
    base, target = make_mlp(BASE_WIDTH), make_mlp(WIDTH)
    ours = fastmup.zip_infshapes(base, target)
    theirs = mup.zip_infshapes(base, target)
    assert {k: v.serialize() for k, v in ours.items()} == {k: v.serialize() for k, v in theirs.items()}
    assert fastmup.get_shapes(target) == mup.get_shapes(target)
    cleared = fastmup.clear_dims(ours)
    assert all(d.dim is None for s in cleared.values() for d in s)
    assert all(d.dim is not None for s in ours.values() for d in s)  # input untouched


def test_clear_dims_keeps_main_idx():
    s = InfShape([InfDim(4, 8), InfDim(2, 8)])
    s.main_idx = 0
    assert fastmup.clear_dims({"w": s})["w"].main_idx == 0


def test_get_infshapes_without_base_shapes():
    with pytest.raises(MissingInfShapeError, match="set_base_shapes"):
        fastmup.get_infshapes(make_mlp(4))


def test_more_than_two_infinite_dims_get_an_infshape():
    class Cube(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.t = nn.Parameter(torch.zeros(w, w, w))

    model = fastmup.set_base_shapes(Cube(8), Cube(2), delta=Cube(4))
    assert model.t.infshape.ninf() == 3
    with pytest.raises(NotImplementedError, match="3 infinite"):
        fastmup.init.normal_(model.t)


# ---------------------------------------------------------------------------
# DataParallel prefix


@pytest.mark.parametrize("lib_base", [False, True], ids=["plain_base", "prefixed_base"])
def test_module_prefix_added_or_removed_exactly(lib_base, tmp_path):
    # base prefixed + model plain exercises the removal (mup strips characters)
    if lib_base:
        base, delta, model = Wrapper(Named(4)), Wrapper(Named(8)), Named(16)
        expect = {"mlp.weight", "mlp.bias", "embed.weight", "out.weight", "out.bias"}
    else:
        base, delta, model = Named(4), Named(8), Wrapper(Named(16))
        expect = {"module.mlp.weight", "module.mlp.bias", "module.embed.weight", "module.out.weight", "module.out.bias"}
    fastmup.set_base_shapes(model, base, delta=delta)
    assert set(fastmup.get_infshapes(model)) == expect
    assert fastmup.get_infshapes(model)[sorted(expect)[0]] is not None
    inner = model.module if isinstance(model, Wrapper) else model
    assert inner.mlp.weight.infshape == InfShape([InfDim(4, 16), InfDim(4, 16)])
    assert inner.out.width_mult() == 4.0
    # the same through a file written from the other convention
    path = tmp_path / "b.bsh"
    fastmup.make_base_shapes(base, delta, savefile=path)
    fresh = Named(16) if lib_base else Wrapper(Named(16))
    fastmup.set_base_shapes(fresh, path)
    assert infshape_table(fresh) == infshape_table(model)


def test_mup_strip_defect_is_fixed():
    # mup turns 'module.mlp.weight' into 'lp.weigh' and fails; fastmup must not
    base, model = Wrapper(Named(4)), Named(16)
    with pytest.raises(AssertionError):
        mup.set_base_shapes(model, base, delta=Wrapper(Named(8)))
    model = Named(16)
    fastmup.set_base_shapes(model, base, delta=Wrapper(Named(8)))
    assert model.embed.weight.infshape.base_shape() == [None, 4]


# ---------------------------------------------------------------------------
# errors leave the model unchanged


def fresh_mlp():
    torch.manual_seed(0)
    return make_mlp(WIDTH)


def test_name_mismatch_lists_missing_and_extra_names():
    model = fresh_mlp()
    snap = snapshot(model)
    base = {n: list(s) for n, s in fastmup.get_shapes(make_mlp(BASE_WIDTH)).items()}
    del base["fc2.bias"]
    base["extra.weight"] = [3, 3]
    with pytest.raises(BaseShapesError, match=r"missing from .*'fc2\.bias'.*does not have: \['extra\.weight'\]"):
        fastmup.set_base_shapes(model, base)
    assert_unchanged(model, snap)


def test_name_mismatch_between_base_and_delta():
    model = fresh_mlp()
    snap = snapshot(model)

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(3, 3)

    with pytest.raises(BaseShapesError, match=r"delta model.*'fc2\.weight'"):
        fastmup.set_base_shapes(model, make_mlp(BASE_WIDTH), delta=Other())
    assert_unchanged(model, snap)


def test_missing_file_is_named(tmp_path):
    model = fresh_mlp()
    snap = snapshot(model)
    missing = tmp_path / "nope.bsh"
    with pytest.raises(FileNotFoundError, match="nope.bsh"):
        fastmup.set_base_shapes(model, missing)
    with pytest.raises(FileNotFoundError, match="nope.bsh"):
        fastmup.set_base_shapes(model, str(missing))
    assert_unchanged(model, snap)


def _valid_bsh_lines():
    state = fastmup.base_shapes_state(set_shapes(make_mlp, BASE_WIDTH))
    return yaml.safe_dump(state)


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("fc1.weight: [8, null\n  - : ]]", "not valid YAML"),
        ("", "is empty"),
        ("- 1\n- 2\n", "must contain a mapping.*got a list"),
        ("just a string", "must contain a mapping.*got a str"),
        ("fc1.weight: 8\n", "'fc1.weight' must be a list"),
        ("fc1.weight: [8, a]\n", "'fc1.weight' has base dim 'a'"),
        ("fc1.weight: [8, true]\n", "'fc1.weight' has base dim True"),
        ("fc1.weight: [8, -1]\n", "'fc1.weight' has base dim -1"),
        ("fc1.weight: [8, 2.5]\n", "'fc1.weight' has base dim 2.5"),
        ("1: [8]\n", "names must be strings"),
    ],
    ids=["not_yaml", "empty", "list", "scalar", "entry_not_list", "str_dim", "bool_dim", "negative", "float", "int_key"],
)
def test_malformed_bsh_names_file_and_problem(tmp_path, content, pattern):
    path = write(tmp_path / "bad.bsh", content)
    model = fresh_mlp()
    snap = snapshot(model)
    with pytest.raises(BaseShapesError, match=rf"bad\.bsh.*{pattern}"):
        fastmup.set_base_shapes(model, path)
    assert_unchanged(model, snap)
    with pytest.raises(BaseShapesError, match="bad.bsh"):
        fastmup.load_base_shapes(path)


def test_rank_mismatch_names_file_and_parameter(tmp_path):
    state = fastmup.base_shapes_state(set_shapes(make_mlp, BASE_WIDTH))
    state["fc2.weight"] = [BASE_WIDTH]
    path = tmp_path / "rank.bsh"
    fastmup.save_base_shapes(state, path)
    model = fresh_mlp()
    snap = snapshot(model)
    with pytest.raises(BaseShapesError, match=r"'fc2\.weight'.*rank\.bsh.*rank 1.*\[32, 32\]"):
        fastmup.set_base_shapes(model, path)
    assert_unchanged(model, snap)


def test_names_differ_from_file(tmp_path):
    path = tmp_path / "names.bsh"
    fastmup.make_base_shapes(make_mlp(BASE_WIDTH), make_mlp(DELTA_WIDTH), savefile=path)
    model = make_transformer(WIDTH)
    snap = snapshot(model)
    with pytest.raises(BaseShapesError, match=r"names\.bsh.*'embed\.weight'.*'fc1\.weight'"):
        fastmup.set_base_shapes(model, path)
    assert_unchanged(model, snap)


def test_bad_dict_entry_is_named():
    model = fresh_mlp()
    snap = snapshot(model)
    with pytest.raises(BaseShapesError, match="'fc1.weight'"):
        fastmup.set_base_shapes(model, {**fastmup.get_shapes(make_mlp(4)), "fc1.weight": "8x16"})
    with pytest.raises(TypeError, match="base must be"):
        fastmup.set_base_shapes(model, 3)
    assert_unchanged(model, snap)


def test_hidden_size_assert_names_module_and_leaves_model_unchanged():
    class Bad(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.body = nn.Linear(4, w)
            self.head = nn.Linear(w, 10)  # should be a MuReadout

    torch.manual_seed(0)
    model = Bad(32)
    snap = snapshot(model)
    with pytest.raises(HiddenSizeError, match="'head'.*MuReadout"):
        fastmup.set_base_shapes(model, Bad(4), delta=Bad(8))
    assert_unchanged(model, snap)
    with pytest.raises(AssertionError):  # what mup raises
        fastmup.set_base_shapes(model, Bad(4), delta=Bad(8))
    fastmup.set_base_shapes(model, Bad(4), delta=Bad(8), do_assert=False)
    with pytest.raises(HiddenSizeError, match="'head'"):
        fastmup.assert_hidden_size_inf(model)


def test_rescaling_twice_is_refused_before_any_change():
    model = set_shapes(make_transformer, WIDTH)
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match=r"already rescaled.*rescale_params=False"):
        fastmup.set_base_shapes(model, make_transformer(BASE_WIDTH), delta=make_transformer(DELTA_WIDTH))
    assert_unchanged(model, snap)
    fastmup.set_base_shapes(model, make_transformer(BASE_WIDTH), delta=make_transformer(DELTA_WIDTH),
                            rescale_params=False)
    for n, p in model.named_parameters():
        assert torch.equal(p, snap["params"][n])


def test_apply_infshapes_validates_first():
    model = fresh_mlp()
    snap = snapshot(model)
    infshapes = fastmup.zip_infshapes(make_mlp(BASE_WIDTH), model)
    del infshapes["fc1.bias"]
    with pytest.raises(BaseShapesError, match="fc1.bias"):
        fastmup.apply_infshapes(model, infshapes)
    assert_unchanged(model, snap)
    fastmup.apply_infshapes(model, fastmup.zip_infshapes(make_mlp(BASE_WIDTH), model))
    assert model.readout.width_mult() == WIDTH / BASE_WIDTH


# ---------------------------------------------------------------------------
# checkpoints


def test_base_shapes_state_format():
    model = set_shapes(make_transformer, WIDTH)
    state = fastmup.base_shapes_state(model)
    assert list(state) == [n for n, _ in model.named_parameters()]
    assert state["embed.weight"] == [None, BASE_WIDTH]
    assert state["ff1.weight"] == [4 * BASE_WIDTH, BASE_WIDTH]
    assert all(type(b) in (int, type(None)) for v in state.values() for b in v)
    assert json.loads(json.dumps(state)) == state


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_checkpoint_recipe_restores_everything(arch):
    fast_fn, _, batch = ARCHS[arch]
    torch.manual_seed(0)
    model = set_shapes(fast_fn, WIDTH)
    x, y = batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).sum().backward()
    opt.step()
    model.eval()

    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "base_shapes": fastmup.base_shapes_state(model)}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    torch.manual_seed(123)
    fresh = fast_fn(WIDTH)
    fastmup.set_base_shapes(fresh, ckpt["base_shapes"], rescale_params=False)
    fresh.load_state_dict(ckpt["model"])
    fresh.eval()
    assert infshape_table(fresh) == infshape_table(model)
    assert fresh.readout._width_mult == model.readout._width_mult == WIDTH / BASE_WIDTH
    assert torch.equal(fresh(x), model(x))
    # and a mup-written state_dict loads too (same keys)
    assert list(fresh.state_dict()) == list(ckpt["model"])


def test_base_shapes_state_survives_deepcopy_and_replaced_parameters():
    model = set_shapes(make_mlp, WIDTH)
    expected = fastmup.base_shapes_state(model)
    clone = copy.deepcopy(model)  # Parameter.__deepcopy__ drops infshape; the module records give it back
    assert clone.fc2.weight.infshape == model.fc2.weight.infshape
    assert clone.fc2.weight.infshape is not model.fc2.weight.infshape
    assert fastmup.base_shapes_state(clone) == expected
    # a parameter replaced by a new object without attributes
    clone.fc2.weight = nn.Parameter(clone.fc2.weight.detach().clone())
    assert not hasattr(clone.fc2.weight, "infshape")
    assert fastmup.base_shapes_state(clone) == expected
    fastmup.set_base_shapes(clone, fastmup.base_shapes_state(clone), rescale_params=False)
    assert infshape_table(clone) == infshape_table(model)
    # FSDP-like: brand new Parameter objects, wrapped under a prefix
    wrapped = Wrapper(copy.deepcopy(model))
    assert fastmup.base_shapes_state(wrapped) == {"module." + k: v for k, v in expected.items()}
    with pytest.raises(BaseShapesError, match="no base shape known.*fc1.weight"):
        fastmup.base_shapes_state(make_mlp(4))


def test_dict_with_none_is_read_like_a_bsh_file():
    model = set_shapes(make_mlp, BASE_WIDTH)
    state = fastmup.base_shapes_state(model)
    # at base width the hidden dims stay infinite (a shapes dict would make them finite)
    fresh = fastmup.set_base_shapes(make_mlp(BASE_WIDTH), state)
    assert fresh.fc2.weight.infshape.ninf() == 2
    assert infshape_table(fresh) == infshape_table(model)
    # a dict without None is read as the shapes of a base model, as mup does
    shapes = {n: list(p.shape) for n, p in make_mlp(BASE_WIDTH).named_parameters()}
    fresh = fastmup.set_base_shapes(make_mlp(WIDTH), shapes, delta=make_mlp(DELTA_WIDTH))
    assert infshape_table(fresh) == infshape_table(set_shapes(make_mlp, WIDTH))


def test_path_like_objects_accepted(tmp_path):
    class P(os.PathLike):
        def __init__(self, p):
            self.p = p

        def __fspath__(self):
            return str(self.p)

    path = tmp_path / "x.bsh"
    fastmup.make_base_shapes(make_mlp(BASE_WIDTH), make_mlp(DELTA_WIDTH), savefile=P(path))
    model = fastmup.set_base_shapes(make_mlp(WIDTH), P(path))
    assert model.fc2.weight.infshape.width_mult() == WIDTH / BASE_WIDTH
    assert isinstance(fastmup.load_base_shapes(pathlib.Path(path))["fc1.weight"], InfShape)
