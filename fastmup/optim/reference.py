"""What the single-tensor reference updates share (plain torch ops).

Each reference (``_single_tensor_adam``, ``_sgd``, ``_esgd``) computes in
the math dtype of :func:`fastmup.plan.batch.math_dtype` on copies of the
stored tensors (tensors already of that dtype are used in place) and rounds
once, when it stores the results back.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["skips_step", "store", "unscaled"]


def skips_step(found_inf: Optional[Tensor]) -> bool:
    """Whether AMP found inf/nan in the gradients: the step writes nothing
    (the reference may read ``found_inf`` on the host)."""
    return found_inf is not None and bool(found_inf.item())


def unscaled(x: Tensor, dtype: torch.dtype, grad_scale: Optional[Tensor]) -> Tensor:
    """``x`` (a gradient, or ESGD-M's HVP) in the math dtype ``dtype``,
    divided by AMP's ``grad_scale`` when there is one."""
    x = x.to(dtype)
    if grad_scale is not None:
        x = x / grad_scale.to(x.device, dtype)
    return x


def store(*pairs: tuple[Tensor, Tensor]) -> None:
    """Copy each computed tensor into its stored one (one rounding to the
    storage dtype), unless the update ran in place on it."""
    for stored, computed in pairs:
        if stored is not computed:
            stored.copy_(computed)
