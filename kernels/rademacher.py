"""Fused multi-tensor Rademacher probes: one launch fills the probes of a whole batch.

Entry ``e`` of tensor ``i`` of a :class:`TensorBatch` gets a bit of the
counter-based hash of :mod:`fastmup.optim.rademacher`::

    bits = H(seed, counter, tensor_id = batch.index[i], word = e >> 5)
    z    = -1 if bit (e & 31) of bits is set, else +1

The per-draw prefix ``H(seed, counter)`` is computed on the host (four mixes,
once per draw) and passed as one 32-bit word; each program derives its
tensor's key from it (two mixes), then each element hashes its word (two
mixes: integer ops are nearly free in this store-bound kernel, so the 32
elements of a word recompute it rather than share it).  All of it is uint32
arithmetic, which wraps modulo ``2**32`` exactly like the torch path's
masked int64 arithmetic, so both backends draw identical probes.

The probes of a batch are written into one flat buffer of the grads' dtype
(tensor ``i`` at ``offsets[i]``); the caller hands out per-tensor views as the
``grad_outputs`` of the Hessian-vector product.  Layout as in
:mod:`fastmup.kernels.adam`: one program per ``BLOCK`` elements of one tensor
through the batch's block map.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from . import _common

__all__ = ["rademacher_kernel", "launch", "BLOCK", "TILE"]

# A store-only kernel: 4096 elements per program (2**32 words = 2**37 elements
# is a multiple of it, so a block never straddles the word index's high half).
BLOCK = 4096
TILE = 1024
NUM_WARPS = 4

# The hash constants of fastmup.optim.rademacher (constexpr: read inside the jit functions).
GOLDEN = tl.constexpr(0x9E3779B9)
MUL1 = tl.constexpr(0x21F0AAAD)
MUL2 = tl.constexpr(0x735A2D97)


@triton.jit
def mix32(x):
    """The 32-bit mixing bijection of fastmup.optim.rademacher.mix32 (x: uint32)."""
    x = x ^ (x >> 16)
    x = x * MUL1  # uint32: wraps modulo 2**32
    x = x ^ (x >> 15)
    x = x * MUL2
    x = x ^ (x >> 15)
    return x


@triton.jit(do_not_specialize=["prefix"])
def rademacher_kernel(
    out_ptr,  # OUT [total]: the batch's flat probe buffer
    offsets_ptr,  # int64 [n]: where tensor i starts in out
    ids_ptr,  # int64 [n]: the tensor ids (positions in the optimizer's parameter list)
    numels_ptr,  # int64 [n]
    tensor_of_block_ptr,  # int32 [nblocks]
    start_of_block_ptr,  # int64 [nblocks]
    prefix,  # int32: the per-draw hash prefix, bit pattern of a uint32
    OUT: tl.constexpr,
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    i = tl.load(tensor_of_block_ptr + pid).to(tl.int64)
    start = tl.load(start_of_block_ptr + pid)
    end = tl.minimum(start + BLOCK, tl.load(numels_ptr + i))
    base = tl.load(offsets_ptr + i)

    h = prefix.to(tl.uint32, bitcast=True)
    tid = tl.load(ids_ptr + i).to(tl.uint32)  # int64 -> uint32 keeps the low word
    key = mix32(h ^ tid)
    key = mix32(key ^ (start >> 37).to(tl.uint32))  # the word index's high half, constant over a block
    key2 = mix32(key ^ GOLDEN)

    for off in range(start, end, TILE):
        # int64 offsets (the interpreter's loop variable is a Python int, which
        # would otherwise take the int32 type of tl.arange).
        offs = off + tl.arange(0, TILE).to(tl.int64)
        mask = offs < end
        word = (offs >> 5).to(tl.uint32)  # the word index's low half
        bits = mix32(mix32(word ^ key) ^ key2)
        bit = (bits >> (offs & 31).to(tl.uint32)) & 1
        z = tl.where(bit != 0, -1.0, 1.0)
        tl.store(out_ptr + base + offs, z.to(OUT), mask=mask)


class _Plan(NamedTuple):
    offsets: torch.Tensor
    ids: torch.Tensor
    numels: torch.Tensor
    tensor_of_block: torch.Tensor
    start_of_block: torch.Tensor
    nblocks: int
    total: int
    out: object


def _build_plan(batch) -> _Plan:
    sig = batch.signature
    _common.check_device(rademacher_kernel, sig.device)
    numel = np.array([p.numel() for p in batch.params], dtype=np.int64)
    offsets = np.cumsum(numel) - numel
    tensor_of_block, start_of_block, nblocks = batch.block_map(BLOCK)
    return _Plan(
        offsets=torch.from_numpy(offsets).to(sig.device),
        ids=torch.tensor(list(batch.index), dtype=torch.int64).to(sig.device),
        numels=batch.numels(),
        tensor_of_block=tensor_of_block,
        start_of_block=start_of_block,
        nblocks=nblocks,
        total=int(numel.sum()),
        out=_common.tl_dtype(sig.grad_dtype),
    )


def launch(batch, *, prefix: int, grad_scale=None, found_inf=None) -> list[torch.Tensor]:
    """Draw the probes of every tensor of ``batch`` in one launch.

    ``prefix`` is :func:`fastmup.optim.rademacher.draw_prefix` ``(seed,
    counter)``.  Returns one contiguous tensor per param (the grads' dtype
    and shape), views into one flat buffer.  ``grad_scale`` and
    ``found_inf`` are accepted for the launcher signature and ignored.
    """
    plan = _common.plan_for(batch, "rademacher", lambda: _build_plan(batch))
    flat = torch.empty(plan.total, dtype=batch.signature.grad_dtype, device=batch.device)
    if plan.nblocks:
        word = prefix & 0xFFFFFFFF
        word = word - (1 << 32) if word >= (1 << 31) else word  # its int32 bit pattern
        with _common.device_guard(batch.device):
            rademacher_kernel[(plan.nblocks,)](
                flat,
                plan.offsets,
                plan.ids,
                plan.numels,
                plan.tensor_of_block,
                plan.start_of_block,
                word,
                OUT=plan.out,
                BLOCK=BLOCK,
                TILE=TILE,
                num_warps=NUM_WARPS,
            )
        _common.LAUNCHES["rademacher"] += 1
    views, offset = [], 0
    for g in batch.grads:
        n = g.numel()
        views.append(flat[offset : offset + n].view(g.shape))
        offset += n
    return views
