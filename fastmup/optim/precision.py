"""Low-precision parameters without lost updates: the rounding of the stored parameter.

An update is computed in fp32; how its result ``x`` becomes the stored
bf16/fp16 parameter decides whether small updates survive.  At large width
μP scales a hidden matrix's Adam update by ``1/m_in``, and most of them are
then below half a bf16 ulp of the weight: round-to-nearest throws them away
every step.  Each parameter has one *storage mode*, chosen by its param
group's ``stochastic_rounding`` and ``master_weights`` and its dtype:

============  =====================================================  ==============
mode          the stored parameter                                     extra state
============  =====================================================  ==============
nearest       ``x`` rounded to nearest even (torch's ``.to(dtype)``)   none
stochastic    ``x`` rounded up with probability = the dropped          none
              fraction of an ulp: ``E[p] = x`` (bf16, fp16)
master        ``x`` kept in an fp32 ``master_weight``, the parameter   4 B / element
              is its rounded copy (bf16, fp16)
remainder     bf16 ``p`` and an int16 ``weight_remainder`` that        2 B / element
              together hold the fp32 ``x`` exactly (bf16 only)
============  =====================================================  ==============

The bits (ALGORITHMS.md §7; ``u`` is the fp32 bit pattern of ``x``)
--------------------------------------------------------------------
*Stochastic rounding to bf16*: ``b = (u + r) >> 16`` with ``r`` uniform in
``[0, 2^16)``: rounded away from zero with probability ``(u & 0xFFFF) / 2^16``,
exactly the dropped fraction (bf16 subnormals too: they are fp32
subnormals truncated); inf stays inf, NaN becomes torch's quiet NaN 0x7FC0.

*Stochastic rounding to fp16*: the same rule on fp16's layout: with ``t``
the fp16 value of ``x`` truncated toward zero, ``F = floor(2^16 · (|x| - |t|)
/ ulp16(t))``, the result is ``t`` moved one ulp away from zero iff ``r + F
>= 2^16``.  For fp16 normals ``(|x| - |t|) / ulp`` has 13 bits and the
probability is exact; in fp16's subnormal range it is rounded down to a
multiple of 2^-16 (a bias below 2^-16 ulp).  Overflow rounds to inf with
the probability of the carry, NaN becomes ``sign | 0x7E00`` (torch's).

*16-bit remainders (bf16)*: ``hi = u >> 16``, ``lo = u & 0xFFFF``, ``c =
lo >> 15``.  The parameter is ``b = hi + c`` (round to nearest, ties away
from zero) and the remainder is ``lo`` itself, read as a signed int16: ``u
= (b << 16) + rem``.  Round-to-nearest-*even* cannot be recovered from 16
bits (a tie below an odd ``hi`` and an exact even ``hi + 1`` give the same
pair), so this mode and ``master_weights="fp32"`` both round bf16
parameters to nearest with ties away, and their parameter trajectories are
bit-identical.  Two NaN corner cases are swapped so that every quiet NaN
master shows as a NaN parameter (``b = hi + c`` would carry
0x7FFF8000..0x7FFFFFFF, among them CUDA's canonical NaN, into ``-0``): a NaN
whose ``hi`` has all mantissa bits set and ``c = 1`` takes ``b = sign |
0x7F81``, and the signalling NaNs ``sign | 0x7F80_8000 .. sign | 0x7F80_FFFF``
take the freed zero of the other sign.  A counting argument shows that some
NaN bit patterns must map to non-NaN parameters in any exact 16+16 split;
these signalling NaNs (which no arithmetic produces) and those of
``sign | 0x7F80_0001 .. sign | 0x7F80_7FFF`` (shown as inf) are the ones
chosen.  Every one of the 2^32 fp32 patterns round-trips
(``tests/ext/test_rounding.py`` checks all of them).

The random bits
---------------
``r`` comes from the counter-based hash of :mod:`fastmup.optim.rademacher`:
its per-tensor key of the draw ``(seed, ROUNDING_COUNTER | step)``, then one
mix per *pair* of elements, 16 bits each (element ``2k`` takes the low half
of word ``k``, element ``2k + 1`` the high half)::

    key = tensor_key(draw_prefix(seed, ROUNDING_COUNTER | step), tensor_id, element >> 32)
    r = (mix32(((element & 0xFFFFFFFF) >> 1) ^ key) >> (16 * (element & 1))) & 0xFFFF

One mix per 32 bits, where the probes use two: the rounding bits are drawn
for every parameter element at every step, in loops that should run at
memory speed, and a single mix of the keyed counter is already uniform and
uncorrelated between neighbouring elements and steps as far as rounding can
tell (lag correlations of the round-up decisions within noise, measured on
2^22 elements).

``seed`` is the optimizer's ``rounding_seed``, ``step`` the tensor's step
count after this step's increment, ``tensor_id`` its position in the
optimizer's parameter list (group order) and ``element`` its flat index (in
the local shard under FSDP2).  The counter's top bit keeps these draws
apart from ESGD-M's probe draws.  Every backend computes the same bits, and
a resumed run (the seed and step counts are in the state dict) draws them
again.

This module holds the plain-torch versions (the eager reference); the
Triton helpers are in ``fastmup.kernels.rounding`` and the C++ ones in
``csrc/rounding.h``.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from fastmup.optim import rademacher
from fastmup.plan.spec import MASTER_BUFFER, REMAINDER_BUFFER, STORAGE_BUFFERS, ParamStorage

__all__ = [
    "MASTER_WEIGHTS",
    "ROUNDING_COUNTER",
    "check_precision_options",
    "check_param_storage",
    "decode_remainder",
    "encode_remainder",
    "param_storage",
    "rounding_bits",
    "rounding_prefix",
    "seed_prefix",
    "round_nearest_away_bf16",
    "stochastic_round",
    "strip_master_weights",
]

#: the values of a param group's ``master_weights``
MASTER_WEIGHTS = (None, "fp32", "remainder")
#: the top bit of the hash counter marks the rounding draws (ESGD-M's probe counters never reach it)
ROUNDING_COUNTER = 1 << 63

_MASK32 = rademacher.MASK32
_CHUNK = 1 << 22  # elements per torch chunk: bounds the int64 temporaries


# ----------------------------------------------------------------------
# options and modes
# ----------------------------------------------------------------------
def check_precision_options(group: Mapping[str, Any]) -> None:
    """``stochastic_rounding`` a bool, ``master_weights`` one of
    :data:`MASTER_WEIGHTS`, not both (``ValueError`` naming the option)."""
    sr = group.get("stochastic_rounding", False)
    mw = group.get("master_weights", None)
    if not isinstance(sr, bool):
        raise ValueError(f"Invalid stochastic_rounding={sr!r}: must be True or False")
    if mw not in MASTER_WEIGHTS:
        raise ValueError(f"Invalid master_weights={mw!r}: must be None, 'fp32' or 'remainder'")
    if sr and mw is not None:
        raise ValueError(
            f"stochastic_rounding=True and master_weights={mw!r} exclude each other: master weights already "
            "keep every update (choose one)"
        )


def param_storage(dtype: torch.dtype, group: Mapping[str, Any]) -> str:
    """The storage mode (:class:`~fastmup.plan.spec.ParamStorage`) of a
    parameter of ``dtype`` in ``group``.  ``master_weights="fp32"`` on an
    fp32 or fp64 parameter is ``nearest``: the parameter is its own master.
    Call :func:`check_param_storage` first for the combinations that raise."""
    if group.get("stochastic_rounding", False):
        return ParamStorage.STOCHASTIC
    mw = group.get("master_weights", None)
    if mw == "remainder":
        return ParamStorage.REMAINDER
    if mw == "fp32" and dtype in (torch.bfloat16, torch.float16):
        return ParamStorage.MASTER
    return ParamStorage.NEAREST


def check_param_storage(dtype: torch.dtype, group: Mapping[str, Any], where: str) -> None:
    """Raise ``ValueError`` (naming ``where`` and the option) when ``group``'s
    options cannot apply to a parameter of ``dtype``."""
    if group.get("stochastic_rounding", False) and dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"stochastic_rounding=True needs bfloat16 or float16 parameters; {where} is {dtype} "
            "(put it in a param group with stochastic_rounding=False)"
        )
    if group.get("master_weights", None) == "remainder" and dtype != torch.bfloat16:
        raise ValueError(
            f"master_weights='remainder' needs bfloat16 parameters (the remainder is the low half of an fp32); "
            f"{where} is {dtype} (use master_weights='fp32' for float16, or a param group without master weights)"
        )


def strip_master_weights(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of a fastmup optimizer's ``state_dict`` without the master
    weights and remainders, for ``torch.optim`` (which would keep them
    unused, cast to the parameters' dtype).  The parameters then continue
    from their bf16/fp16 values: the low bits of the masters are lost."""
    out = dict(state_dict)
    out["state"] = {
        k: {key: v for key, v in s.items() if key not in (MASTER_BUFFER, REMAINDER_BUFFER)}
        for k, s in state_dict["state"].items()
    }
    return out


