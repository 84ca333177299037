"""Output layers for μP.

A readout maps a width dimension (``d_model``) to a fixed one (classes,
vocabulary).  Under μP its logits must stay O(1) as the width multiplier
``m`` of its fan-in grows, which a ``1/m`` forward multiplier achieves while
the weights keep the base model's initial variance:

    y = W (output_mult · x / m) + b.

At ``m = 1`` this is exactly ``nn.Linear`` scaled by ``output_mult``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastmup.infshape import require_infshape
from fastmup.infshape_registry import find_infshape

__all__ = ["MuReadout", "MuSharedReadout", "rescale_linear_bias"]

#: Largest number of elements MuSharedReadout draws at once on CPU (see there).
RNG_CHUNK = 1 << 20


def _rescaled_twice_error(what: str, bypass: str) -> RuntimeError:
    return RuntimeError(
        f"{what} has already rescaled these parameters once; doing it again would "
        "apply the μP factor twice. If you are calling set_base_shapes on a model "
        "loaded from a checkpoint or re-setting its base shapes, pass "
        f"rescale_params=False. To rescale anyway, set `{bypass}._has_rescaled_params "
        "= False` first."
    )


class MuReadout(nn.Linear):
    """Drop-in replacement for an output ``nn.Linear`` (width → fixed size).

    ``forward(x) = linear(output_mult * x / m, W, b)`` with ``m`` the width
    multiplier of the weight's fan-in.  ``readout_zero_init=True`` starts W
    and b at zero (recommended: it removes the 1/√m shrinking of the output
    at initialization).

    ``m`` is kept as a plain Python float on the module (``_width_mult``),
    set when :func:`fastmup.set_base_shapes` / :func:`fastmup.apply_infshapes`
    attach base shapes.  The forward pass therefore never looks at attributes
    of the weight tensor, so it keeps working after ``copy.deepcopy``, under
    ``torch.compile(fullgraph=True)`` and after FSDP-style wrappers replace the
    Parameter objects.  It is not part of ``state_dict`` (keys are those of
    ``nn.Linear``); see :func:`fastmup.shape.set_base_shapes` for the
    checkpoint recipe that restores it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        *,
        readout_zero_init: bool = False,
        output_mult: float = 1.0,
    ) -> None:
        # nn.Linear.__init__ calls reset_parameters, which reads these.
        self._init_readout_attrs(readout_zero_init, output_mult)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)

    def _init_readout_attrs(self, readout_zero_init: bool, output_mult: float) -> None:
        self.readout_zero_init = readout_zero_init
        self.output_mult = output_mult
        self._width_mult: Optional[float] = None
        self._has_rescaled_params = False

    def reset_parameters(self) -> None:
        if self.readout_zero_init:
            with torch.no_grad():
                self.weight.zero_()
                if self.bias is not None:
                    self.bias.zero_()
        else:
            super().reset_parameters()

    def _set_width_mult(self, width_mult: float) -> None:
        """Record the fan-in width multiplier ``m`` used by :meth:`forward`."""
        width_mult = float(width_mult)
        if not (math.isfinite(width_mult) and width_mult > 0):
            raise ValueError(f"width multiplier must be a positive finite number, got {width_mult}")
        self._width_mult = width_mult

    def width_mult(self) -> float:
        """The width multiplier ``m`` of the readout's fan-in."""
        wm = self._width_mult
        if wm is not None:
            return wm
        # Only reached when infshapes were attached by hand instead of through
        # set_base_shapes/apply_infshapes.
        infshape = find_infshape(self.weight)
        if infshape is None:
            raise RuntimeError(
                f"{type(self).__name__}(in_features={self.in_features}, "
                f"out_features={self.out_features}) has no width multiplier: call "
                "fastmup.set_base_shapes(model, base, delta=...) before using the model "
                "(after loading a checkpoint: set_base_shapes(model, base_shapes, "
                "rescale_params=False))"
            )
        return float(infshape.width_mult())

    def _rescale_parameters(self) -> None:
        """Turn a standard initialization into μP's: ``W, b ← √m · W, √m · b``.

        Not idempotent, so a second call raises unless
        ``_has_rescaled_params`` is reset by hand.
        """
        if getattr(self, "_has_rescaled_params", False):
            raise _rescaled_twice_error(f"{type(self).__name__}._rescale_parameters", "module")
        factor = self.width_mult() ** 0.5
        with torch.no_grad():
            if self.bias is not None:
                self.bias.mul_(factor)
            self.weight.mul_(factor)
        self._has_rescaled_params = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.output_mult * x / self.width_mult(), self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, output_mult={self.output_mult}, "
            f"readout_zero_init={self.readout_zero_init}, width_mult={self._width_mult}"
        )


