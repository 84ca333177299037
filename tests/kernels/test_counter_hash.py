"""fastmup.kernels.counter_hash against the specification in fastmup.optim.rademacher."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastmup.kernels import counter_hash  # noqa: E402
from fastmup.optim import rademacher  # noqa: E402

from .conftest import DEVICE  # noqa: E402

BLOCK = 256


def _int32(word: int) -> int:
    return word - (1 << 32) if word >= (1 << 31) else word


@triton.jit
def _mix_kernel(x_ptr, mix_ptr, rest_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    tl.store(mix_ptr + offs, counter_hash.mix32(x).to(tl.int32, bitcast=True), mask=mask)
    tl.store(rest_ptr + offs, counter_hash.mix32_rest(x).to(tl.int32, bitcast=True), mask=mask)


@triton.jit
def _words_kernel(out_ptr, prefix, tensor_id, word_hi, first_lo, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    key, key2 = counter_hash.tensor_keys(prefix.to(tl.uint32, bitcast=True), tensor_id, word_hi)
    bits = counter_hash.hash_word(first_lo.to(tl.uint32, bitcast=True) + offs.to(tl.uint32), key, key2)
    tl.store(out_ptr + offs, bits.to(tl.int32, bitcast=True), mask=offs < n)


def _words(t: torch.Tensor) -> list[int]:
    return [v & 0xFFFFFFFF for v in t.cpu().tolist()]


def test_mix32_is_the_specification():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor([0, 1, -1, -(2**31), 2**31 - 1]), torch.randint(-(2**31), 2**31, (1000,), generator=g)])
    x = x.to(torch.int32)
    n = x.numel()
    mix, rest = (torch.empty(n, dtype=torch.int32, device=DEVICE) for _ in range(2))
    _mix_kernel[(triton.cdiv(n, BLOCK),)](x.to(DEVICE), mix, rest, n, BLOCK=BLOCK)
    words = _words(x)
    assert _words(mix) == [rademacher.mix32(w) for w in words]
    # mix32_rest(y) is mix32 of the word whose first xorshift gives y (the xorshift is a bijection)
    undo = [w ^ (w >> 16) for w in words]  # (x ^ x >> 16) is its own inverse on 32 bits
    assert _words(rest) == [rademacher.mix32(u) for u in undo]


@pytest.mark.parametrize("first", [0, 1000, (1 << 32) - 100, (3 << 32) + 7])
def test_words_are_the_probe_bits(first):
    seed, counter, tensor_id, n = 0x1234_5678_9ABC, 17, 5, 600
    prefix = rademacher.draw_prefix(seed, counter)
    if (first >> 32) != ((first + n - 1) >> 32):
        n = (((first >> 32) + 1) << 32) - first  # one run of words: the keys take the high half once
    out = torch.empty(n, dtype=torch.int32, device=DEVICE)
    lo = _int32(first & 0xFFFFFFFF)
    _words_kernel[(triton.cdiv(n, BLOCK),)](out, _int32(prefix), tensor_id, first >> 32, lo, n, BLOCK=BLOCK)
    assert _words(out) == [rademacher.probe_bits(seed, counter, tensor_id, first + k) for k in range(n)]
