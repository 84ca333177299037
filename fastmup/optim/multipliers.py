"""The μP rule table: per-tensor learning-rate and weight-decay multipliers.

μP rescales the learning rate and weight decay of each tensor according to
how its dimensions grow with width (ALGORITHMS.md §1).  With ``m`` the width
multiplier of the tensor's main (last infinite) dimension and ``m_in``,
``m_out`` those of a matrix's fan-in and fan-out:

=========================  ==============================  ==============
tensor (by ``ninf``)       SGD-like  lr / wd               Adam-like lr / wd
=========================  ==============================  ==============
0 (finite)                 η / λ                           η / λ
1 (vectors, readout)       η·m / λ/m                       η / λ
2 (hidden matrices)        η·m_out/m_in / λ·m_in/m_out     η/m_in / λ·m_in
=========================  ==============================  ==============

``"esgd"`` (ESGD-M, :mod:`fastmup.optim.esgd`) is the geometric mean of
the two rules: η·√m / λ/√m for vectors, η/√(m_in²/m_out) / λ·√(m_in²/m_out)
for hidden matrices, η / λ for finite tensors.  Its Hessian-row
preconditioner scales the update by Θ(1/√n), halfway between SGD's Θ(1/n)
and Adam's Θ(1); see ``docs/esgd_mup.md``.

``decoupled_wd=True`` leaves λ unscaled.  A multiplier is kept as a fraction
``num / den`` with one side equal to 1, so that ``lr * num / den`` rounds
exactly like mup's ``group['lr'] /= width_mult`` and ``*=`` updates.
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple

Family = Literal["adam", "sgd", "esgd"]


class Multiplier(NamedTuple):
    """A scale factor ``num / den``; apply as ``value * num / den``."""

    num: float = 1.0
    den: float = 1.0

    def apply(self, value: float) -> float:
        return value * self.num / self.den

    @staticmethod
    def times(x: float) -> "Multiplier":
        return Multiplier(float(x), 1.0)

    @staticmethod
    def over(x: float) -> "Multiplier":
        return Multiplier(1.0, float(x))

    def inverse(self) -> "Multiplier":
        """``den / num``: exact, the same fraction upside down."""
        return Multiplier(self.den, self.num)


ONE = Multiplier()


def mup_multipliers(infshape, family: Family, decoupled_wd: bool = False) -> tuple[Multiplier, Multiplier]:
    """Return ``(lr_multiplier, weight_decay_multiplier)`` for one tensor.

    Raises ``NotImplementedError`` for more than two infinite dimensions, as
    mup does: μP has no rule for them.
    """
    ninf = infshape.ninf()
    if ninf > 2:
        raise NotImplementedError(
            f"μP has no rule for tensors with {ninf} infinite dimensions (at most 2 are supported); "
            f"infshape {infshape}"
        )
    # The lr multiplier by class; weight decay scales inversely, so that the
    # decay per step (lr·wd) does not depend on width.
    if family == "adam":
        lr = Multiplier.over(infshape.width_mult()) if ninf == 2 else ONE
    elif family == "sgd":
        if ninf == 2:
            lr = Multiplier.over(infshape.fanin_fanout_mult_ratio())
        elif ninf == 1:
            lr = Multiplier.times(infshape.width_mult())
        else:
            lr = ONE
    elif family == "esgd":
        # sqrt(adam multiplier x sgd multiplier), class by class
        if ninf == 2:
            lr = Multiplier.over(math.sqrt(infshape.width_mult() * infshape.fanin_fanout_mult_ratio()))
        elif ninf == 1:
            lr = Multiplier.times(math.sqrt(infshape.width_mult()))
        else:
            lr = ONE
    else:
        raise ValueError(f"unknown optimizer family {family!r}; expected 'adam', 'sgd' or 'esgd'")
    wd = ONE if decoupled_wd else lr.inverse()
    return lr, wd