class MuSharedReadout(MuReadout):
    """:class:`MuReadout` whose weight is tied to an ``nn.Embedding`` weight.

    ``weight`` has the embedding layout ``(vocab, width)``, which is already
    the ``(out_features, in_features)`` layout of a readout, so the layer maps
    ``width → vocab`` and its optional bias has ``vocab = weight.shape[0]``
    entries (mup 1.0 gives it ``width`` entries, which cannot be added to the
    logits).  The bias starts at zero with ``readout_zero_init`` and otherwise
    like ``nn.Linear``'s, U(-1/√width, 1/√width).

    Building the layer consumes the random stream exactly as mup 1.0's does,
    so that under the same seed every later draw (dropout masks, data
    shuffles, the next layer's init) is the same as with mup.  mup builds an
    ``nn.Linear(vocab, width)`` that it throws away: ``width·vocab`` uniform
    draws for its weight, then ``width`` for its bias (none with
    ``readout_zero_init``), from the generator of the ``device`` argument (or
    the default device) in the ``dtype`` argument (or the default dtype).
    The same draws are made here; on CPU in row chunks of at most
    :data:`RNG_CHUNK` elements, so no weight-sized tensor is allocated
    (torch's CPU generator advances by the same amount per element however
    the draws are split), on other devices as one tensor as mup does (their
    generators advance per launch).  The bias takes its values from the
    first ``vocab`` of the weight draws.  ``reset_parameters`` re-initializes
    only the bias: the tied weight belongs to the embedding.
    """

    def __init__(self, weight: nn.Parameter, bias: bool = True, **kwargs) -> None:
        if not isinstance(weight, nn.Parameter):
            raise TypeError(
                f"MuSharedReadout needs the embedding's nn.Parameter to share, got {type(weight).__name__}"
            )
        if weight.dim() != 2:
            raise ValueError(
                f"MuSharedReadout needs a 2-D (vocab, width) weight, got shape {tuple(weight.shape)}"
            )
        readout_zero_init = kwargs.pop("readout_zero_init", False)
        output_mult = kwargs.pop("output_mult", 1.0)
        device = kwargs.pop("device", None)
        dtype = kwargs.pop("dtype", None)
        if kwargs:
            raise TypeError(f"MuSharedReadout got unexpected keyword arguments {sorted(kwargs)}")
        # Not nn.Linear.__init__: its weight would be replaced by the shared one.
        nn.Module.__init__(self)
        self._init_readout_attrs(readout_zero_init, output_mult)
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        if bias:
            self.bias = nn.Parameter(
                torch.empty(
                    self.out_features,
                    device=weight.device if device is None else device,
                    dtype=weight.dtype if dtype is None else dtype,
                )
            )
        else:
            self.register_parameter("bias", None)
        values = None if readout_zero_init else self._draw_as_mup(bias, device, dtype)
        with torch.no_grad():
            if self.bias is not None:
                if values is None:
                    self.bias.zero_()
                else:
                    self.bias.copy_(values)

    def _draw_as_mup(self, bias: bool, device, dtype) -> Optional[torch.Tensor]:
        """Make mup's draws (see the class docstring); return the bias values,
        U(-1/√width, 1/√width), or ``None`` on the meta device."""
        width, vocab = self.in_features, self.out_features
        probe = torch.empty(0, device=device, dtype=dtype)  # where and how mup would draw
        if probe.device.type == "meta":
            return None
        bound = 1 / math.sqrt(width) if width > 0 else 0.0
        first = probe.new_zeros(vocab)
        if probe.device.type == "cpu":
            rows_per_chunk = max(1, RNG_CHUNK // max(vocab, 1))
            done = 0
            while done < width:
                rows = min(rows_per_chunk, width - done)
                chunk = probe.new_empty(rows, vocab).uniform_(-bound, bound)
                if done == 0:
                    first = chunk[0].clone()
                done += rows
        else:
            throwaway = probe.new_empty(width, vocab).uniform_(-bound, bound)
            if width > 0:
                first = throwaway[0].clone()
            del throwaway
        if bias:
            probe.new_empty(width).uniform_()
        return first

    def reset_parameters(self) -> None:
        # Runs with bias still unset if a subclass calls it early.
        bias = getattr(self, "bias", None)
        if bias is None:
            return
        with torch.no_grad():
            if self.readout_zero_init:
                bias.zero_()
            else:
                bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
                nn.init.uniform_(bias, -bound, bound)


def rescale_linear_bias(linear: nn.Module) -> None:
    """Turn a standard bias init into μP's for an ``nn.Linear`` or ``_ConvNd``.

    PyTorch draws biases from U(-1/√fan_in, 1/√fan_in), which shrinks with
    width; μP wants a width-independent size, so ``b ← √m_in · b`` with
    ``m_in`` the multiplier of the weight's dimension 1 (its fan-in).  Not
    idempotent: a second call raises unless ``_has_rescaled_params`` is reset.
    """
    if getattr(linear, "_has_rescaled_params", False):
        raise _rescaled_twice_error("rescale_linear_bias", "linear")
    if linear.bias is None:
        return
    infshape = require_infshape(linear.weight, "rescale_linear_bias")
    factor = infshape[1].width_mult() ** 0.5
    with torch.no_grad():
        linear.bias.mul_(factor)
    linear._has_rescaled_params = True
