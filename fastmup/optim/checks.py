"""Hyperparameter checks, in torch.optim's order and with its wording.

Code written for ``torch.optim`` (and torch's own optimizer tests) matches
on these messages, so a fault that torch reports is reported here the same
way.  Every check runs on the constructor's defaults *before* the params are
looked at (torch's order: ``MuAdam(None, lr=-1)`` names the learning rate),
and again on each param group as it is added.
"""
from __future__ import annotations

import numbers
from typing import Any, Mapping

from torch import Tensor

__all__ = [
    "check_adam",
    "check_beta_kinds",
    "check_betas",
    "check_implementation_flags",
    "check_lr",
    "check_nonnegative",
    "check_sgd",
]


def check_lr(group: Mapping[str, Any], *, tensor_needs_capturable_foreach: bool = False) -> None:
    """``lr``: a float >= 0, or a one-element Tensor (with
    ``tensor_needs_capturable_foreach``, as torch's Adam: not with
    ``foreach=True`` unless ``capturable``)."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if tensor_needs_capturable_foreach and group.get("foreach") and not group.get("capturable", False):
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr} (lr must be >= 0)")


def check_nonnegative(group: Mapping[str, Any], key: str, what: str) -> None:
    """``group[key] >= 0``, else torch's "Invalid <what>: <value>" (and the argument's name)."""
    if not 0.0 <= group[key]:
        raise ValueError(f"Invalid {what}: {group[key]} ({key} must be >= 0)")


def check_betas(group: Mapping[str, Any]) -> None:
    """Two decay rates in [0, 1)."""
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected two values)")
    for i, b in enumerate(betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b} (betas[{i}] must be in [0, 1))")


def check_beta_kinds(group: Mapping[str, Any]) -> None:
    """Both betas numbers, or both one-element Tensors."""
    betas = group["betas"]
    numbers_ = all(isinstance(b, numbers.Real) and not isinstance(b, bool) for b in betas)
    tensors = all(isinstance(b, Tensor) for b in betas)
    if not (numbers_ or tensors):
        raise ValueError("betas must be either both floats or both Tensors")
    if tensors:
        for i, b in enumerate(betas):
            if group.get("foreach") and not group.get("capturable", False):
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
            if b.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")


def check_implementation_flags(group: Mapping[str, Any]) -> None:
    """torch's implementation switches: ``fused`` and ``foreach`` are accepted
    and recorded (every fastmup backend is a single multi-tensor pass already);
    ``differentiable`` steps are not implemented."""
    fused, foreach, differentiable = group.get("fused"), group.get("foreach"), group.get("differentiable", False)
    if fused and differentiable:
        raise RuntimeError("`fused` does not support `differentiable`")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if differentiable:
        raise NotImplementedError(
            "differentiable=True is not supported by fastmup optimizers: their updates run in place under "
            "torch.no_grad(); use torch.optim for a step that autograd differentiates through"
        )


def check_adam(group: Mapping[str, Any]) -> None:
    """torch.optim.Adam's checks, in its order."""
    check_lr(group, tensor_needs_capturable_foreach=True)
    check_nonnegative(group, "eps", "epsilon value")
    check_betas(group)
    check_nonnegative(group, "weight_decay", "weight_decay value")
    check_beta_kinds(group)
    check_implementation_flags(group)


def check_sgd(group: Mapping[str, Any]) -> None:
    """torch.optim.SGD's checks, in its order."""
    check_lr(group)
    check_nonnegative(group, "momentum", "momentum value")
    check_nonnegative(group, "weight_decay", "weight_decay value")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(
            "Nesterov momentum requires a momentum and zero dampening "
            f"(nesterov=True with momentum={group['momentum']}, dampening={group['dampening']})"
        )
    check_implementation_flags(group)
