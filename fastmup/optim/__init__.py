"""μP optimizers: torch.optim.Optimizer subclasses with per-tensor μP multipliers.

``MuAdam``, ``MuAdamW`` and ``MuSGD`` keep the user's param groups as given
and apply mup's width rules per tensor (see :mod:`fastmup.optim.multipliers`),
so one fused launch covers every tensor whatever its multiplier.
``clip_grad_norm_`` is torch's, with the norm as one fused reduction per
dtype signature (:mod:`fastmup.optim.clip`).
"""
from fastmup.optim.adam import MuAdam, MuAdamW
from fastmup.optim.clip import clip_grad_norm_
from fastmup.optim.esgd import ESGD, MuESGD
from fastmup.optim.mup_groups import process_param_groups
from fastmup.optim.optimizer import MuOptimizer
from fastmup.optim.sgd import MuSGD

__all__ = ["MuAdam", "MuAdamW", "MuSGD", "MuOptimizer", "MuESGD", "ESGD", "process_param_groups", "clip_grad_norm_"]
