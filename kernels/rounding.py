"""jit helpers of the parameter storage modes: stochastic rounding and the bf16 + remainder split.

The Triton versions of :mod:`fastmup.optim.precision` (whose docstring
gives the math) and of ``csrc/rounding.h``, bit for bit:

* :func:`rounding_key` / :func:`rounding_bits`: the 16 random bits of an
  element, half of one mix of its pair's index under the key of the
  counter-based hash of :mod:`fastmup.optim.rademacher`
  (:mod:`fastmup.kernels.counter_hash`) for (seed, step, tensor);
* :func:`stochastic_round`: fp32 -> bf16/fp16 with those bits;
* :func:`remainder_split` / :func:`remainder_join`: an fp32 master weight as
  a bf16 parameter (nearest, ties away from zero) and an int16 remainder,
  and back, exactly;
* :func:`nearest_away_bf16`: the bf16 copy of an fp32 master weight;
* :func:`load_param` / :func:`store_param`: a kernel's parameter tile under
  each storage mode (with :func:`storage_pointer`, :func:`storage_key` and,
  on the host, :func:`storage_args` for the launch).

All of it is uint32 arithmetic on bit patterns (uint32 multiplication wraps
modulo ``2**32``, as the torch path's masked int64 arithmetic), and the
float operations of the fp16 subnormal case are exact, so every backend
gets the same bits.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import _load, _row_offsets, _store, flat_offsets, flat_pair_offsets, load_tile, store_tile, tensor_ptr
from .counter_hash import absorb, mix32, mix32_rest

__all__ = [
    "STORAGE_CODES",
    "load_param",
    "nearest_away_bf16",
    "remainder_join",
    "remainder_split",
    "rounding_bits",
    "rounding_key",
    "stochastic_round",
    "storage_args",
    "storage_key",
    "storage_pointer",
    "store_param",
    "tile_offsets",
]

# the counter's high word of the rounding draws is 1 << 31 (fastmup.optim.precision.ROUNDING_COUNTER)
COUNTER_HI_SHIFT = tl.constexpr(31)


@triton.jit
def rounding_key(prefix, step, tensor_id, element_hi):
    """The key (uint32) of one tensor's rounding bits at ``step``.

    ``prefix``: ``fastmup.optim.precision.seed_prefix`` (the batch's
    ``rounding_prefix``) as an int32 bit pattern; ``step``: the tensor's
    step count (float32, integral); ``tensor_id``: int64 (its low word is
    used); ``element_hi``: the high word of the element indices (int64)."""
    h = absorb(prefix.to(tl.uint32, bitcast=True), step.to(tl.uint32))
    h = absorb(h, tl.full((), 1, tl.uint32) << COUNTER_HI_SHIFT)
    h = absorb(h, tensor_id.to(tl.uint32))
    return absorb(h, element_hi.to(tl.uint32))


@triton.jit
def rounding_bits(element_lo, key):
    """The 16 random bits (uint32 in ``[0, 2^16)``) of the elements whose
    indices have low words ``element_lo`` (uint32): the low half of their
    pair's word for even elements, the high half for odd ones."""
    w = mix32((element_lo >> 1) ^ key)
    return (w >> ((element_lo & 1) << 4)) & 0xFFFF


@triton.jit
def _stochastic_round_word(x, w, DTYPE: tl.constexpr):
    """:func:`stochastic_round` with ``r = w >> 16`` (``w``: a uint32 hash word).

    bf16: ``(u + r) >> 16`` as in the reference.  fp16: the reference's cases
    in one sum, ``(s + r) >> 16``, where ``s`` holds ``|x|`` as the fp16 bits
    it truncates to (high half) and the dropped fraction of an ulp times 2^16
    (low half):

    * fp16 normals and overflow: ``s = 8·(bits(min(|x|, 2^16)) - bits(2^-15))``,
      the fp32 pattern on fp16's exponent bias with its 13 dropped bits at the
      top of the low half: ``(s + r) >> 16 = (a + (r >> 3) - (112 << 23)) >> 13``,
      and ``0x7C00`` (inf) from 2^16 on;
    * fp16 subnormals: ``s = floor(|x|·2^40) = floor(q)·2^16 + floor(2^16·frac(q))``
      with ``q = |x|·2^24`` (exact), the reference's ``floor(q) + ((r + frac) >> 16)``;
    * NaN: ``s = 0x7E00·2^16``;

    and the sign in bit 31 (the sum never carries into it), which the shift
    brings to bit 15.  This takes fewer instructions than the reference's
    form, for the same bits; the final shift becomes part of the byte
    selection that packs the halves."""
    u = x.to(tl.uint32, bitcast=True)
    if DTYPE == tl.bfloat16:
        # (u + r) >> 16 as the high word of u·2^16 + w (no wrap for NaN either)
        b = (((u.to(tl.uint64) << 16) + w.to(tl.uint64)) >> 32).to(tl.uint32)
        b = tl.where(x != x, 0x7FC0, b)
        return b.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        ax = tl.abs(x)
        # min(|x|, 2^16) keeping NaN, whose bits (any NaN's) then clamp to those of
        # 1.5·2^16: 8·(that - bits(2^-15)) is NaN's 0x7E00·2^16.  (The product wraps
        # modulo 2^32 only where the subnormal case is taken.)
        m = tl.minimum(ax, 65536.0, propagate_nan=tl.PropagateNan.ALL).to(tl.uint32, bitcast=True)
        normal = (tl.minimum(m, 0x47C00000) << 3) + 0x40000000
        # (minimum is minnum here: no conversion sees a value out of range, inf or NaN)
        sub = (tl.minimum(ax, 6.103515625e-05) * 1099511627776.0).to(tl.uint32)
        s = tl.where(ax < 6.103515625e-05, sub, normal) | (u & 0x80000000)
        return ((s + (w >> 16)) >> 16).to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def stochastic_round(x, r, DTYPE: tl.constexpr):
    """fp32 ``x`` stochastically rounded to ``DTYPE`` (bfloat16 or float16)
    with the 16-bit random integers ``r`` (uint32)."""
    return _stochastic_round_word(x, r << 16, DTYPE)


