"""μP versions of the ``torch.nn.init`` initializers.

Each function takes a tensor whose ``infshape`` was set by
:func:`fastmup.set_base_shapes` and

1. draws exactly what the ``torch.nn.init`` function of the same name draws
   when the tensor has its base shape (bit for bit, same random stream), and
2. otherwise scales the distribution so that its size follows μP.

Scaling rules, with ``m = infshape.width_mult()`` (the fan-in multiplier for a
hidden weight):

* fixed-scale samplers (``uniform_``, ``normal_``, ``trunc_normal_``): the
  arguments are meant to be width independent.  Tensors with ``ninf <= 1``
  get them unchanged; hidden weights (``ninf == 2``) get every argument
  multiplied by ``m^{-1/2}``, so their variance goes as ``1/fan_in``.
* ``xavier_*``: torch's std ``gain·√(2/(fan_in+fan_out))`` is first brought
  back to the base model's value, ``× √((n_out + n_in)/(n_out0 + n_in0))``
  (sizes of dims 0 and 1), then divided by ``√m_in`` when ``ninf == 2``.
* ``kaiming_*``: torch's std ``gain/√fan``; for ``ninf == 1`` a fan that
  scales is compensated by ``× √m`` of that dim (constant std); for
  ``ninf == 2`` ``mode='fan_in'`` already scales like μP and
  ``mode='fan_out'`` is corrected by ``× √(m_out/m_in)``.

The arguments (``a``, ``b``, ``std``, ``gain``...) must not themselves depend
on the width.  The draws are made with the public ``torch.nn.init`` samplers
under ``torch.no_grad()``; the bounds are computed with the same floating
point operations as mup 1.0 so the values also equal mup's at every width.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch
from torch.nn.init import calculate_gain

from fastmup.infshape import InfShape, require_infshape

__all__ = [
    "calculate_gain",
    "constant_std_init_",
    "uniform_",
    "normal_",
    "ones_",
    "eye_",
    "trunc_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
]

Tensor = torch.Tensor


def _infshape(tensor: Tensor, fn: str) -> InfShape:
    return require_infshape(tensor, f"fastmup.init.{fn}")


def _too_many_inf(infshape: InfShape, fn: str) -> NotImplementedError:
    return NotImplementedError(
        f"fastmup.init.{fn}: tensors with {infshape.ninf()} infinite dimensions "
        f"({infshape!r}) are not supported (at most 2)"
    )


def _require_centered(tensor: Tensor, infshape: InfShape, fn: str, what: str) -> None:
    # A non-centered distribution cannot be rescaled by a width factor without
    # changing its mean, so only tensors that are not rescaled may use one.
    if infshape.ninf() > 1:
        raise ValueError(
            f"fastmup.init.{fn}: {what} is only allowed for tensors with at most one "
            f"infinite dimension, but the tensor of shape {tuple(tensor.shape)} has "
            f"{infshape.ninf()} ({infshape!r}); hidden weights need a zero-centered init"
        )


def constant_std_init_(tensor: Tensor, sampler_: Callable[..., object]) -> Tensor:
    """Apply ``sampler_(tensor, scale=...)`` with the μP scale for ``tensor``.

    ``sampler_`` must accept an optional ``scale`` and multiply every
    parameter of its (width-independent) distribution by it.  It is called
    as ``sampler_(tensor)`` for ``ninf <= 1`` and as
    ``sampler_(tensor, scale=m**-0.5)`` for ``ninf == 2``.
    """
    infshape = _infshape(tensor, "constant_std_init_")
    ninf = infshape.ninf()
    if ninf <= 1:
        sampler_(tensor)
    elif ninf == 2:
        sampler_(tensor, scale=infshape.width_mult() ** -0.5)
    else:
        raise _too_many_inf(infshape, "constant_std_init_")
    return tensor


def uniform_(
    tensor: Tensor, a: float = 0, b: float = 1, *, generator: Optional[torch.Generator] = None
) -> Tensor:
    """μP ``torch.nn.init.uniform_``: U(a, b), or U(a/√m, b/√m) for a hidden weight.

    A non-symmetric interval (``a != -b``) is refused for hidden weights.
    """
    infshape = _infshape(tensor, "uniform_")
    if a != -b:
        _require_centered(tensor, infshape, "uniform_", f"an interval with a != -b ({a}, {b})")

    def sampler_(t: Tensor, scale: float = 1) -> None:
        torch.nn.init.uniform_(t, a * scale, b * scale, generator=generator)

    return constant_std_init_(tensor, sampler_)


def normal_(
    tensor: Tensor, mean: float = 0, std: float = 1, *, generator: Optional[torch.Generator] = None
) -> Tensor:
    """μP ``torch.nn.init.normal_``: N(mean, std²), or N(0, std²/m) for a hidden weight."""
    infshape = _infshape(tensor, "normal_")
    if mean != 0:
        _require_centered(tensor, infshape, "normal_", f"a non-zero mean ({mean})")

    def sampler_(t: Tensor, scale: float = 1) -> None:
        torch.nn.init.normal_(t, mean * scale, std * scale, generator=generator)

    return constant_std_init_(tensor, sampler_)


def trunc_normal_(
    tensor: Tensor,
    mean: float = 0,
    std: float = 1,
    a: float = -2,
    b: float = 2,
    *,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """μP ``torch.nn.init.trunc_normal_``; for a hidden weight mean, std, a, b are all × m^{-1/2}."""
    infshape = _infshape(tensor, "trunc_normal_")
    if mean != 0 or a != -b:
        _require_centered(
            tensor, infshape, "trunc_normal_", f"a non-centered distribution (mean={mean}, a={a}, b={b})"
        )

    def sampler_(t: Tensor, scale: float = 1) -> None:
        torch.nn.init.trunc_normal_(
            t, mean=mean * scale, std=std * scale, a=a * scale, b=b * scale, generator=generator
        )

    return constant_std_init_(tensor, sampler_)


def ones_(tensor: Tensor) -> Tensor:
    """``torch.nn.init.ones_`` for tensors that are not hidden weights (``ninf <= 1``)."""
    infshape = _infshape(tensor, "ones_")
    _require_centered(tensor, infshape, "ones_", "filling with ones")
    return torch.nn.init.ones_(tensor)


def eye_(tensor: Tensor) -> Tensor:
    """``torch.nn.init.eye_`` for 2-D tensors that are not hidden weights (``ninf <= 1``)."""
    infshape = _infshape(tensor, "eye_")
    _require_centered(tensor, infshape, "eye_", "an identity init")
    return torch.nn.init.eye_(tensor)


def _fans(tensor: Tensor) -> tuple:
    # Same convention as torch: (out, in, *kernel) with the receptive field
    # multiplying both fans.
    if tensor.dim() < 2:
        raise ValueError(
            "fan in and fan out can not be computed for a tensor with fewer than 2 "
            f"dimensions (shape {tuple(tensor.shape)})"
        )
    receptive_field = 1
    for s in tensor.shape[2:]:
        receptive_field *= s
    return tensor.size(1) * receptive_field, tensor.size(0) * receptive_field


def _xavier_std(tensor: Tensor, gain: float, fn: str) -> float:
    infshape = _infshape(tensor, fn)
    fan_in, fan_out = _fans(tensor)
    std = gain * math.sqrt(2.0 / float(fan_in + fan_out))
    out_dim, in_dim = infshape[0], infshape[1]
    # A finite dim (base_dim None) is its own base.
    out_base = out_dim.base_dim or out_dim.dim
    in_base = in_dim.base_dim or in_dim.dim
    std *= math.sqrt((out_dim.dim + in_dim.dim) / (out_base + in_base))
    ninf = infshape.ninf()
    if ninf == 2:
        if not (out_dim.isinf() and in_dim.isinf()):
            raise ValueError(
                f"fastmup.init.{fn}: a tensor with two infinite dimensions must have them "
                f"at positions 0 and 1 (fan_out, fan_in), got {infshape!r}"
            )
        std /= math.sqrt(in_dim.width_mult())
    elif ninf > 2:
        raise _too_many_inf(infshape, fn)
    return std


def xavier_uniform_(
    tensor: Tensor, gain: float = 1.0, *, generator: Optional[torch.Generator] = None
) -> Tensor:
    """μP ``torch.nn.init.xavier_uniform_`` (see the module docstring for the scaling)."""
    std = _xavier_std(tensor, gain, "xavier_uniform_")
    bound = math.sqrt(3.0) * std
    return torch.nn.init.uniform_(tensor, -bound, bound, generator=generator)


def xavier_normal_(
    tensor: Tensor, gain: float = 1.0, *, generator: Optional[torch.Generator] = None
) -> Tensor:
    """μP ``torch.nn.init.xavier_normal_`` (see the module docstring for the scaling)."""
    std = _xavier_std(tensor, gain, "xavier_normal_")
    return torch.nn.init.normal_(tensor, 0.0, std, generator=generator)


def _kaiming_std(tensor: Tensor, a: float, mode: str, nonlinearity: str, fn: str) -> float:
    infshape = _infshape(tensor, fn)
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode {mode!r} not supported, please use one of 'fan_in', 'fan_out'")
    fan_in, fan_out = _fans(tensor)
    fan = fan_in if mode == "fan_in" else fan_out
    std = calculate_gain(nonlinearity, a) / math.sqrt(fan)
    out_dim, in_dim = infshape[0], infshape[1]
    ninf = infshape.ninf()
    if ninf == 1:
        if mode == "fan_in" and in_dim.isinf():
            std *= in_dim.width_mult() ** 0.5
        elif mode == "fan_out" and out_dim.isinf():
            std *= out_dim.width_mult() ** 0.5
    elif ninf == 2:
        if not (out_dim.isinf() and in_dim.isinf()):
            raise ValueError(
                f"fastmup.init.{fn}: a tensor with two infinite dimensions must have them "
                f"at positions 0 and 1 (fan_out, fan_in), got {infshape!r}"
            )
        if mode == "fan_out":
            std *= math.sqrt(out_dim.width_mult() / in_dim.width_mult())
    elif ninf > 2:
        raise _too_many_inf(infshape, fn)
    return std


def _kaiming_(tensor: Tensor, a: float, mode: str, nonlinearity: str, generator: Optional[torch.Generator], fn: str) -> Tensor:
    """Both ``kaiming_*``: the μP std of :func:`_kaiming_std`, drawn as torch's ``fn`` draws it."""
    if 0 in tensor.shape:
        warnings.warn("Initializing zero-element tensors is a no-op", stacklevel=3)
        return tensor
    std = _kaiming_std(tensor, a, mode, nonlinearity, fn)
    if fn == "kaiming_normal_":
        return torch.nn.init.normal_(tensor, 0, std, generator=generator)
    bound = math.sqrt(3.0) * std
    return torch.nn.init.uniform_(tensor, -bound, bound, generator=generator)


def kaiming_uniform_(
    tensor: Tensor, a: float = 0, mode: str = "fan_in", nonlinearity: str = "leaky_relu", *, generator: Optional[torch.Generator] = None
) -> Tensor:
    """μP ``torch.nn.init.kaiming_uniform_`` (see the module docstring for the scaling)."""
    return _kaiming_(tensor, a, mode, nonlinearity, generator, "kaiming_uniform_")


def kaiming_normal_(
    tensor: Tensor, a: float = 0, mode: str = "fan_in", nonlinearity: str = "leaky_relu", *, generator: Optional[torch.Generator] = None
) -> Tensor:
    """μP ``torch.nn.init.kaiming_normal_`` (see the module docstring for the scaling)."""
    return _kaiming_(tensor, a, mode, nonlinearity, generator, "kaiming_normal_")
