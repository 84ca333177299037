"""The μP rule table of ALGORITHMS.md §1, entry by entry."""
import pytest

from fastmup.infshape import InfDim, InfShape
from fastmup.optim.multipliers import mup_multipliers


def shape(*dims):
    return InfShape([InfDim(b, d) for b, d in dims])


FINITE = shape((None, 10))
VECTOR = shape((64, 256))  # m = 4
READOUT = shape((None, 10), (64, 256))  # (vocab, width): m_in = 4
HIDDEN = shape((64, 512), (32, 256))  # (out, in): m_out = 8, m_in = 8
RECT = shape((64, 512), (64, 256))  # m_out = 8, m_in = 4


@pytest.mark.parametrize(
    "infshape,family,lr,wd",
    [
        (FINITE, "adam", 1, 1),
        (VECTOR, "adam", 1, 1),
        (READOUT, "adam", 1, 1),
        (HIDDEN, "adam", 1 / 8, 8),
        (RECT, "adam", 1 / 4, 4),
        (FINITE, "sgd", 1, 1),
        (VECTOR, "sgd", 4, 1 / 4),
        (READOUT, "sgd", 4, 1 / 4),
        (HIDDEN, "sgd", 1, 1),
        (RECT, "sgd", 2, 1 / 2),
    ],
)
def test_rule_table(infshape, family, lr, wd):
    lr_m, wd_m = mup_multipliers(infshape, family)
    assert lr_m.apply(1.0) == pytest.approx(lr)
    assert wd_m.apply(1.0) == pytest.approx(wd)
    _, wd_dec = mup_multipliers(infshape, family, decoupled_wd=True)
    assert wd_dec.apply(1.0) == 1.0


def test_rounds_like_mup():
    """mup divides the group lr by the multiplier; so must we, bit for bit."""
    lr_m, _ = mup_multipliers(shape((3, 7), (3, 7)), "adam")
    assert lr_m.apply(1e-3) == 1e-3 / (7 / 3)


def test_main_idx_override_changes_the_adam_multiplier():
    s = shape((32, 256), (64, 128))  # fan-in dim 1 (m=2) by default
    assert mup_multipliers(s, "adam")[0].apply(1.0) == 0.5
    s.main_idx = 0
    s.main = s[0]
    assert mup_multipliers(s, "adam")[0].apply(1.0) == 1 / 8


def test_more_than_two_infinite_dims():
    with pytest.raises(NotImplementedError, match="3 infinite"):
        mup_multipliers(shape((2, 4), (2, 4), (2, 4)), "sgd")


def test_unknown_family():
    with pytest.raises(ValueError, match="family"):
        mup_multipliers(FINITE, "lamb")
