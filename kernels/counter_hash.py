"""jit helpers of the counter-based hash of :mod:`fastmup.optim.rademacher`.

One hash serves two kernels: the Rademacher probes
(:mod:`fastmup.kernels.rademacher`, one word per 32 elements) and the random
bits of stochastic rounding (:mod:`fastmup.kernels.rounding`, one word per
element).  Both derive a tensor's two keys from a per-draw prefix and hash
each word with them::

    key  = absorb(absorb(prefix, tensor_id), word_hi)
    key2 = mix32(key ^ GOLDEN)
    bits = mix32(mix32(word_lo ^ key) ^ key2)

All of it is uint32 arithmetic (multiplication wraps modulo ``2**32``), the
numbers of the torch path's masked int64 arithmetic.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["GOLDEN", "MUL1", "MUL2", "absorb", "hash_word", "mix32", "mix32_rest", "tensor_keys"]

# The hash constants of fastmup.optim.rademacher (constexpr: read inside the jit functions).
GOLDEN = tl.constexpr(0x9E3779B9)
MUL1 = tl.constexpr(0x21F0AAAD)
MUL2 = tl.constexpr(0x735A2D97)


@triton.jit
def mix32_rest(x):
    """:func:`mix32` after its first xorshift, for callers that do that step
    on a per-tile scalar rather than on every element."""
    x = x * MUL1
    x = x ^ (x >> 15)
    x = x * MUL2
    x = x ^ (x >> 15)
    return x


@triton.jit
def mix32(x):
    """The 32-bit mixing bijection of ``fastmup.optim.rademacher.mix32`` (``x``: uint32)."""
    return mix32_rest(x ^ (x >> 16))


@triton.jit
def absorb(h, w):
    """``mix32(h ^ w)``: the hash state ``h`` after the word ``w`` (uint32)."""
    return mix32(h ^ w)


@triton.jit
def tensor_keys(prefix, tensor_id, word_hi):
    """``(key, key2)`` (uint32) of one tensor's words under a draw's
    ``prefix`` (uint32); ``tensor_id`` and ``word_hi`` (the high half of the
    word index) are integers whose low 32 bits are taken."""
    key = absorb(absorb(prefix, tensor_id.to(tl.uint32)), word_hi.to(tl.uint32))
    return key, mix32(key ^ GOLDEN)


@triton.jit
def hash_word(word_lo, key, key2):
    """The 32 bits of the words whose indices have low halves ``word_lo`` (uint32)."""
    return mix32(mix32(word_lo ^ key) ^ key2)