# ----------------------------------------------------------------------
# bit patterns in torch integer ops (int64 holding unsigned values)
# ----------------------------------------------------------------------
def _bits32(x: Tensor) -> Tensor:
    """The fp32 bit pattern of ``x`` as int64 in ``[0, 2^32)``."""
    return x.contiguous().view(torch.int32).to(torch.int64) & _MASK32


def _from_bits16(b: Tensor, dtype: torch.dtype) -> Tensor:
    """A tensor of ``dtype`` (16-bit) from int64 bit patterns in ``[0, 2^16)``."""
    return (b - ((b >> 15) << 16)).to(torch.int16).view(dtype)


def _bits16(t: Tensor) -> Tensor:
    """The 16-bit pattern of a bf16/fp16/int16 tensor as int64 in ``[0, 2^16)``."""
    if t.dtype != torch.int16:
        t = t.contiguous().view(torch.int16)
    return t.to(torch.int64) & 0xFFFF


def seed_prefix(seed: int) -> int:
    """The seed's part of the hash prefix, ``absorb(absorb(IV, seed_lo),
    seed_hi)`` (uint32): computed once on the host, the kernels absorb the
    step and the rest (``TensorBatch.rounding_prefix``)."""
    seed &= (1 << 64) - 1
    return rademacher._absorb(rademacher._absorb(rademacher.IV, seed & _MASK32), seed >> 32)