@triton.jit
def _param_bits(u):
    hi = u >> 16
    c = (u >> 15) & 1
    m = hi & 0x7FFF
    s = hi & 0x8000
    b = (hi + c) & 0xFFFF
    carry = c != 0
    b = tl.where(carry & (m == 0x7FFF), s | 0x7F81, b)  # quiet NaNs that would carry into -0 / +0
    b = tl.where(carry & (m == 0x7F80), s ^ 0x8000, b)  # the signalling NaNs that take that zero
    return b


@triton.jit
def nearest_away_bf16(x):
    """fp32 ``x`` rounded to bf16, nearest with ties away from zero (the
    parameter of the remainder split, and the copy of an fp32 master)."""
    return _param_bits(x.to(tl.uint32, bitcast=True)).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def remainder_split(x):
    """``(param, rem)``: bfloat16 and int16 that hold fp32 ``x`` exactly."""
    u = x.to(tl.uint32, bitcast=True)
    b = _param_bits(u).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    rem = (u & 0xFFFF).to(tl.uint16).to(tl.int16, bitcast=True)
    return b, rem


@triton.jit
def remainder_join(param, rem):
    """The fp32 value held by bfloat16 ``param`` and int16 ``rem``."""
    b = param.to(tl.uint16, bitcast=True).to(tl.uint32)
    lo = rem.to(tl.uint16, bitcast=True).to(tl.uint32)
    c = lo >> 15
    m = b & 0x7FFF
    s = b & 0x8000
    hi = (b - c) & 0xFFFF
    carry = c != 0
    hi = tl.where(carry & (m == 0x7F81), s | 0x7FFF, hi)
    hi = tl.where(carry & (m == 0), (s ^ 0x8000) | 0x7F80, hi)
    return ((hi << 16) | lo).to(tl.float32, bitcast=True)


# ----------------------------------------------------------------------
# a kernel's parameter tile I/O under each storage mode
# ----------------------------------------------------------------------
# The storage modes as constexprs (fastmup.plan.spec.ParamStorage).
NEAREST = tl.constexpr(0)
STOCHASTIC = tl.constexpr(1)
MASTER = tl.constexpr(2)
REMAINDER = tl.constexpr(3)
#: ParamStorage name -> the STORAGE constexpr of the kernels
STORAGE_CODES = {"nearest": 0, "stochastic": 1, "master": 2, "remainder": 3}


