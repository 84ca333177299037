import copy
import pickle

import mup.infshape as mup_infshape
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmup
from fastmup.infshape import InfDim, InfShape, MissingInfShapeError, require_infshape, zip_infshape


def hidden():
    # (fan_out, fan_in) = (256 from 64, 512 from 128): m_out = 4, m_in = 4
    return InfShape([InfDim(64, 256), InfDim(128, 512)])


def test_all_matches_mup_public_api():
    assert set(fastmup.infshape.__all__) == {"InfDim", "InfShape", "zip_infshape"}
    for name in fastmup.infshape.__all__:
        assert getattr(fastmup, name) is getattr(fastmup.infshape, name)


def test_infdim_basics():
    inf, fin = InfDim(64, 256), InfDim(None, 10)
    assert inf.isinf() and not fin.isinf()
    assert inf.width_mult() == 4.0 and fin.width_mult() == 1.0
    assert repr(inf) == "InfDim(64, 256)" and str(inf) == "InfDim(64, 256)"
    assert repr(fin) == "InfDim(None, 10)" and str(fin) == "FinDim(10)"
    assert InfDim(64, 256) == InfDim(64, 256) and InfDim(64, 256) != InfDim(64, 128)
    assert InfDim(None, 10) != InfDim(10, 10)
    assert InfDim(1, 2) != (1, 2)
    assert hash(InfDim(64, 256)) == hash(InfDim(64, 256))
    assert len({InfDim(64, 256), InfDim(64, 256), InfDim(None, 256)}) == 2


def test_infdim_without_size_gives_clear_error():
    with pytest.raises(ValueError, match="dim=None"):
        InfDim(64, None).width_mult()
    assert InfDim(None, None).width_mult() == 1.0


def test_infshape_queries():
    s = InfShape([InfDim(None, 100), InfDim(128, 1024), InfDim(128, 256)])
    assert s.ninf() == 2
    assert s.main_idx == 2 and s.main is s[2]
    assert s.width_mult() == 2.0
    assert s.fanin_fanout() == (s[1], s[0])
    assert s.base_shape() == [None, 128, 128]
    assert s.shape() == [100, 1024, 256]
    h = hidden()
    assert h.fanin_fanout_mult_ratio() == 1.0
    r = InfShape([InfDim(64, 128), InfDim(64, 512)])
    assert r.fanin_fanout_mult_ratio() == 8.0 / 2.0
    finite = InfShape([InfDim(None, 3), InfDim(None, 4)])
    assert finite.main is None and finite.main_idx is None and finite.width_mult() == 1.0
    assert finite.ninf() == 0
    with pytest.raises(ValueError, match="rank 1"):
        InfShape([InfDim(4, 8)]).fanin_fanout()


def test_repr_matches_mup():
    dims = [(None, 100), (128, 1024)]
    ours = InfShape([InfDim(*d) for d in dims])
    theirs = mup_infshape.InfShape([mup_infshape.InfDim(*d) for d in dims])
    assert repr(ours) == repr(theirs) == "InfShape([InfDim(None, 100), InfDim(128, 1024)])"
    # (mup prints a 1-tuple with a trailing comma; fastmup does not)
    assert repr(InfShape([InfDim(3, 4)])) == "InfShape([InfDim(3, 4)])"


def test_elements_must_be_infdims():
    with pytest.raises(TypeError, match="InfDim"):
        InfShape([InfDim(1, 2), 3])


def test_serialize_roundtrip_and_from_base_shape():
    s = InfShape([InfDim(None, 10), InfDim(32, 64)])
    d = s.serialize()
    assert d == {"base_shape": [None, 32], "shape": [10, 64]}
    assert d == mup_infshape.InfShape([mup_infshape.InfDim(None, 10), mup_infshape.InfDim(32, 64)]).serialize()
    assert InfShape.deserialize(d) == s
    b = InfShape.from_base_shape([None, 32])
    assert b == InfShape([InfDim(None, None), InfDim(32, None)])
    assert b.ninf() == 1 and b.main_idx == 1


def test_main_idx_override_keeps_main_consistent():
    s = hidden()
    assert s.main_idx == 1 and s.width_mult() == 4.0
    s = InfShape([InfDim(64, 256), InfDim(128, 256)])  # m_out = 4, m_in = 2
    assert s.width_mult() == 2.0
    s.main_idx = 0
    assert s.main is s[0] and s.width_mult() == 4.0
    # mup's documented idiom
    s.main_idx = 1
    s.main_idx = 0
    s.main = s[0]
    assert s.main_idx == 0 and s.width_mult() == 4.0
    # setting main alone moves main_idx
    s.main = s[1]
    assert s.main_idx == 1 and s.width_mult() == 2.0
    s.main_idx = -2
    assert s.main_idx == 0
    s.main = None
    assert s.main_idx is None and s.width_mult() == 1.0


def test_main_override_with_equal_dims_does_not_move_index():
    s = InfShape([InfDim(64, 256), InfDim(64, 256)])
    s.main_idx = 0
    s.main = InfDim(64, 256)  # equal to both; keep the chosen index
    assert s.main_idx == 0


