"""Counter-based Rademacher probes: ``z = ±1`` as a pure function of where it is.

ESGD-M needs one random sign per parameter element on every Hessian-vector
product step.  Drawing them from the global torch RNG would make results
depend on whatever else used that RNG, differ between backends and break
bit-identical resumption.  Instead every sign is a bit of a hash::

    bits = H(seed, counter, tensor_id, word = element_index >> 5)   (32-bit)
    z    = -1 if bit (element_index & 31) of bits is set, else +1

``seed`` is fixed when the optimizer is built, ``counter`` advances by one per
probe draw, ``tensor_id`` is the parameter's position in the optimizer's
parameter list (group order) and ``element_index`` its flat (row-major)
offset.  One hash yields the signs of 32 consecutive elements, which makes
the torch path 32 times cheaper than hashing each element (on a GPU the
kernel simply rehashes the word per element).  The same function is
implemented three times, bit for bit: in plain Python (:func:`probe_bits`,
the specification), in torch integer ops (:func:`fill_rademacher_`, the
eager backend, any device, no RNG) and in Triton
(``fastmup.kernels.rademacher``), so every backend draws the same probes
whatever the grouping of tensors into launches.

The hash
--------
Everything is unsigned 32-bit arithmetic modulo ``2**32``.  The mixing
function is a two-multiply integer finaliser (xor-shift / multiply, with the
low-bias constants ``0x21F0AAAD`` and ``0x735A2D97``, shifts 16, 15, 15): a
bijection of the 32-bit words with full avalanche.  Words are absorbed one at
a time, ``absorb(h, w) = mix(h ^ w)``::

    prefix = absorb(absorb(absorb(absorb(IV, seed_lo), seed_hi), ctr_lo), ctr_hi)   # once per draw (host)
    key    = absorb(absorb(prefix, tensor_id), word_hi)                            # once per tensor (and 2**32 words)
    key2   = mix(key ^ 0x9E3779B9)
    bits   = mix(mix(word_lo ^ key) ^ key2)                                        # per word of 32 elements

with ``IV = 0x6A09E667`` and ``word_lo`` / ``word_hi`` the low and high 32
bits of the word index (``seed`` and ``counter`` are 64-bit, ``tensor_id``
32-bit).  Two keyed rounds per word make the sign streams of different
tensors and draws unrelated (one keyed round would make them shifted copies
of one stream).

Overflow: torch has no uint32, and int32 arithmetic would wrap through the
sign.  The torch path holds every word in int64, always in ``[0, 2**32)``;
both multipliers are below ``2**31``, so a product is below ``2**63`` and
never overflows int64; it is then masked with ``0xFFFFFFFF``.  Right shifts
of non-negative int64 are logical.  Triton computes on uint32, whose
multiplication wraps modulo ``2**32`` natively: the same numbers.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "MASK32",
    "IV",
    "GOLDEN",
    "MUL1",
    "MUL2",
    "mix32",
    "draw_prefix",
    "tensor_key",
    "probe_bits",
    "probe_sign",
    "fill_rademacher_",
    "rademacher",
]

MASK32 = 0xFFFFFFFF
IV = 0x6A09E667
GOLDEN = 0x9E3779B9
MUL1 = 0x21F0AAAD
MUL2 = 0x735A2D97
# Elements per torch chunk: bounds the int64 temporaries of the eager path
# (a multiple of 32, and 2**37 elements = 2**32 words is a multiple of it).
_CHUNK = 1 << 22


def mix32(x: int) -> int:
    """The 32-bit mixing bijection (Python ints)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MUL1) & MASK32
    x ^= x >> 15
    x = (x * MUL2) & MASK32
    x ^= x >> 15
    return x


def _absorb(h: int, word: int) -> int:
    return mix32(h ^ (word & MASK32))


def draw_prefix(seed: int, counter: int) -> int:
    """The per-draw part of the hash, computed once on the host."""
    seed &= (1 << 64) - 1
    counter &= (1 << 64) - 1
    h = _absorb(IV, seed & MASK32)
    h = _absorb(h, seed >> 32)
    h = _absorb(h, counter & MASK32)
    return _absorb(h, counter >> 32)


def tensor_key(prefix: int, tensor_id: int, word_hi: int = 0) -> int:
    """The per-tensor part (``word_hi``: the word index's high 32 bits)."""
    return _absorb(_absorb(prefix, tensor_id), word_hi)


def probe_bits(seed: int, counter: int, tensor_id: int, word: int) -> int:
    """The specification: the 32 sign bits of elements ``32·word .. 32·word+31``."""
    key = tensor_key(draw_prefix(seed, counter), tensor_id, word >> 32)
    key2 = mix32(key ^ GOLDEN)
    return mix32(mix32((word & MASK32) ^ key) ^ key2)


