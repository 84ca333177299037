"""μSGD: SGD with momentum and μP per-tensor learning rates.

For each tensor, with ``lr`` and ``wd`` multiplied by its μP factors and ``t``
its step count (torch's rules, including the first momentum step)::

    g   = ±grad / grad_scale + wd·p
    b   = g                                  if t == 1
        = μ·b + (1-dampening)·g              otherwise
    g   = g + μ·b if nesterov else b         (only when μ != 0)
    p   = p - lr·g

As in :mod:`fastmup.optim.adam`: one entry point :func:`sgd`, a readable
single-tensor reference and a fused path.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import Unpack

from fastmup.optim import precision
from fastmup.optim.backend import entry_point
from fastmup.optim.checks import check_sgd
from fastmup.optim.clip import clipped
from fastmup.optim.mup_groups import TakesImpl
from fastmup.optim.optimizer import MuOptimizer, MuOptions, group_defaults
from fastmup.optim.reference import skips_step, store, unscaled
from fastmup.plan.batch import TensorBatch, math_dtype
from fastmup.plan.spec import AlgorithmSpec, OptionalBuffer

__all__ = ["MuSGD", "sgd", "SPEC"]

#: SGD's contract with every backend (``fastmup.kernels.sgd``, ``SgdOp`` of
#: ``csrc/sgd_math.h``, the reference below).  ``step`` marks whether the
#: momentum buffer has been seeded.
SPEC = AlgorithmSpec(
    name="sgd",
    columns=("lr", "weight_decay", "momentum", "dampening", "nesterov", "maximize"),
    state=(),
    optional=OptionalBuffer("momentum_buffer", gate="momentum"),
    kernel="sgd",
    functor="SgdOp",
)


class MuSGD(TakesImpl, MuOptimizer):
    """SGD with μP: vector-like tensors use ``lr·m`` (``wd/m``), hidden
    matrices ``lr·m_out/m_in`` (``wd·m_in/m_out``), unless ``decoupled_wd``
    leaves weight decay unscaled.  Signature as ``torch.optim.SGD`` plus
    ``decoupled_wd`` and the fastmup options of
    :class:`~fastmup.optim.MuOptimizer` (``backend``, ``state_dtype``,
    ``param_lr_scales``, ...).
    Tensors inside the residual blocks of :func:`fastmup.set_depth` also get
    depth-μP's factors: ``lr · m_L^(2α-1)`` (1 at α = ½), ``wd · m_L^(-α)``
    (:mod:`fastmup.optim.multipliers`).

    The per-tensor state holds ``momentum_buffer`` (torch's key) and
    ``step``, which marks whether the buffer has been seeded yet.  Sparse
    gradients are taken as torch's SGD takes them (on the eager path: the
    gradient is densified, the momentum buffer is dense).  torch's
    ``foreach`` and ``fused`` are accepted and kept in the param groups;
    ``differentiable=True`` raises ``NotImplementedError``.

    ``stochastic_rounding``, ``master_weights`` and ``rounding_seed``: the
    low-precision parameter options of :class:`~fastmup.optim.MuAdam`
    (:mod:`fastmup.optim.precision`).

    ``impl`` is mup's way to make other SGD-like μP optimizers:
    ``MuSGD(params, impl=torch.optim.ASGD, lr=...)`` returns that torch
    optimizer built on mup's split param groups, as mup does
    (:mod:`fastmup.optim.mup_groups`); ``impl=torch.optim.SGD`` is this
    optimizer.
    """

    family = "sgd"
    spec = SPEC
    _sparse_grads = True
    _native_impls: tuple = (torch.optim.SGD,)

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        decoupled_wd: bool = False,
        capturable: bool = False,
        impl: Optional[Callable[..., Optimizer]] = None,
        **options: Unpack[MuOptions],
    ) -> None:
        super().__init__(params, group_defaults(locals()), **options)

    def _validate(self, group: Mapping[str, Any]) -> None:
        check_sgd(group)

    def _init_state(self, p: Tensor, group: Mapping[str, Any]) -> None:
        state = self.state[p]
        seeded = state.get("momentum_buffer") is not None
        if "step" not in state or (group["momentum"] != 0 and not seeded):
            # "step" marks whether the buffer is seeded (torch.optim.SGD keeps
            # no step): a buffer loaded from torch counts as seeded, and a
            # buffer created now (first step, or momentum switched on later)
            # is seeded with the next gradient, as torch does.
            state["step"] = torch.full((), float(seeded), dtype=torch.float32, device=p.device)
        super()._init_state(p, group)

    def _update(self, batch: TensorBatch, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        sgd(batch, backend=batch.backend, grad_scale=grad_scale, found_inf=found_inf)


def _single_tensor_sgd(batch: TensorBatch, *, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    if skips_step(found_inf):
        return
    steps = batch.steps.tolist()
    buffers = batch.state.get("momentum_buffer", [None] * len(batch))
    for i, (p, g) in enumerate(zip(batch.params, batch.grads)):
        if g is None:
            continue  # no gradient this step
        lr, wd, momentum, dampening, nesterov, maximize = batch.rows[i].tolist()
        if g.layout != torch.strided:
            g = g.to_dense()
        dtype = math_dtype(p.dtype, g.dtype, *([] if buffers[i] is None else [buffers[i].dtype]))
        param, grad = precision.load_batch_param(batch, i, dtype), unscaled(clipped(g, batch.grad_clip), dtype, grad_scale)
        if maximize:
            grad = -grad
        if wd != 0:
            grad = grad.add(param, alpha=wd)
        if momentum != 0:
            buf = buffers[i].to(dtype)
            if steps[i] == 1:
                buf.copy_(grad)
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            store((buffers[i], buf))
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        param.add_(grad, alpha=-lr)
        precision.store_batch_param(batch, i, param, steps[i])


sgd = entry_point("sgd", _single_tensor_sgd, "Apply one SGD step to every tensor of ``batch`` (steps already advanced).")