@triton.jit
def tile_offsets(TILE: tl.constexpr, ALIGNED: tl.constexpr):
    """The element offsets of a tile of :func:`~fastmup.kernels._common.load_tile`,
    in its shape (``[TILE // 8, 8]`` when ``ALIGNED``, else ``[TILE]``)."""
    if ALIGNED:
        return _row_offsets(8, TILE // 8)
    else:
        return flat_offsets(TILE)


@triton.jit
def _tile_pairs(TILE: tl.constexpr, ALIGNED: tl.constexpr):
    """``tile_offsets(TILE, ALIGNED) >> 1``: each element's pair within the tile."""
    if ALIGNED:
        return tl.arange(0, TILE // 8)[:, None] * 4 + (tl.arange(0, 8) >> 1)[None, :]
    else:
        return flat_pair_offsets(TILE)


@triton.jit
def _load_raw(ptr, limit, TILE: tl.constexpr, MASKED: tl.constexpr, ALIGNED: tl.constexpr):
    return _load(ptr, tile_offsets(TILE, ALIGNED), limit, MASKED)


@triton.jit
def _store_raw(ptr, x, limit, TILE: tl.constexpr, MASKED: tl.constexpr, ALIGNED: tl.constexpr):
    _store(ptr, tile_offsets(TILE, ALIGNED), x, limit, MASKED)


@triton.jit
def storage_pointer(ptrs_ptr, n_tensors, i, start, fallback, STORAGE: tl.constexpr, ROW: tl.constexpr, ALIGNED: tl.constexpr):
    """The pointer to tensor ``i``'s storage buffer (the fp32 master or the
    int16 remainder) at element ``start``; ``fallback`` for modes without one."""
    if STORAGE == MASTER:
        return tensor_ptr(ptrs_ptr, ROW, n_tensors, i, tl.float32, ALIGNED) + start
    elif STORAGE == REMAINDER:
        return tensor_ptr(ptrs_ptr, ROW, n_tensors, i, tl.int16, ALIGNED) + start
    else:
        return fallback


@triton.jit
def storage_key(ids_ptr, rounding_prefix, step, i, start, STORAGE: tl.constexpr):
    """The key of tensor ``i``'s rounding bits at ``step`` (zero, never
    read, for the modes without stochastic rounding)."""
    if STORAGE == STOCHASTIC:
        return rounding_key(rounding_prefix, step, tl.load(ids_ptr + i), start >> 32)
    else:
        return tl.full((), 0, tl.uint32)


@triton.jit
def load_param(param_ptr, aux_ptr, limit, PARAM: tl.constexpr, STORAGE: tl.constexpr, TILE: tl.constexpr,
               MASKED: tl.constexpr, ALIGNED: tl.constexpr):
    """The fp32 tile an update starts from: the parameter, its fp32 master
    (``aux_ptr``), or the parameter joined with its remainder (``aux_ptr``)."""
    if STORAGE == MASTER:
        return load_tile(aux_ptr, limit, tl.float32, TILE, MASKED, ALIGNED)
    elif STORAGE == REMAINDER:
        b = _load_raw(param_ptr, limit, TILE, MASKED, ALIGNED)
        rem = _load_raw(aux_ptr, limit, TILE, MASKED, ALIGNED)
        return remainder_join(b, rem)
    else:
        return load_tile(param_ptr, limit, PARAM, TILE, MASKED, ALIGNED)


@triton.jit
def store_param(param_ptr, aux_ptr, x, limit, element0, key, PARAM: tl.constexpr, STORAGE: tl.constexpr,
                TILE: tl.constexpr, MASKED: tl.constexpr, ALIGNED: tl.constexpr):
    """Store the update's fp32 tile ``x`` as the storage mode keeps it
    (``element0``: the flat index of the tile's first element, a multiple
    of ``TILE``, a power of two at most 2^16)."""
    if STORAGE == STOCHASTIC:
        tl.static_assert(TILE <= 65536 and (TILE & (TILE - 1)) == 0)
        # rounding_bits of element0 + offs, whose low word is element0 ^ offs
        # (element0 a multiple of TILE): its pair is (element0 >> 1) ^ (offs >> 1),
        # so the mix's first xorshift is a scalar's, (k ^ j) >> 16 = k >> 16
        # for j = offs >> 1 < 2^15
        offs = tile_offsets(TILE, ALIGNED).to(tl.uint32)
        k = (element0.to(tl.uint32) >> 1) ^ key
        z = mix32_rest((k ^ (k >> 16)) ^ _tile_pairs(TILE, ALIGNED).to(tl.uint32))
        # the form _stochastic_round_word reads (r = w >> 16): the low half moved up for even elements
        w = tl.where((offs & 1) != 0, z, z << 16)
        _store_raw(param_ptr, _stochastic_round_word(x, w, PARAM), limit, TILE, MASKED, ALIGNED)
    elif STORAGE == MASTER:
        store_tile(aux_ptr, x, limit, tl.float32, TILE, MASKED, ALIGNED)
        if PARAM == tl.bfloat16:  # rounded as the remainder split rounds (bit-identical modes)
            _store_raw(param_ptr, nearest_away_bf16(x), limit, TILE, MASKED, ALIGNED)
        else:
            store_tile(param_ptr, x, limit, PARAM, TILE, MASKED, ALIGNED)
    elif STORAGE == REMAINDER:
        b, rem = remainder_split(x)
        _store_raw(param_ptr, b, limit, TILE, MASKED, ALIGNED)
        _store_raw(aux_ptr, rem, limit, TILE, MASKED, ALIGNED)
    else:
        store_tile(param_ptr, x, limit, PARAM, TILE, MASKED, ALIGNED)


def storage_args(batch, plan) -> dict:
    """The keyword arguments of the storage mode every optimizer kernel
    takes alike: ``STORAGE`` (its constexpr code), ``ROW_STORAGE`` (the
    pointer row of its buffer), ``ids_ptr`` (the tensor ids: read only for
    stochastic rounding) and ``rounding_prefix`` (the seed's part of the
    hash, as an int32 bit pattern)."""
    prefix = batch.rounding_prefix & 0xFFFFFFFF
    return dict(
        ids_ptr=plan.tensor_ids if plan.tensor_ids is not None else plan.numels,
        rounding_prefix=prefix - (1 << 32) if prefix >= (1 << 31) else prefix,
        STORAGE=STORAGE_CODES[plan.storage],
        ROW_STORAGE=plan.row(plan.storage_role) if plan.storage_role is not None else 0,
    )