def rounding_prefix(seed: int, step: int) -> int:
    """The hash prefix of the rounding draws of step ``step``."""
    return rademacher.draw_prefix(seed, ROUNDING_COUNTER | (int(step) & ((1 << 63) - 1)))


def rounding_bits(seed: int, step: int, tensor_id: int, numel: int, device=None, *, start: int = 0) -> Tensor:
    """int64 ``[numel]``: the 16 random bits ``r`` of elements ``start ..
    start + numel - 1`` of tensor ``tensor_id`` at step ``step``."""
    prefix = rounding_prefix(seed, step)
    out = torch.empty(numel, dtype=torch.int64, device=device)
    done = 0
    while done < numel:
        first = start + done
        # chunks that never straddle a multiple of 2^32 elements (the key's element_hi)
        count = min(_CHUNK - (first % _CHUNK), numel - done)
        key = rademacher.tensor_key(prefix, tensor_id, first >> 32)
        lo = torch.arange(first & _MASK32, (first & _MASK32) + count, dtype=torch.int64, device=device)
        words = rademacher._mix32_((lo >> 1).bitwise_xor_(key))
        out[done : done + count] = (words >> ((lo & 1) << 4)) & 0xFFFF
        done += count
    return out


def stochastic_round(x: Tensor, dtype: torch.dtype, r: Tensor) -> Tensor:
    """``x`` (fp32) stochastically rounded to ``dtype`` (bf16 or fp16) with the
    16-bit random integers ``r`` (int64, ``x``'s element count)."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round takes float32 values, got {x.dtype}")
    shape = x.shape
    flat = x.reshape(-1)
    u = _bits32(flat)
    r = r.reshape(-1)
    if dtype == torch.bfloat16:
        b = (u + r) >> 16
        b = torch.where(torch.isnan(flat), 0x7FC0, b)
        return _from_bits16(b, dtype).view(shape)
    if dtype != torch.float16:
        raise TypeError(f"stochastic rounding is to bfloat16 or float16, not {dtype}")
    a = u & 0x7FFFFFFF
    sign = (u >> 16) & 0x8000
    # fp16 normals (and overflow): truncate the 13 dropped bits after adding 13 random ones
    t = a + (r >> 3)
    normal = torch.where(t >= 0x47800000, 0x7C00, (t - (112 << 23)) >> 13)
    # fp16 subnormals: in units of 2^-24 (exact scalings and subtraction)
    # (0 outside that range, so that no conversion sees inf or nan)
    q = torch.where(a < 0x38800000, flat.abs(), 0.0) * 16777216.0
    whole = torch.floor(q)
    frac = ((q - whole) * 65536.0).to(torch.int64)
    sub = whole.to(torch.int64) + ((r + frac) >> 16)
    h = torch.where(a >= 0x38800000, normal, sub)
    h = torch.where(a > 0x7F800000, 0x7E00, h) | sign
    return _from_bits16(h, dtype).view(shape)


def _encode_bits(u: Tensor) -> Tensor:
    """The bf16 pattern ``b`` of the remainder split of fp32 patterns ``u``."""
    hi, c = u >> 16, (u >> 15) & 1
    m, s = hi & 0x7FFF, hi & 0x8000
    b = (hi + c) & 0xFFFF
    carry = c == 1
    b = torch.where(carry & (m == 0x7FFF), s | 0x7F81, b)  # quiet NaNs that would carry into -0 / +0
    return torch.where(carry & (m == 0x7F80), s ^ 0x8000, b)  # the signalling NaNs that take that zero


def round_nearest_away_bf16(x: Tensor) -> Tensor:
    """``x`` (fp32) rounded to bf16, nearest with ties away from zero: the
    parameter of the remainder split (and of ``master_weights="fp32"``)."""
    return _from_bits16(_encode_bits(_bits32(x.reshape(-1))), torch.bfloat16).view(x.shape)


def encode_remainder(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(b, rem)``: bf16 and int16 tensors that hold fp32 ``x`` exactly."""
    u = _bits32(x.reshape(-1))
    b = _from_bits16(_encode_bits(u), torch.bfloat16).view(x.shape)
    return b, _from_bits16(u & 0xFFFF, torch.int16).view(x.shape)


