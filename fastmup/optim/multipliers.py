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
``num / den`` (one side equal to 1 for the width rule alone), so that
``lr * num / den`` rounds exactly like mup's ``group['lr'] /= width_mult``
and ``*=`` updates.

Depth (CompleteP, depth-μP)
---------------------------

A tensor inside the residual blocks declared by :func:`fastmup.set_depth`
carries ``infshape.depth`` with ``m_L = L / L_base`` and α; its factors below
multiply the width factors above (``L`` blocks, branches ``x ← x + m_L^(-α)·F(x)``).
Every other tensor (embeddings, final norm, readout) gets 1, and α = 0 (or no
``set_depth``) leaves everything as above, bit for bit.

==========  ==================  ==================================  ==========
family      lr                  wd: coupled / decoupled             ε (opt-in)
==========  ==================  ==================================  ==========
adam        η · m_L^(α-1)       λ · m_L^(-α)  /  λ                  ε · m_L^(-α)
sgd         η · m_L^(2α-1)      λ · m_L^(-α)  /  —                  —
esgd        NotImplementedError (no derived rule)
==========  ==================  ==================================  ==========

Sources and reasons:

* Adam lr: CompleteP (Dey et al. 2025, arXiv 2505.01618, Table 1): hidden
  weights ``η · m_N^(-1) · m_L^(α-1)``, the norm gains and biases inside the
  blocks ``η · m_L^(α-1)``; the reference implementation (EleutherAI
  nanoGPT-mup, branch ``completep``) uses the same groups.  An Adam update
  is Θ(lr) per coordinate whatever the gradient's size, a block's output
  moves by ``m_L^(-α) · lr`` and ``L`` blocks add up: ``lr ∝ m_L^(α-1)``
  keeps the total Θ(1) (Tensor Programs VI, arXiv 2310.02244: ``η·L^(-½)``
  for Adam at α = ½).
* SGD lr: depth-μP (Tensor Programs VI) keeps SGD's lr constant in depth at
  α = ½.  In general the gradient of a block tensor carries the branch
  factor ``m_L^(-α)``, so an SGD update moves a block's output by
  ``m_L^(-2α) · lr`` and ``L`` blocks by ``m_L^(1-2α) · lr``: ``lr ∝ m_L^(2α-1)``
  (1 at α = ½, ``m_L`` at α = 1).
* Weight decay: the decay keeps its share of each tensor's update.  Decoupled
  (AdamW, ``p ← p·(1 - lr·λ)``): λ has no depth factor, so the decay ``lr·λ``
  scales with ``lr`` like the Adam step itself; this is CompleteP's rule
  (Table 1: hidden weights ``λ · m_N``, the width factor of the rule above,
  no depth factor).  Coupled (``g ← g + λ·p``, Adam and SGD): the decay term
  joins a gradient that carries ``m_L^(-α)``, so λ does too; for Adam
  ``g + λ·p = m_L^(-α)·(g_base + λ_base·p)``, and with ε scaled alike the
  update is exactly the base one.  ``decoupled_wd=True`` leaves λ unscaled
  (width and depth).
* Adam ε, with ``eps_scaling=True`` (off by default, as in mup): CompleteP
  Eq. 40 and the reference's later fix, ε scaled separately for hidden and
  for embedding/unembedding tensors: ``ε / m`` for every tensor (``m`` its
  width multiplier; 1 for finite tensors), ``ε / m · m_L^(-α)`` inside the
  blocks.  ε is compared with ``sqrt(v)``, the size of the gradient, which
  μP makes Θ(1/m) and the branch multiplier ``m_L^(-α)`` smaller still.
* ESGD-M: its width rule is the geometric mean of Adam's and SGD's
  (``docs/esgd_mup.md``); its Hessian preconditioner also responds to the
  branch factor (squared), and no depth rule has been derived or checked
  for it, so a depth-scaled tensor (α > 0) is refused rather than trained
  with a guess.
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


def mup_multipliers(
    infshape, family: Family, decoupled_wd: bool = False, decoupled_decay: bool = False
) -> tuple[Multiplier, Multiplier]:
    """Return ``(lr_multiplier, weight_decay_multiplier)`` for one tensor.

    The width rule, times the depth rule when ``infshape.depth`` records a
    residual block's tensor (module docstring); ``decoupled_decay`` says
    whether the decay is decoupled (AdamW's ``p·(1 - lr·λ)``), which only the
    depth rule tells apart.

    Raises ``NotImplementedError`` for more than two infinite dimensions, as
    mup does: μP has no rule for them; and for ESGD-M on a depth-scaled tensor.
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
    wd = lr.inverse()
    depth = getattr(infshape, "depth", None)
    if depth is not None and depth.alpha != 0:
        lr_f, wd_f = depth_factors(depth, family, decoupled_decay)
        lr = Multiplier(lr.num * lr_f, lr.den)
        wd = Multiplier(wd.num * wd_f, wd.den)
    if decoupled_wd:
        wd = ONE
    return lr, wd


def depth_factors(depth, family: Family, decoupled_decay: bool = False) -> tuple[float, float]:
    """``(lr factor, weight-decay factor)`` of a block tensor under ``depth``
    (a :class:`fastmup.depth.DepthInfo`): the depth table of the module docstring."""
    m, alpha = depth.mult, depth.alpha
    if alpha == 0:
        return 1.0, 1.0
    if family == "adam":
        return m ** (alpha - 1), (1.0 if decoupled_decay else m ** (-alpha))
    if family == "sgd":
        return m ** (2 * alpha - 1), m ** (-alpha)
    if family == "esgd":
        raise NotImplementedError(
            f"ESGD-M has no depth rule (depth scaling with alpha={alpha:g}, m_L={m:g}): "
            "use MuAdam/MuAdamW/MuSGD, or fastmup.set_depth(..., alpha=0)"
        )
    raise ValueError(f"unknown optimizer family {family!r}; expected 'adam', 'sgd' or 'esgd'")


def eps_multiplier(infshape) -> Multiplier:
    """Adam's ε multiplier under ``eps_scaling=True``: ``1 / m`` (the tensor's
    width multiplier), times ``m_L^(-α)`` inside the residual blocks (CompleteP Eq. 40)."""
    depth = getattr(infshape, "depth", None)
    f = 1.0 if depth is None or depth.alpha == 0 else depth.mult ** (-depth.alpha)
    return Multiplier(f, infshape.width_mult())
