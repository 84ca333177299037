"""Small models shared by the fastmup tests (parametrization and optimizers).

Every model takes its width as first argument and the class that provides
the readout, so the same architecture can be built with fastmup's layers
(``make_*``) or with the installed mup 1.0's (``make_mup_*``) for parity
tests.  mup's ``MuSharedReadout(bias=True)`` creates a bias of the wrong
shape, so the transformer uses a bias-free tied readout unless asked.

    make_mlp(width), make_cnn(width), make_transformer(width)      # fastmup
    make_mup_mlp(width), make_mup_cnn(width), make_mup_transformer(width)
    set_shapes(make_mlp, 64, BASE_WIDTH, DELTA_WIDTH, fastmup)     # or mup
    mlp_batch(), cnn_batch(), lm_batch()                            # (x, y)
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import fastmup.layer as fast_layer

D_IN = 16
N_CLASSES = 10
IMG_CHANNELS = 3
IMG_SIZE = 6
VOCAB = 37
SEQ_LEN = 8
N_HEAD = 2

BASE_WIDTH = 8
DELTA_WIDTH = 16


def _mup_layer():
    import mup.layer

    return mup.layer


class MLP(nn.Module):
    """``D_IN → width → width → n_out`` with ReLUs and a MuReadout head."""

    def __init__(self, width: int, layer=fast_layer, d_in: int = D_IN, n_out: int = N_CLASSES,
                 bias: bool = True, readout_zero_init: bool = False, output_mult: float = 1.0):
        super().__init__()
        self.fc1 = nn.Linear(d_in, width, bias=bias)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(width, width, bias=bias)
        self.act2 = nn.ReLU()
        self.readout = layer.MuReadout(width, n_out, bias=bias, readout_zero_init=readout_zero_init,
                                       output_mult=output_mult)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.act2(self.fc2(self.act1(self.fc1(x)))))


class CNN(nn.Module):
    """Two 3x3 convolutions (width channels, BatchNorm between) and a MuReadout head."""

    def __init__(self, width: int, layer=fast_layer, n_out: int = N_CLASSES, readout_zero_init: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(IMG_CHANNELS, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.readout = layer.MuReadout(width, n_out, readout_zero_init=readout_zero_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.readout(self.pool(h).flatten(1))


class TinyTransformer(nn.Module):
    """One pre-LN causal block with μP (8/d_head) attention and a tied readout.

    Both the number of heads' width (``d_head = width / N_HEAD``) and the MLP
    width scale with ``width``; the vocabulary and sequence length are fixed.
    """

    def __init__(self, width: int, layer=fast_layer, readout_bias: bool = False,
                 readout_zero_init: bool = False, vocab: int = VOCAB, seq_len: int = SEQ_LEN):
        super().__init__()
        assert width % N_HEAD == 0
        self.width = width
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(seq_len, width) * 0.02)
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.ff1 = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.ff2 = nn.Linear(4 * width, width)
        self.ln_f = nn.LayerNorm(width)
        self.readout = layer.MuSharedReadout(self.embed.weight, bias=readout_bias,
                                             readout_zero_init=readout_zero_init)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        x = self.embed(idx) + self.pos[:t]
        q, k, v = self.qkv(self.ln1(x)).split(self.width, dim=-1)
        d_head = self.width // N_HEAD
        q, k, v = (z.view(b, t, N_HEAD, d_head).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (8.0 / d_head)  # μP: 1/d, not 1/sqrt(d)
        mask = torch.ones(t, t, dtype=torch.bool, device=idx.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, self.width)
        x = x + self.proj(y)
        x = x + self.ff2(self.act(self.ff1(self.ln2(x))))
        return self.readout(self.ln_f(x))


def make_mlp(width: int, **kw) -> MLP:
    return MLP(width, fast_layer, **kw)


def make_cnn(width: int, **kw) -> CNN:
    return CNN(width, fast_layer, **kw)


def make_transformer(width: int, **kw) -> TinyTransformer:
    return TinyTransformer(width, fast_layer, **kw)


def make_mup_mlp(width: int, **kw) -> MLP:
    return MLP(width, _mup_layer(), **kw)


def make_mup_cnn(width: int, **kw) -> CNN:
    return CNN(width, _mup_layer(), **kw)


def make_mup_transformer(width: int, **kw) -> TinyTransformer:
    if kw.get("readout_bias"):
        raise ValueError("mup 1.0's MuSharedReadout(bias=True) has a wrongly shaped bias")
    return TinyTransformer(width, _mup_layer(), **kw)


def mup_models(width: int) -> Dict[str, nn.Module]:
    """The three architectures built with mup 1.0's readouts."""
    return {"mlp": make_mup_mlp(width), "cnn": make_mup_cnn(width), "transformer": make_mup_transformer(width)}


def fastmup_models(width: int) -> Dict[str, nn.Module]:
    """The three architectures built with fastmup's readouts."""
    return {"mlp": make_mlp(width), "cnn": make_cnn(width), "transformer": make_transformer(width)}


#: name -> (fastmup constructor, mup constructor, batch function)
ARCHS: Dict[str, Tuple[Callable[..., nn.Module], Callable[..., nn.Module], Callable[..., tuple]]] = {}


def set_shapes(model_fn: Callable[[int], nn.Module], width: int, base_width: int = BASE_WIDTH,
               delta_width: int = DELTA_WIDTH, lib=None, **kw) -> nn.Module:
    """``lib.set_base_shapes(model_fn(width), model_fn(base_width), delta=model_fn(delta_width))``.

    ``lib`` is the ``fastmup`` or ``mup`` module (default fastmup); ``kw`` go
    to ``set_base_shapes``.  The target is built first, so under a fixed seed
    its initial weights do not depend on the base and delta models.
    """
    if lib is None:
        import fastmup as lib
    model = model_fn(width)
    return lib.set_base_shapes(model, model_fn(base_width), delta=model_fn(delta_width), **kw)


def mlp_batch(n: int = 8, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g), torch.randint(0, N_CLASSES, (n,), generator=g)


def cnn_batch(n: int = 4, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IMG_CHANNELS, IMG_SIZE, IMG_SIZE, generator=g)
    return x, torch.randint(0, N_CLASSES, (n,), generator=g)


def lm_batch(n: int = 2, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(n, SEQ_LEN)`` and next-token targets of the same shape."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, SEQ_LEN + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for all three architectures (flattens sequence outputs)."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


ARCHS.update({
    "mlp": (make_mlp, make_mup_mlp, mlp_batch),
    "cnn": (make_cnn, make_mup_cnn, cnn_batch),
    "transformer": (make_transformer, make_mup_transformer, lm_batch),
})