def decode_remainder(b: Tensor, rem: Tensor) -> Tensor:
    """The fp32 value held by bf16 ``b`` and int16 ``rem`` (:func:`encode_remainder`)."""
    bb, lo = _bits16(b.reshape(-1)), _bits16(rem.reshape(-1))
    c = lo >> 15
    m, s = bb & 0x7FFF, bb & 0x8000
    hi = (bb - c) & 0xFFFF
    carry = c == 1
    hi = torch.where(carry & (m == 0x7F81), s | 0x7FFF, hi)
    hi = torch.where(carry & (m == 0), (s ^ 0x8000) | 0x7F80, hi)
    u = (hi << 16) | lo
    return (u - ((u >> 31) << 32)).to(torch.int32).view(torch.float32).view(b.shape)


# ----------------------------------------------------------------------
# the reference's parameter load and store
# ----------------------------------------------------------------------
def load_param(p: Tensor, mode: str, state: Mapping[str, Tensor], dtype: torch.dtype) -> Tensor:
    """The value an update starts from, in the math ``dtype``.  May be the
    stored tensor itself (fp32 master, fp32 parameter): updated in place."""
    if mode == ParamStorage.MASTER:
        return state[MASTER_BUFFER].to(dtype)
    if mode == ParamStorage.REMAINDER:
        return decode_remainder(p, state[REMAINDER_BUFFER]).to(dtype)
    return p.to(dtype)


