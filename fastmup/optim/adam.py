"""μAdam and μAdamW: Adam with μP per-tensor learning rates.

For each tensor, with ``lr`` and ``wd`` already multiplied by its μP factors
(:mod:`fastmup.optim.multipliers`) and ``t`` its step count::

    g   = ±grad / grad_scale                     (sign: maximize)
    g   = g + wd·p                               (coupled weight decay, Adam)
    p   = p·(1 - lr·wd)                          (decoupled weight decay, AdamW)
    m   = m + (1-β1)·(g - m)
    v   = β2·v + (1-β2)·g²
    v̂   = max(v̂, v) if amsgrad else v
    p   = p - lr/(1-β1^t) · m / (sqrt(v̂)/sqrt(1-β2^t) + eps)

One entry point, :func:`adam`, runs a :class:`TensorBatch` with the chosen
backend: ``_single_tensor_adam`` is the readable reference (fp32 math,
one rounding to the storage dtype), a fused backend's launcher
(:func:`fastmup.optim.backend.launcher`) steps the whole batch in one
kernel launch.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import Unpack

from fastmup.infshape_registry import find_infshape
from fastmup.optim import precision
from fastmup.optim.backend import entry_point
from fastmup.optim.checks import check_adam
from fastmup.optim.clip import clipped
from fastmup.optim.multipliers import Multiplier, eps_multiplier
from fastmup.optim.mup_groups import TakesImpl
from fastmup.optim.optimizer import MuOptimizer, MuOptions, group_defaults
from fastmup.optim.reference import skips_step, store, unscaled
from fastmup.plan.batch import TensorBatch, math_dtype
from fastmup.plan.spec import AlgorithmSpec, OptionalBuffer

__all__ = ["MuAdam", "MuAdamW", "adam", "SPEC"]

#: Adam's contract with every backend (the Triton kernel ``fastmup.kernels.adam``,
#: the C++ functor ``AdamOp`` of ``csrc/adam_math.h``, the reference below)
SPEC = AlgorithmSpec(
    name="adam",
    columns=("lr", "weight_decay", "beta1", "beta2", "eps", "amsgrad", "maximize", "decoupled_weight_decay"),
    state=("exp_avg", "exp_avg_sq"),
    optional=OptionalBuffer("max_exp_avg_sq", gate="amsgrad"),
    kernel="adam",
    functor="AdamOp",
)


class MuAdam(TakesImpl, MuOptimizer):
    """Adam with μP: hidden matrices use ``lr / m_in`` (and ``wd · m_in``
    unless ``decoupled_wd``); everything else uses the group's values.

    Signature as ``torch.optim.Adam`` plus ``decoupled_wd`` (mup's switch:
    do not rescale weight decay with width) and the fastmup options of
    :class:`~fastmup.optim.MuOptimizer` (:class:`~fastmup.optim.optimizer.MuOptions`):
    ``backend``, ``state_dtype`` (``None``: the param's dtype) and
    ``param_lr_scales`` (extra per-tensor lr factors, e.g.
    architecture-aware depth scaling, applied in the same fused launch).  torch's ``foreach`` and ``fused`` are accepted and kept
    in the param groups (every backend is one pass over all tensors);
    ``differentiable=True`` raises ``NotImplementedError``.

    ``eps_scaling=True`` (off by default: mup leaves ε alone) scales each
    tensor's ε with its width and depth, ``ε / m`` (its width multiplier) and
    ``ε / m · m_L^(-α)`` inside the residual blocks of
    :func:`fastmup.set_depth` (CompleteP, Eq. 40); a per-group option, in the
    param groups like ``decoupled_wd``.  Depth declared by ``set_depth`` also
    scales the learning rate and weight decay of those tensors
    (:mod:`fastmup.optim.multipliers`).

    Low-precision parameters (:mod:`fastmup.optim.precision`; also per
    param group): ``stochastic_rounding=True`` writes bf16/fp16 parameters
    with unbiased stochastic rounding (bits seeded by ``rounding_seed``, no
    extra memory); ``master_weights="fp32"`` keeps an fp32 master per
    bf16/fp16 parameter (``state["master_weight"]``, 4 bytes per element)
    and ``master_weights="remainder"`` its low 16 bits next to a bf16
    parameter (``state["weight_remainder"]``, 2 bytes), the two giving
    bit-identical trajectories; the update then runs on the fp32 master.

    ``impl`` is mup's way to make other Adam-like μP optimizers:
    ``MuAdam(params, impl=torch.optim.RMSprop, lr=...)`` returns that torch
    optimizer built on mup's split param groups, as mup does
    (:mod:`fastmup.optim.mup_groups`); ``impl=torch.optim.Adam`` is this
    optimizer and ``impl=torch.optim.AdamW`` this optimizer with decoupled
    weight decay (``weight_decay`` still defaulting to 0, as in mup).
    """

    family = "adam"
    spec = SPEC
    _native_impls: tuple = (torch.optim.Adam, torch.optim.AdamW)

    # The keyword-only arguments are in the order of torch's param groups
    # (``maximize`` before ``foreach``): the signature orders ``defaults``.
    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        decoupled_weight_decay: bool = False,
        decoupled_wd: bool = False,
        eps_scaling: bool = False,
        impl: Optional[Callable[..., Optimizer]] = None,
        **options: Unpack[MuOptions],
    ) -> None:
        if impl is torch.optim.AdamW:
            decoupled_weight_decay = True
        defaults = group_defaults(locals())
        # ε multipliers of the tensors whose group has eps_scaling (before
        # super().__init__, which adds the groups)
        self._eps_mults: dict[Tensor, Multiplier] = {}
        super().__init__(params, defaults, **options)

    def _validate(self, group: Mapping[str, Any]) -> None:
        check_adam(group)
        if not isinstance(group.get("eps_scaling", False), bool):
            raise ValueError(f"eps_scaling must be True or False, got {group['eps_scaling']!r}")

    # ε scaling: one more per-tensor factor, on the eps column of the table
    def _group_multipliers(self, tensors: list, group: Mapping[str, Any], group_index: int) -> dict:
        mults = super()._group_multipliers(tensors, group, group_index)
        eps_mults = getattr(self, "_eps_mults", None)
        if eps_mults is None:  # unpickled from a version without ε scaling
            eps_mults = self._eps_mults = {}
        for p in tensors:
            if group.get("eps_scaling", False):
                eps_mults[p] = eps_multiplier(find_infshape(p))
            else:
                eps_mults.pop(p, None)
        return mults

    def _refresh_rows(self, batches: list[TensorBatch]) -> bool:
        # the shared rows first; ε's factor goes on top only where they were
        # rewritten (an unchanged table already carries it)
        if not super()._refresh_rows(batches) or not getattr(self, "_eps_mults", None):
            return False
        col = self.columns.index("eps")
        cached = getattr(self, "_eps_scales", None)
        if cached is None or cached[0] is not batches:  # once per plan
            scales = []
            for batch in batches:
                mults = [self._eps_mults.get(p) for p in batch.owners]
                scales.append(
                    (np.array([1.0 if m is None else m.num for m in mults]), np.array([1.0 if m is None else m.den for m in mults]))
                )
            cached = self._eps_scales = (batches, scales)
        for batch, (num, den) in zip(batches, cached[1]):
            batch.rows[:, col] = batch.rows[:, col] * num / den
        return True

    _PLAN_CACHES = MuOptimizer._PLAN_CACHES + ("_eps_scales",)

    def _reset_plan(self) -> None:
        super()._reset_plan()
        self._eps_scales: Optional[tuple[list[TensorBatch], list[tuple[np.ndarray, np.ndarray]]]] = None

    def tensor_hyperparameters(self) -> dict[Tensor, dict[str, float]]:
        """As :meth:`MuOptimizer.tensor_hyperparameters`, with ``eps`` scaled
        where the group has ``eps_scaling``."""
        out = super().tensor_hyperparameters()
        for p, m in getattr(self, "_eps_mults", {}).items():
            if p in out:
                out[p]["eps"] = out[p]["eps"] * m.num / m.den
        return out

    def _group_values(self, group: Mapping[str, Any]) -> dict[str, float]:
        beta1, beta2 = group["betas"]
        return super()._group_values({**group, "beta1": beta1, "beta2": beta2})

    def _update(self, batch: TensorBatch, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        adam(batch, backend=batch.backend, grad_scale=grad_scale, found_inf=found_inf)


class MuAdamW(MuAdam):
    """AdamW with μP (decoupled weight decay ``p ← p·(1 - lr·wd)``, with the
    μP-scaled ``lr`` and ``wd`` of each tensor).  Defaults as ``torch.optim.AdamW``;
    every param group decays decoupled, also after loading an Adam state dict
    (as torch's AdamW).  The keyword arguments are :class:`MuAdam`'s but
    ``decoupled_weight_decay`` (always on); ``impl`` as for :class:`MuAdam`
    (mup's ``MuAdamW`` takes none)."""

    _native_impls: tuple = (torch.optim.AdamW,)

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay=True, **kwargs)

    def _fill_group_defaults(self, group: dict[str, Any]) -> None:
        super()._fill_group_defaults(group)
        group["decoupled_weight_decay"] = True


def _single_tensor_adam(batch: TensorBatch, *, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    if skips_step(found_inf):
        return
    steps = batch.steps.tolist()
    exp_avgs, exp_avg_sqs = batch.state["exp_avg"], batch.state["exp_avg_sq"]
    max_exp_avg_sqs = batch.state.get("max_exp_avg_sq", [None] * len(batch))
    for i, (p, g) in enumerate(zip(batch.params, batch.grads)):
        if g is None:
            continue  # no gradient this step
        lr, wd, beta1, beta2, eps, amsgrad, maximize, decoupled = batch.rows[i].tolist()
        # The parameter's value is read as its storage mode holds it (the fp32
        # master weight, say).
        dtype = math_dtype(p.dtype, g.dtype, exp_avgs[i].dtype)
        param = precision.load_batch_param(batch, i, dtype)
        exp_avg, exp_avg_sq = exp_avgs[i].to(dtype), exp_avg_sqs[i].to(dtype)
        grad = unscaled(clipped(g, batch.grad_clip), dtype, grad_scale)
        if maximize:
            grad = -grad
        if wd != 0:
            if decoupled:
                param.mul_(1 - lr * wd)
            else:
                grad = grad.add(param, alpha=wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = steps[i]
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        if amsgrad:
            max_sq = max_exp_avg_sqs[i].to(dtype)
            torch.maximum(max_sq, exp_avg_sq, out=max_sq)
            denom = (max_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            store((max_exp_avg_sqs[i], max_sq))
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)
        precision.store_batch_param(batch, i, param, step)
        store((exp_avgs[i], exp_avg), (exp_avg_sqs[i], exp_avg_sq))


adam = entry_point("adam", _single_tensor_adam, "Apply one Adam step to every tensor of ``batch`` (steps already advanced).")
