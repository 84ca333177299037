"""Data for the demos: small, bundled or generated in code, no download.

* :func:`load_digits_data`: scikit-learn's bundled 8x8 digits (1797 images,
  10 classes), standardised, as tensors.  scikit-learn is an optional
  dependency, imported here only.
* :class:`MarkovTask`: next-token prediction on sequences drawn from a fixed
  random *second-order* Markov chain.  The next token depends on the last two
  tokens, so a model must attend to the previous position: a task with
  learnable structure for a transformer, and a known optimum (the entropy
  rate of the chain) to compare the loss with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Tuple

import torch
from torch import Tensor

__all__ = ["load_digits_data", "minibatches", "MarkovTask"]


def load_digits_data(dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor]:
    """``(x, y)``: the 1797 digits as ``(1797, 64)`` standardised features and labels 0..9."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits demo needs scikit-learn (it ships the data set, no download): "
            "pip install scikit-learn"
        ) from e
    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x, dtype=dtype)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1.0)  # the always-blank border pixels stay 0
    return x, torch.as_tensor(y, dtype=torch.long)


def minibatches(x: Tensor, y: Tensor, batch_size: int, steps: int, seed: int) -> Iterator[Tuple[Tensor, Tensor]]:
    """``steps`` minibatches drawn by reshuffling ``(x, y)`` every epoch (seeded)."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    perm = torch.randperm(n, generator=g)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        yield x[idx], y[idx]


@dataclass
class MarkovTask:
    """A fixed random second-order Markov chain over ``vocab`` tokens.

    The next token ``c`` after ``(a, b)`` is drawn with probability
    ``softmax(first_order * z1[b] + second_order * z2[a, b])[c]``, ``z1``,
    ``z2`` standard normal tables drawn once from ``seed``.  The first-order
    part is learnt quickly (a bigram model), the second-order part needs the
    model to look at the previous position too: the loss falls in stages
    towards the chain's entropy rate (:meth:`entropy_rates`; with the
    defaults, 2.60 nats/token knowing no context, 1.73 knowing the last
    token, 1.34 knowing the last two).
    """

    vocab: int = 16
    seq_len: int = 32
    first_order: float = 2.0
    second_order: float = 1.5
    seed: int = 1234

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        v = self.vocab
        z1 = torch.randn(v, v, generator=g)
        z2 = torch.randn(v, v, v, generator=g)
        logits = self.first_order * z1[None] + self.second_order * z2
        self.probs = torch.softmax(logits.reshape(v * v, v), dim=-1)  # row a*v + b: P(next | a, b)

    def sample(self, n: int, seed: int) -> Tensor:
        """``n`` sequences of ``seq_len + 1`` tokens (long tensor)."""
        g = torch.Generator().manual_seed(seed)
        seq = torch.empty(n, self.seq_len + 1, dtype=torch.long)
        seq[:, :2] = torch.randint(self.vocab, (n, 2), generator=g)
        for t in range(2, self.seq_len + 1):
            ctx = seq[:, t - 2] * self.vocab + seq[:, t - 1]
            seq[:, t] = torch.multinomial(self.probs[ctx], 1, generator=g).squeeze(1)
        return seq

    def batches(self, batch_size: int, steps: int, seed: int) -> Iterator[Tuple[Tensor, Tensor]]:
        """``steps`` fresh batches ``(inputs, targets)`` of shape ``(batch_size, seq_len)``."""
        data = self.sample(batch_size * steps, seed)
        for i in range(steps):
            chunk = data[i * batch_size : (i + 1) * batch_size]
            yield chunk[:, :-1], chunk[:, 1:]

    def entropy_rates(self) -> Tuple[float, float, float]:
        """Loss (nats/token) of the best predictor that sees 0, 1 or 2 previous tokens.

        ``(unigram, bigram, optimum)`` at the chain's stationary distribution
        over contexts (found by power iteration); a model that has learnt the
        chain reaches the last.
        """
        v = self.vocab
        p = self.probs.double()
        ctx = torch.full((v * v,), 1.0 / (v * v), dtype=torch.float64)
        for _ in range(500):
            # (a, b) -> (b, c) with probability p[(a, b), c]
            ctx = (ctx[:, None] * p).reshape(v, v, v).sum(0).reshape(-1)
        h2 = float((ctx * -(p * p.clamp_min(1e-300).log()).sum(-1)).sum())
        joint = ctx.reshape(v, v)  # [a, b]
        pb = joint.sum(0)
        p1 = (joint[:, :, None] * p.reshape(v, v, v)).sum(0) / pb.clamp_min(1e-300)[:, None]  # P(c | b)
        h1 = float((pb * -(p1 * p1.clamp_min(1e-300).log()).sum(-1)).sum())
        h0 = float(-(pb * pb.clamp_min(1e-300).log()).sum())
        return h0, h1, h2