def store_param(
    p: Tensor,
    value: Tensor,
    mode: str,
    state: Mapping[str, Tensor],
    *,
    seed: int = 0,
    step: int = 0,
    tensor_id: int = 0,
) -> None:
    """Write the update's result ``value`` back as mode ``mode`` stores it
    (``value`` may be the tensor :func:`load_param` returned)."""
    if mode == ParamStorage.NEAREST:
        if value is not p:
            p.copy_(value)
        return
    x = value if value.dtype == torch.float32 else value.to(torch.float32)
    if mode == ParamStorage.STOCHASTIC:
        r = rounding_bits(seed, step, tensor_id, p.numel(), p.device)
        p.copy_(stochastic_round(x.reshape(p.shape), p.dtype, r))
    elif mode == ParamStorage.MASTER:
        master = state[MASTER_BUFFER]
        if x is not master:
            master.copy_(x)
        p.copy_(round_nearest_away_bf16(master) if p.dtype == torch.bfloat16 else master)
    elif mode == ParamStorage.REMAINDER:
        b, rem = encode_remainder(x)
        p.copy_(b.view(p.shape))
        state[REMAINDER_BUFFER].copy_(rem.view(p.shape))
    else:
        raise ValueError(f"unknown parameter storage mode {mode!r}")


def init_storage_state(p: Tensor, mode: str, state: dict, *, like: Optional[Tensor] = None) -> None:
    """Create the extra state of ``mode`` from the parameter's value (a
    master equal to it, a zero remainder), and drop that of other modes."""
    like = p if like is None else like
    if mode == ParamStorage.MASTER:
        m = state.get(MASTER_BUFFER)
        if m is None or m.dtype != torch.float32 or m.shape != p.shape:
            state[MASTER_BUFFER] = like.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    else:
        state.pop(MASTER_BUFFER, None)
    if mode == ParamStorage.REMAINDER:
        r = state.get(REMAINDER_BUFFER)
        if r is None or r.dtype != torch.int16 or r.shape != p.shape:
            state[REMAINDER_BUFFER] = torch.zeros_like(like, dtype=torch.int16, memory_format=torch.contiguous_format)
    else:
        state.pop(REMAINDER_BUFFER, None)


def _storage_state(batch, i: int) -> dict[str, Tensor]:
    mode = batch.signature.storage
    if mode in STORAGE_BUFFERS:
        key = STORAGE_BUFFERS[mode][0]
        return {key: batch.state[key][i]}
    return {}


def load_batch_param(batch, i: int, dtype: torch.dtype) -> Tensor:
    """:func:`load_param` for tensor ``i`` of a :class:`~fastmup.plan.batch.TensorBatch`."""
    return load_param(batch.params[i], batch.signature.storage, _storage_state(batch, i), dtype)


def store_batch_param(batch, i: int, value: Tensor, step: float) -> None:
    """:func:`store_param` for tensor ``i`` of a batch at (advanced) step count ``step``."""
    store_param(
        batch.params[i],
        value,
        batch.signature.storage,
        _storage_state(batch, i),
        seed=batch.rounding_seed,
        step=int(step),
        tensor_id=int(batch.index[i]),
    )