def test_main_override_errors():
    s = hidden()
    with pytest.raises(IndexError, match="main_idx 2"):
        s.main_idx = 2
    with pytest.raises(IndexError):
        s.main_idx = "0"
    with pytest.raises(ValueError, match="not a dimension"):
        s.main = InfDim(1, 1)
    assert s.main_idx == 1


def test_constructor_main_idx_keyword():
    s = InfShape([InfDim(64, 256), InfDim(128, 256)], main_idx=0)
    assert s.main_idx == 0 and s.width_mult() == 4.0
    assert InfShape([InfDim(64, 256)], main_idx=None).main is None


def test_equality_and_hash():
    a, b = hidden(), hidden()
    assert a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
    assert {a: 1}[b] == 1
    # main_idx is not part of the value
    b.main_idx = 0
    assert a == b and hash(a) == hash(b)
    assert a != InfShape([InfDim(64, 256), InfDim(128, 256)])
    # mup compares with zip and calls a prefix equal; lengths must match here
    assert InfShape([InfDim(64, 256)]) != InfShape([InfDim(64, 256), InfDim(1, 1)])
    assert InfShape([InfDim(64, 256)]) != (InfDim(64, 256),)
    assert not (a != b)


@pytest.mark.parametrize(
    "clone",
    [copy.copy, copy.deepcopy, lambda s: pickle.loads(pickle.dumps(s)),
     lambda s: pickle.loads(pickle.dumps(s, protocol=0))],
    ids=["copy", "deepcopy", "pickle", "pickle0"],
)
def test_copies_keep_main_idx(clone):
    s = InfShape([InfDim(None, 10), InfDim(64, 256), InfDim(128, 256)])
    s.main_idx = 1
    c = clone(s)
    assert type(c) is InfShape
    assert c == s and hash(c) == hash(s)
    assert c.main_idx == 1 and c.main == InfDim(64, 256) and c.width_mult() == 4.0
    assert c.main is c[1]
    # the copy's main_idx is independent
    c.main_idx = 2
    assert s.main_idx == 1


def test_parameter_with_infshape_survives_torch_save(tmp_path):
    # (Parameter.__deepcopy__ drops Python attributes: that case is handled by
    # MuReadout's float width multiplier and base_shapes_state, see test_layer/test_shape)
    p = torch.nn.Parameter(torch.zeros(4, 8))
    p.infshape = InfShape([InfDim(2, 4), InfDim(2, 8)], main_idx=0)
    torch.save(p, tmp_path / "p.pt")
    r = torch.load(tmp_path / "p.pt", weights_only=False)
    assert r.infshape == p.infshape and r.infshape.main_idx == 0


def test_zip_infshape():
    s = zip_infshape([64, 128, 10], [256, 128, 10])
    assert s == InfShape([InfDim(64, 256), InfDim(None, 128), InfDim(None, 10)])
    s = zip_infshape([64, 128], [256, 128], fin_if_same=False)
    assert s == InfShape([InfDim(64, 256), InfDim(128, 128)])
    # an InfDim keeps its base (and finiteness), only the size changes
    base = InfShape([InfDim(None, None), InfDim(8, None)])
    s = zip_infshape(base, [10, 32])
    assert s == InfShape([InfDim(None, 10), InfDim(8, 32)])
    assert base == InfShape([InfDim(None, None), InfDim(8, None)])  # not mutated
    # None is finite (like in a .bsh file)
    assert zip_infshape([None, 8], [3, 16]) == InfShape([InfDim(None, 3), InfDim(8, 16)])


def test_zip_infshape_keeps_overridden_main_idx():
    base = InfShape([InfDim(8, None), InfDim(4, None)])
    base.main_idx = 0
    assert zip_infshape(base, [16, 16]).main_idx == 0
    assert zip_infshape(InfShape([InfDim(8, None), InfDim(4, None)]), [16, 16]).main_idx == 1


def test_zip_infshape_errors():
    with pytest.raises(ValueError, match="rank 2 but the shape \\[4\\] has rank 1"):
        zip_infshape([4, 4], [4])
    with pytest.raises(ValueError, match="unhandled base dimension"):
        zip_infshape(["4"], [4])
    with pytest.raises(ValueError, match="unhandled base dimension"):
        zip_infshape([True], [4])


def test_require_infshape_message():
    t = torch.zeros(3, 4)
    with pytest.raises(MissingInfShapeError, match=r"\(3, 4\).*set_base_shapes"):
        require_infshape(t, "x")
    t.infshape = InfShape([InfDim(None, 3), InfDim(None, 4)])
    assert require_infshape(t) is t.infshape


dims = st.integers(min_value=1, max_value=64)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.none(), dims), dims), min_size=1, max_size=4), st.booleans())
def test_zip_infshape_matches_mup(pairs, fin_if_same):
    base = [b if b is not None else d for b, d in pairs]
    target = [d for _, d in pairs]
    ours = zip_infshape(base, target, fin_if_same=fin_if_same)
    theirs = mup_infshape.zip_infshape(base, target, fin_if_same=fin_if_same)
    assert ours.serialize() == theirs.serialize()
    assert ours.ninf() == theirs.ninf()
    assert ours.main_idx == theirs.main_idx
    assert ours.width_mult() == theirs.width_mult()
    if len(ours) >= 2:
        assert ours.fanin_fanout_mult_ratio() == theirs.fanin_fanout_mult_ratio()