def probe_sign(seed: int, counter: int, tensor_id: int, index: int) -> int:
    """``+1`` or ``-1``: the probe entry of element ``index`` of tensor ``tensor_id``."""
    return -1 if (probe_bits(seed, counter, tensor_id, index >> 5) >> (index & 31)) & 1 else 1


def _mix32_(x: Tensor) -> Tensor:
    """:func:`mix32` on an int64 tensor of values in ``[0, 2**32)``, in place."""
    x.bitwise_xor_(x >> 16)
    x.mul_(MUL1).bitwise_and_(MASK32)  # x < 2**32, MUL1 < 2**31: no int64 overflow
    x.bitwise_xor_(x >> 15)
    x.mul_(MUL2).bitwise_and_(MASK32)
    x.bitwise_xor_(x >> 15)
    return x


def _word_bits(prefix: int, tensor_id: int, first: int, count: int, device) -> Tensor:
    """int64 hash words ``first .. first+count-1`` (within one run of 2**32 words)."""
    if count and (first >> 32) != ((first + count - 1) >> 32):
        raise ValueError("a run of probe words must not straddle a multiple of 2**32")
    key = tensor_key(prefix, tensor_id, first >> 32)
    key2 = mix32(key ^ GOLDEN)
    lo = first & MASK32
    x = torch.arange(lo, lo + count, dtype=torch.int64, device=device)
    x.bitwise_xor_(key)
    _mix32_(x)
    x.bitwise_xor_(key2)
    return _mix32_(x)


_TABLES: dict = {}


def _sign_table(dtype: torch.dtype, device) -> Tensor:
    """``[256, 8]``: row ``b`` holds the signs of the 8 bits of byte ``b`` (bit k -> column k)."""
    key = (dtype, str(device))
    table = _TABLES.get(key)
    if table is None:
        byte = torch.arange(256, dtype=torch.int64).unsqueeze(1)
        bits = (byte >> torch.arange(8, dtype=torch.int64)) & 1
        table = _TABLES[key] = (1 - 2 * bits).to(dtype=dtype, device=device)
    return table


def _signs(prefix: int, tensor_id: int, start: int, count: int, device, dtype: torch.dtype = torch.int64) -> Tensor:
    """±1 probes of elements ``start .. start+count-1`` (one run of 2**32 words), in ``dtype``."""
    if count == 0:
        return torch.empty(0, dtype=dtype, device=device)
    first, last = start >> 5, (start + count - 1) >> 5
    words = _word_bits(prefix, tensor_id, first, last - first + 1, device)
    if sys.byteorder == "little":
        # bytes of each word, least significant first: byte j holds the bits of
        # elements 8j .. 8j+7 of the word; a 256-entry table turns them into signs.
        words = words - ((words >> 31) << 32)  # the int32 bit pattern, exactly representable
        octets = words.to(torch.int32).view(torch.uint8).long()
        signs = _sign_table(dtype, device)[octets].view(-1)
    else:
        shifts = torch.arange(32, dtype=torch.int64, device=device)
        signs = (1 - 2 * ((words.unsqueeze(1) >> shifts) & 1)).view(-1).to(dtype)
    offset = start - 32 * first  # element 32·w + k <- bit k of word w
    return signs[offset : offset + count]


def fill_rademacher_(out: Tensor, seed: int, counter: int, tensor_id: int, *, prefix: Optional[int] = None) -> Tensor:
    """Fill ``out`` (any floating dtype, any device) with its ±1 probe, in place.

    Element ``e`` of ``out`` (row-major flat index, whatever ``out``'s
    strides) gets :func:`probe_sign` ``(seed, counter, tensor_id, e)``.  Uses
    int64 torch ops only: no RNG, identical on CPU and CUDA.  ``prefix``
    (:func:`draw_prefix` ``(seed, counter)``) saves recomputing it per tensor.
    """
    if prefix is None:
        prefix = draw_prefix(seed, counter)
    flat = out.view(-1) if out.is_contiguous() else torch.empty(out.numel(), dtype=out.dtype, device=out.device)
    n = flat.numel()
    start = 0
    while start < n:
        # aligned chunks of at most _CHUNK elements: never straddle 2**32 words
        count = min(_CHUNK - (start % _CHUNK), n - start)
        flat[start : start + count].copy_(_signs(prefix, tensor_id, start, count, out.device, out.dtype))
        start += count
    if not out.is_contiguous():
        out.copy_(flat.view(out.shape))
    return out


def rademacher(shape, seed: int, counter: int, tensor_id: int, *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """A new tensor of ±1 probes (see :func:`fill_rademacher_`)."""
    return fill_rademacher_(torch.empty(shape, dtype=dtype, device=device), seed, counter, tensor_id)
