"""Fused multi-tensor Rademacher probes: one launch fills the probes of a whole batch.

Entry ``e`` of tensor ``i`` of a :class:`TensorBatch` gets a bit of the
counter-based hash of :mod:`fastmup.optim.rademacher`::

    bits = H(seed, counter, tensor_id = batch.index[i], word = e >> 5)
    z    = -1 if bit (e & 31) of bits is set, else +1

The per-draw prefix ``H(seed, counter)`` is computed on the host (four mixes,
once per draw) and passed as one 32-bit word; each program derives its
tensor's keys from it (two mixes, :mod:`fastmup.kernels.counter_hash`), then
each word of 32 elements is hashed (two mixes) once per thread that holds
some of its elements, and the signs are set on the bits of ±1.  All of it is uint32 arithmetic, which wraps
modulo ``2**32`` exactly like the torch path's masked int64 arithmetic, so
both backends draw identical probes.

The probes of a batch are written into one flat buffer of the grads' dtype
(tensor ``i`` at ``offsets[i]``, a multiple of ``PAD`` elements); the caller
hands out per-tensor views as the ``grad_outputs`` of the Hessian-vector
product.  Layout as in :mod:`fastmup.kernels.adam`: one program per
``BLOCK`` elements of one tensor through the batch's block map.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from . import _common
from ._common import block_extent
from .counter_hash import hash_word, tensor_keys

__all__ = ["rademacher_kernel", "launch", "BLOCK", "TILE"]

# A store-only kernel: 4096 elements per program (2**32 words = 2**37 elements
# is a multiple of it, so a block never straddles the word index's high half).
BLOCK = 4096
TILE = 1024
NUM_WARPS = 4
# Each tensor's probes start at a multiple of PAD elements of the flat
# buffer: 16 bytes in bf16/fp16, so full tiles store with 16-byte accesses.
PAD = 8


@triton.jit
def _signs(bits, TILE: tl.constexpr, OUT: tl.constexpr):
    """``[TILE // 32, 32]`` tile of ±1 in ``OUT`` from one hash word per row:
    ``-1`` where bit ``j`` of the row's word is set.  Built on the bits (sign
    bit over the pattern of 1.0): no float arithmetic, no select."""
    bit = (bits[:, None] >> tl.arange(0, 32)[None, :].to(tl.uint32)) & 1
    if OUT.primitive_bitwidth == 32:
        return (0x3F800000 | (bit << 31)).to(OUT, bitcast=True)
    elif OUT == tl.bfloat16:
        return (0x3F80 | (bit << 15)).to(tl.uint16).to(OUT, bitcast=True)
    else:
        return (0x3C00 | (bit << 15)).to(tl.uint16).to(OUT, bitcast=True)


@triton.jit(do_not_specialize=["prefix"])
def rademacher_kernel(
    out_ptr,  # OUT [total]: the batch's flat probe buffer
    offsets_ptr,  # int64 [n]: where tensor i starts in out (a multiple of 8)
    ids_ptr,  # int64 [n]: the tensor ids (positions in the optimizer's parameter list)
    numels_ptr,  # int64 [n]
    tensor_of_block_ptr,  # int32 [nblocks]
    start_of_block_ptr,  # int64 [nblocks]
    prefix,  # int32: the per-draw hash prefix, bit pattern of a uint32
    OUT: tl.constexpr,
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,
):
    i, start, n = block_extent(tensor_of_block_ptr, start_of_block_ptr, numels_ptr, BLOCK)
    # Each tensor's probes start 16-byte aligned in the flat buffer (the
    # launcher pads every tensor to a multiple of 8 elements).
    out = tl.multiple_of(out_ptr + tl.multiple_of(tl.load(offsets_ptr + i), 8), 16) + start

    # the tensor id's low word; the word index's high half, constant over a block
    key, key2 = tensor_keys(prefix.to(tl.uint32, bitcast=True), tl.load(ids_ptr + i), start >> 37)

    # A tile is [TILE // 32, 32]: one row per hash word, hashed once (each
    # thread holds 8 or 4 consecutive elements of a row, so a word is hashed
    # by 4 or 8 threads, not by 32).  Full tiles without a mask (vector
    # stores), then at most one masked tile.
    WORDS: tl.constexpr = TILE // 32
    offs = tl.arange(0, WORDS)[:, None] * 32 + tl.arange(0, 32)[None, :]
    n_full = n // TILE
    for masked in tl.static_range(2):
        if masked:
            first_tile, end_tile = n_full, tl.cdiv(n, TILE)
        else:
            first_tile, end_tile = 0, n_full
        for tile in range(first_tile, end_tile):
            at = tile * TILE
            # the word index's low half: (start + at) / 32 + row
            word = ((start + at) >> 5).to(tl.uint32) + tl.arange(0, WORDS).to(tl.uint32)
            z = _signs(hash_word(word, key, key2), TILE, OUT)
            if masked:
                tl.store(out + at + offs, z, mask=offs < n - at)
            else:
                tl.store(out + at + offs, z)


def _layout(batch) -> tuple[torch.Tensor, torch.Tensor, int, list[int]]:
    """Where each tensor's probes go in the flat buffer: ``(offsets, ids,
    total, starts)`` (device offsets and tensor ids, the buffer's length,
    the host copy of the offsets)."""
    numel = batch.numel_counts()
    room = (numel + PAD - 1) // PAD * PAD  # every tensor's probes start 16-byte aligned
    offsets = np.cumsum(room) - room
    return (
        torch.from_numpy(offsets).to(batch.device),
        torch.tensor(list(batch.index), dtype=torch.int64).to(batch.device),
        int(room.sum()),
        [int(o) for o in offsets],
    )


def launch(batch, *, prefix: int, grad_scale=None, found_inf=None) -> list[torch.Tensor]:
    """Draw the probes of every tensor of ``batch`` in one launch.

    ``prefix`` is :func:`fastmup.optim.rademacher.draw_prefix` ``(seed,
    counter)``.  Returns one contiguous tensor per param (the grads' dtype
    and shape), views into one flat buffer.  ``grad_scale`` and
    ``found_inf`` are accepted for the launcher signature and ignored.
    The block map is the batch's launch plan's (an empty tensor's program,
    if it has one, stores nothing).
    """
    plan = _common.launch_plan(batch, rademacher_kernel, BLOCK, algorithm=None, roles=None)
    offsets, ids, total, starts = plan.memo("rademacher", lambda: _layout(batch))
    flat = torch.empty(total, dtype=batch.signature.grad_dtype, device=batch.device)
    if total:
        word = prefix & 0xFFFFFFFF
        word = word - (1 << 32) if word >= (1 << 31) else word  # its int32 bit pattern
        with _common.device_guard(batch.device):
            rademacher_kernel[(plan.nblocks,)](
                out_ptr=flat,
                offsets_ptr=offsets,
                ids_ptr=ids,
                numels_ptr=plan.numels,
                tensor_of_block_ptr=plan.tensor_of_block,
                start_of_block_ptr=plan.start_of_block,
                prefix=word,
                OUT=_common.tl_dtype(batch.signature.grad_dtype),
                BLOCK=BLOCK,
                TILE=TILE,
                num_warps=NUM_WARPS,
                enable_fp_fusion=_common.FP_FUSION,
            )
        _common.LAUNCHES["rademacher"] += 1
    return [flat[start : start + g.numel()].view(g.shape) for start, g in zip(starts, batch.grads)]
