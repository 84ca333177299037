"""Small μP models for optimizer tests, built with fastmup's parametrization."""
from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from torch import nn

import fastmup


class MLP(nn.Module):
    def __init__(self, width: int, d_in: int = 12, d_out: int = 5):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.hidden = nn.Linear(width, 2 * width)
        self.hidden2 = nn.Linear(2 * width, width, bias=False)
        self.norm = nn.LayerNorm(width)
        self.out = fastmup.MuReadout(width, d_out)

    def forward(self, x):
        x = torch.relu(self.inp(x))
        x = torch.relu(self.hidden(x))
        return self.out(self.norm(self.hidden2(x)))


class CNN(nn.Module):
    def __init__(self, width: int, classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        # No bias before BatchNorm (its gradient is zero up to rounding noise,
        # which Adam would normalise into O(lr) random updates).
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.out = fastmup.MuReadout(width, classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.bn(self.conv2(x)))
        return self.out(x.mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    """One pre-norm block, 1/d attention scaling, readout tied to the embedding."""

    def __init__(self, width: int, vocab: int = 17, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, width)
        self.ln1 = nn.LayerNorm(width)
        # No qkv bias: the key bias has a zero gradient (softmax is shift
        # invariant), which Adam would turn into noise-driven updates.
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)
        self.readout = fastmup.MuSharedReadout(self.embed.weight, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-1, -2)) * (8.0 / (d // self.heads))
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        x = x + self.fc2(torch.relu(self.fc(self.ln2(x))))
        return self.readout(x)


MODELS: dict[str, tuple[Callable[[int], nn.Module], Callable[[], tuple]]] = {
    "mlp": (MLP, lambda: (torch.randn(16, 12), torch.randint(0, 5, (16,)))),
    "cnn": (CNN, lambda: (torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,)))),
    "transformer": (TinyTransformer, lambda: (torch.randint(0, 17, (3, 7)), torch.randint(0, 17, (3, 7)))),
}


def build(kind: str, width: int, base: int = 8, delta: int = 16, seed: int = 0) -> nn.Module:
    cls, _ = MODELS[kind]
    torch.manual_seed(seed)
    model = cls(width)
    fastmup.set_base_shapes(model, cls(base), delta=cls(delta))
    return model


def clone(model: nn.Module) -> nn.Module:
    """A deep copy that keeps every parameter's infshape."""
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.infshape = p.infshape
    return twin


def loss_of(kind: str, model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    out = model(x)
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def train(kind: str, model: nn.Module, opt, steps: int = 4, seed: int = 1) -> None:
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    batches = [MODELS[kind][1]() for _ in range(steps)]
    torch.random.set_rng_state(gen_state)
    for batch in batches:
        opt.zero_grad()
        loss_of(kind, model, batch).backward()
        opt.step()


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.fixture(params=sorted(MODELS))
def kind(request) -> str:
    return request.param


def available_backends() -> list[str]:
    """The backends that run on CPU tensors here (Triton's CPU interpreter is
    exercised in tests/kernels)."""
    names = ["eager"]
    try:
        from fastmup import ext

        if ext.available("cpu"):
            names.append("cpu")
    except ImportError:
        pass
    return names


@pytest.fixture(params=available_backends())
def backend(request) -> str:
    return request.param


def assert_same(a: nn.Module, b: nn.Module, backend: str) -> None:
    """Bit-identical for the eager reference (same ops as torch); fused
    backends round differently (fma, one rounding per element), a few fp32
    ulps per step, so a relative tolerance of 1e-5 after a few steps."""
    if backend == "eager":
        assert max_diff(a, b) == 0.0
    else:
        torch.testing.assert_close(list(a.parameters()), list(b.parameters()), rtol=1e-5, atol=1e-6)
