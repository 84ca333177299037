"""Models of the demos, each in standard parametrization (SP) and in μP.

The SP model is plain PyTorch (``nn.Linear`` readout, ``1/sqrt(d_head)``
attention); the μP model differs only where μP says it must:

* the readout is a :class:`fastmup.MuReadout` started at zero;
* attention logits are scaled by ``1/d_head`` (as ``sqrt(base_d_head)/d_head``,
  so that the μP model equals the SP one at the base width);
* :func:`fastmup.set_base_shapes` is called with a base and a delta model
  (which also rescales the init), and training uses :class:`fastmup.MuAdam`.

:func:`build` returns a ready model of either kind.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastmup

__all__ = ["MLP", "Transformer", "build", "build_deep", "PARAMETRIZATIONS"]

PARAMETRIZATIONS = ("sp", "mup")


def _readout(width: int, d_out: int, mup: bool) -> nn.Linear:
    if mup:
        return fastmup.MuReadout(width, d_out, readout_zero_init=True)
    return nn.Linear(width, d_out)


class MLP(nn.Module):
    """``d_in → width → … → width → d_out`` with ReLUs (``n_hidden`` hidden
    activations; ``activation`` replaces the ReLU, e.g. ``torch.tanh``).

    ``fc_in`` and each ``hidden[i]`` are plain ``nn.Linear`` layers (their
    outputs are the pre-activations a coordinate check records), the readout
    an ``nn.Linear`` (SP) or a zero-initialised :class:`fastmup.MuReadout` (μP).
    """

    def __init__(
        self, width: int, d_in: int = 64, d_out: int = 10, n_hidden: int = 2, mup: bool = False,
        activation: Callable[[Tensor], Tensor] = F.relu,
    ) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_in, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(n_hidden - 1))
        self.readout = _readout(width, d_out, mup)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        h = self.activation(self.fc_in(x))
        for layer in self.hidden:
            h = self.activation(layer(h))
        return self.readout(h)


class Attention(nn.Module):
    """Causal multi-head self-attention with an explicit logit scale."""

    def __init__(self, d_model: int, n_heads: int, scale: float, zero_query: bool) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not a multiple of n_heads={n_heads}")
        self.n_heads = n_heads
        self.scale = scale
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        if zero_query:
            with torch.no_grad():
                self.qkv.weight[:d_model].zero_()
                self.qkv.bias[:d_model].zero_()

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """A pre-LayerNorm block; each branch ends in a :class:`fastmup.BranchMultiplier`
    (1, the plain block, until :func:`fastmup.set_depth` sets it to ``m_L^(-α)``)."""

    def __init__(self, d_model: int, n_heads: int, scale: float, zero_query: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, scale, zero_query)
        self.attn_scale = fastmup.BranchMultiplier()
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.mlp_scale = fastmup.BranchMultiplier()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn_scale(self.attn(self.ln1(x)))
        return x + self.mlp_scale(self.mlp(self.ln2(x)))


class Transformer(nn.Module):
    """A small pre-LayerNorm GPT: token + learned position embeddings, ``n_layers`` blocks, readout.

    ``n_heads`` stays fixed and ``d_head = d_model / n_heads`` grows with the
    width.  Attention logits are ``q·k · scale`` with ``scale = 1/sqrt(d_head)``
    in SP and ``sqrt(base_d_head)/d_head`` (μP's ``1/d``) with ``mup=True``.
    ``zero_query=True`` starts the query projection at zero, which mup
    suggests to make attention logits width-independent at init; it is off
    by default because here it slows the learning of the (needed)
    previous-token attention at every width.
    """

    def __init__(
        self,
        d_model: int,
        vocab: int = 16,
        seq_len: int = 32,
        n_layers: int = 2,
        n_heads: int = 4,
        mup: bool = False,
        base_d_model: Optional[int] = None,
        zero_query: bool = False,
    ) -> None:
        super().__init__()
        d_head = d_model // n_heads
        if mup:
            base_d_head = (base_d_model or d_model) // n_heads
            scale = math.sqrt(base_d_head) / d_head
        else:
            scale = 1.0 / math.sqrt(d_head)
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, scale, zero_query) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.readout = _readout(d_model, vocab, mup)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.readout(self.ln_f(x))


def _factory(model: str, **kwargs) -> Callable[..., nn.Module]:
    if model == "mlp":
        return lambda width, mup, base: MLP(width, mup=mup, **kwargs)
    if model == "transformer":
        return lambda width, mup, base: Transformer(width, mup=mup, base_d_model=base, **kwargs)
    raise ValueError(f"unknown model {model!r}: expected 'mlp' or 'transformer'")


def build(model: str, width: int, parametrization: str, base_width: int, **kwargs) -> nn.Module:
    """A freshly initialised ``model`` ('mlp' or 'transformer') of ``width``.

    ``parametrization='sp'``: plain PyTorch.  ``'mup'``: μP modules, with base
    shapes set from a model of ``base_width`` (the delta model has twice that
    width), which rescales the init; train it with :class:`fastmup.MuAdam`.
    ``kwargs`` go to the model's constructor (e.g. ``vocab``, ``n_layers``).
    """
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
    make = _factory(model, **kwargs)
    mup = parametrization == "mup"
    net = make(width, mup, base_width)
    if mup:
        # The base and delta models only lend their parameter shapes (for big
        # models, build them on the meta device); the delta tells which
        # dimensions grow with the width.
        fastmup.set_base_shapes(net, make(base_width, True, base_width), delta=make(2 * base_width, True, base_width))
    return net


def build_deep(
    depth: int, alpha: float, base_depth: int, width: int = 64, base_width: Optional[int] = None, **kwargs
) -> Transformer:
    """A μP :class:`Transformer` of ``depth`` blocks with depth scaling ``alpha``.

    Base shapes from models of width ``base_width`` (default ``width``) and
    twice that, of the same depth, built on the meta device; then
    :func:`fastmup.set_depth` with ``base_depth`` and ``alpha`` (0: μP alone,
    no depth scaling; 1: CompleteP; 0.5: depth-μP).  ``kwargs`` go to the
    constructor (``vocab``, ``seq_len``, ``n_heads``...).
    """
    base_width = width if base_width is None else base_width
    net = Transformer(width, n_layers=depth, mup=True, base_d_model=base_width, **kwargs)
    with torch.device("meta"):
        base = Transformer(base_width, n_layers=depth, mup=True, base_d_model=base_width, **kwargs)
        delta = Transformer(2 * base_width, n_layers=depth, mup=True, base_d_model=base_width, **kwargs)
    fastmup.set_base_shapes(net, base, delta=delta)
    fastmup.set_depth(net, blocks=net.blocks, base_depth=base_depth, alpha=alpha)
    return net
