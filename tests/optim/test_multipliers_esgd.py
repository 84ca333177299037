"""The "esgd" μP family: the geometric mean of mup's SGD and Adam rules (docs/esgd_mup.md)."""
import math

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
    "infshape,lr",
    [
        (FINITE, 1.0),
        (VECTOR, 2.0),  # √4
        (READOUT, 2.0),
        (HIDDEN, 1 / math.sqrt(8)),  # 1/√m
        (RECT, math.sqrt(8) / 4),  # √m_out / m_in
    ],
)
def test_esgd_rule_table(infshape, lr):
    lr_m, wd_m = mup_multipliers(infshape, "esgd")
    assert lr_m.apply(1.0) == pytest.approx(lr)
    assert wd_m.apply(1.0) == pytest.approx(1 / lr)  # lr·wd is width-independent
    assert mup_multipliers(infshape, "esgd", decoupled_wd=True)[1].apply(1.0) == 1.0


@pytest.mark.parametrize("infshape", [FINITE, VECTOR, READOUT, HIDDEN, RECT])
def test_esgd_is_the_geometric_mean_of_sgd_and_adam(infshape):
    esgd, sgd, adam = (mup_multipliers(infshape, f)[0].apply(1.0) for f in ("esgd", "sgd", "adam"))
    assert esgd == pytest.approx(math.sqrt(sgd * adam))


def test_esgd_follows_a_main_idx_override():
    s = shape((32, 256), (64, 128))
    s.main_idx = 0
    s.main = s[0]
    esgd, sgd, adam = (mup_multipliers(s, f)[0].apply(1.0) for f in ("esgd", "sgd", "adam"))
    assert esgd == pytest.approx(math.sqrt(sgd * adam))


def test_unknown_family_names_esgd():
    with pytest.raises(ValueError, match="'esgd'"):
        mup_multipliers(VECTOR, "lion")
