"""Small pieces shared by the fused optimizer kernels.

jit helpers (the common prologue and the tile I/O of every kernel):

* :func:`block_extent`: which tensor and which elements a program owns;
  :func:`skip_on_found_inf` empties it when AMP found inf/nan;
  :func:`tile_range`: its full tiles, then its partial one;
  :func:`program_pass`: the three, for one pass of a program;
  :func:`tensor_row`: the tensor, its row of hyperparameters and its
  ``lr`` and ``weight_decay``, for the scalars a program computes once.
* :func:`tensor_ptr` turns an entry of a batch's pointer table into a typed
  pointer; :func:`stream_ptr` at a program's first element,
  :func:`param_grad_ptrs` for the two rows every kernel has,
  :func:`optional_ptr` for a buffer only some tensors have.
* :func:`load_tile` / :func:`store_tile` move ``TILE`` elements of one
  buffer as an ``[TILE // 8, 8]`` fp32 tile, in the storage dtype's own
  layout (see their docstrings), with round-to-nearest-even stores.
* :func:`upcast` / :func:`downcast` convert between storage dtypes and the
  fp32 math type.
* :func:`lerp_coefficients` / :func:`lerp`: ``torch.lerp`` with a scalar weight.
* :func:`grad_unscaling` / :func:`scale_reciprocal` / :func:`unscale`: AMP's
  ``g / grad_scale``, as an exact multiplication when the scale is a power
  of two.  The kernels run their tile loops once for each case (that one
  first), so neither loop tests it per tile.
* :func:`clip_grad`: a deferred clip coefficient as the kernels apply it;
  :func:`grad_scalars` loads it with AMP's scale, once per program, and
  :func:`prepared_grad` applies both to a gradient tile.
* :func:`bias_correction` computes ``1 - β^t`` in float64 inside a kernel.

host side:

* :func:`launch_plan`: the batch's :class:`~fastmup.plan.launch.LaunchPlan`
  (pointer table, block map, dtypes, alignment, tickets: built once per
  batch by :mod:`fastmup.plan`, shared with the compiled backends), checked
  once for the kernel that reads it.  ``LAUNCHES`` counts kernel launches
  per algorithm (tests assert "one step = one launch per dtype signature"
  with it).
* :func:`run` launches an optimizer kernel with :func:`batch_args`, the
  keyword arguments every optimizer kernel takes alike (tables, columns,
  block map, dtypes, AMP scalars), and the kernel's own;
  :func:`scalar_inputs` prepares the AMP tensors (``grad_scale``,
  ``found_inf``) so a launch never syncs with the host.

Every launch passes ``enable_fp_fusion=False``: the eager reference rounds
each torch op on its own, so the compiler must not contract a multiply and an
add into an FMA; the FMAs torch does compute (``lerp``, ``addcmul``,
``add(.., alpha=)``) are written as ``tl.fma``.
"""
from __future__ import annotations

import collections
import contextlib
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from fastmup.plan.launch import LaunchPlan

__all__ = [
    "FP_FUSION",
    "LAUNCHES",
    "batch_args",
    "bias_correction",
    "block_extent",
    "check_device",
    "clip_grad",
    "device_guard",
    "downcast",
    "grad_scalars",
    "grad_unscaling",
    "launch_plan",
    "lerp",
    "lerp_coefficients",
    "load_tile",
    "optional_ptr",
    "param_grad_ptrs",
    "prepared_grad",
    "program_pass",
    "run",
    "scalar_inputs",
    "scale_reciprocal",
    "skip_on_found_inf",
    "store_tile",
    "stream_ptr",
    "tensor_ptr",
    "tensor_row",
    "tile_range",
    "tl_dtype",
    "unscale",
    "upcast",
]

#: Number of fused kernel launches so far, per algorithm ("adam", "sgd").
LAUNCHES: collections.Counter = collections.Counter()

#: the ``enable_fp_fusion`` every launch passes (module docstring)
FP_FUSION = False


def _interpreted() -> bool:
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older Triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Whether this import of the kernels runs under Triton's interpreter (the
# same choice triton.jit made for the kernels below, at the same moment).
# The interpreter truncates fp32 -> bf16 conversions, so under it the
# rounding is done on the bits; compiled code uses the GPU's conversion.
INTERPRETED = tl.constexpr(_interpreted())


# ----------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------
@triton.jit
def bias_correction(beta, t):
    """``1 - beta**t`` in float64 (``beta``: float64 scalar, ``t``: step count).

    ``beta**t = exp(t·log β)``; computed in float64 so that the later rounding
    to float32 is the only one that matters (as in the eager path, where
    Python computes it in double).  ``β = 0`` is legal (no averaging):
    ``log 0`` is avoided and ``0**t = 0`` for ``t >= 1``.
    """
    t = t.to(tl.float64)
    positive = beta > 0.0
    safe = tl.where(positive, beta, 1.0)
    power = tl.where(positive, tl.exp(t * tl.log(safe)), 0.0)
    return 1.0 - power


@triton.jit
def upcast(x, DTYPE: tl.constexpr):
    """Storage dtype -> fp32 (exact).

    bfloat16 is the top half of a float32, so the conversion is a 16-bit
    shift; written out because Triton's interpreter (the CPU test path)
    mis-converts bf16 subnormals.  On a GPU it compiles to the same shift.
    """
    if DTYPE == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def downcast(x, DTYPE: tl.constexpr):
    """fp32 -> storage dtype, rounding to nearest even (torch's ``copy_``).

    Compiled, this is the GPU's conversion (``cvt.rn.bf16x2.f32`` /
    ``cvt.rn.f16x2.f32``: two elements per instruction, round to nearest
    even, subnormals kept, nan to the canonical nan, as torch's CUDA
    conversion).  Under Triton's interpreter, which truncates fp32 -> bf16,
    bfloat16 rounding is written out on the bits (add 0x7FFF plus the lowest
    kept bit, keep the top half; nan -> 0x7FC0): the same values.
    """
    if DTYPE == tl.bfloat16 and INTERPRETED:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def tensor_ptr(ptrs_ptr, role, n_tensors, i, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Row ``role`` of the int64 pointer table, entry ``i``, as a ``DTYPE*``.

    ``ALIGNED`` (every address of the batch is a multiple of 16 bytes, checked
    when the plan is built) lets the compiler use 16-byte vector accesses.
    """
    ptr = tl.load(ptrs_ptr + role * n_tensors + i).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def stream_ptr(ptrs_ptr, role, n_tensors, i, start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Element ``start`` of tensor ``i``'s buffer in row ``role`` of the
    pointer table (:func:`tensor_ptr`)."""
    return tensor_ptr(ptrs_ptr, role, n_tensors, i, DTYPE, ALIGNED) + start


@triton.jit
def param_grad_ptrs(ptrs_ptr, n_tensors, i, start, PARAM: tl.constexpr, GRAD: tl.constexpr, ALIGNED: tl.constexpr):
    """``(param, grad)`` at element ``start`` of tensor ``i``: rows 0 and 1
    of every optimizer kernel's pointer table (its ``ROLES`` begin with
    them)."""
    return stream_ptr(ptrs_ptr, 0, n_tensors, i, start, PARAM, ALIGNED), stream_ptr(ptrs_ptr, 1, n_tensors, i, start, GRAD, ALIGNED)


@triton.jit
def optional_ptr(ptrs_ptr, role, n_tensors, i, start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, PRESENT: tl.constexpr, absent):
    """:func:`stream_ptr` of a buffer only some tensors have (amsgrad's,
    the momentum buffer, a step's HVPs): its row exists only when some
    tensor of the batch has it (``PRESENT``), else ``absent`` stands in,
    never read.  A tensor without the buffer has address 0 in the row, only
    touched when its own hyperparameters say so."""
    ptr = absent
    if PRESENT:
        ptr = stream_ptr(ptrs_ptr, role, n_tensors, i, start, DTYPE, ALIGNED)
    return ptr


@triton.jit
def block_extent(tensor_of_block_ptr, start_of_block_ptr, numels_ptr, BLOCK: tl.constexpr):
    """``(i, start, n)``: this program owns elements ``[start, start + n)`` of tensor ``i``.

    ``start`` is int64: tensors may exceed 2**31 elements.  Blocks start at
    multiples of ``BLOCK``, which the compiler needs to know to vectorise.
    """
    pid = tl.program_id(0)
    i = tl.load(tensor_of_block_ptr + pid).to(tl.int64)
    start = tl.multiple_of(tl.load(start_of_block_ptr + pid), BLOCK)
    # n <= BLOCK: int32, so that the tile loops count in 32 bits.
    n = tl.minimum(tl.load(numels_ptr + i) - start, BLOCK).to(tl.int32)
    return i, start, n


@triton.jit
def tile_range(n, TILE: tl.constexpr, MASKED: tl.constexpr):
    """The tiles of a pass over ``n`` elements: the full ones (unmasked), or
    the partial one at the end (``MASKED``: none when ``TILE`` divides ``n``)."""
    n_full = n // TILE
    if MASKED:
        return n_full, tl.cdiv(n, TILE)
    else:
        return 0, n_full


@triton.jit
def skip_on_found_inf(n, found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    """``n``, or 0 when AMP's ``found_inf`` is set: the step is skipped on
    the device, without a host sync, by giving the program nothing to do."""
    if HAS_FOUND_INF:
        n = tl.where(tl.load(found_inf_ptr) != 0.0, 0, n)
    return n


@triton.jit
def program_pass(
    tensor_of_block_ptr, start_of_block_ptr, numels_ptr, found_inf_ptr,
    BLOCK: tl.constexpr, TILE: tl.constexpr, MASKED: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
):
    """``(i, start, n, first_tile, end_tile)``: one pass of a program over its
    elements ``[start, start + n)`` of tensor ``i`` (:func:`block_extent`;
    none when AMP found inf/nan), tiles ``[first_tile, end_tile)`` of it
    (:func:`tile_range`).  Kernels make two passes, the full tiles, then the
    partial one, and read the extent again for each rather than keep it in
    registers through the first pass's loop."""
    i, start, n = block_extent(tensor_of_block_ptr, start_of_block_ptr, numels_ptr, BLOCK)
    n = skip_on_found_inf(n, found_inf_ptr, HAS_FOUND_INF)
    first_tile, end_tile = tile_range(n, TILE, MASKED)
    return i, start, n, first_tile, end_tile


@triton.jit
def tensor_row(
    tensor_of_block_ptr, start_of_block_ptr, numels_ptr, rows_ptr,
    NCOLS: tl.constexpr, COL_LR: tl.constexpr, COL_WEIGHT_DECAY: tl.constexpr, BLOCK: tl.constexpr,
):
    """``(i, row, lr, wd)``: the tensor this program steps (:func:`block_extent`),
    its row of the float64 hyperparameter table (``NCOLS`` columns; a kernel
    reads its other columns as ``tl.load(row + COL_X)``) and the two columns
    every algorithm has, ``lr`` and ``weight_decay`` (they carry the μP
    multipliers)."""
    i, _, _ = block_extent(tensor_of_block_ptr, start_of_block_ptr, numels_ptr, BLOCK)
    row = rows_ptr + i * NCOLS
    return i, row, tl.load(row + COL_LR), tl.load(row + COL_WEIGHT_DECAY)


@triton.jit
def grad_scalars(grad_clip_ptr, grad_scale_ptr, HAS_CLIP: tl.constexpr, HAS_SCALE: tl.constexpr):
    """``(clip, scale, inv_scale, exact)``: the deferred clip coefficient
    (1 without one; :func:`clip_grad`) and AMP's unscaling
    (:func:`grad_unscaling`), loaded once per program."""
    clip = 1.0
    if HAS_CLIP:
        clip = tl.load(grad_clip_ptr)
    scale, inv_scale, exact = grad_unscaling(grad_scale_ptr, HAS_SCALE)
    return clip, scale, inv_scale, exact


@triton.jit
def grad_unscaling(grad_scale_ptr, HAS_SCALE: tl.constexpr):
    """``(scale, inv_scale, exact)`` of AMP's ``grad_scale``
    (:func:`scale_reciprocal`); without one, nothing is divided and the
    kernel makes one pass (``exact``)."""
    scale, inv_scale, exact = 1.0, 1.0, True
    if HAS_SCALE:
        scale = tl.load(grad_scale_ptr)
        inv_scale, exact = scale_reciprocal(scale)
    return scale, inv_scale, exact


@triton.jit
def scale_reciprocal(scale):
    """``(1/scale, exact)`` of AMP's fp32 ``grad_scale``.

    ``exact``: ``scale`` is ± a power of two whose reciprocal is an fp32
    number (GradScaler's scales are powers of two unless its factors are
    not).  Then ``g * (1/scale)`` is ``g / scale`` bit for bit, subnormal
    results included: both are the same real number, rounded once.
    """
    bits = scale.to(tl.uint32, bitcast=True)
    exponent = (bits >> 23) & 0xFF
    exact = ((bits & 0x7FFFFF) == 0) & (exponent >= 1) & (exponent <= 254)
    return tl.div_rn(1.0, scale), exact


@triton.jit
def unscale(g, scale, inv_scale, BY_RECIPROCAL: tl.constexpr):
    """``g / scale`` (IEEE division), as a multiplication by ``inv_scale``
    when :func:`scale_reciprocal` found it exact, else :func:`divide`."""
    if BY_RECIPROCAL:
        return g * inv_scale
    else:
        return divide(g, scale)


@triton.jit
def reciprocal_split(s):
    """``(hi, lo)``, fp64: ``1/s`` as ``hi + lo`` to about ``2^-105``, for a
    scalar fp32 ``s``, with ``hi`` below ``1/|s|`` in magnitude so that
    ``lo`` is never 0 and has its sign (``s`` = ±0: ``lo`` = ±inf, ``s`` =
    ±inf: ``hi = lo = 0``, so that :func:`divide` gives the division's
    infinities and NaNs)."""
    a = tl.abs(s).to(tl.float64)
    hi = 1.0 / a
    # one ulp less where the rounded reciprocal is not below 1/a (the residual
    # 1 - hi·a is exact in fp64: hi·a is within 2^-52 of 1)
    hi = tl.where(tl.fma(-hi, a, 1.0) <= 0.0, (hi.to(tl.int64, bitcast=True) - 1).to(tl.float64, bitcast=True), hi)
    lo = tl.fma(-hi, a, 1.0) * hi
    hi = tl.where(a == 0.0, float("inf"), tl.where(a == float("inf"), 0.0, hi))
    lo = tl.where(a == 0.0, float("inf"), tl.where(a == float("inf"), 0.0, lo))
    sign = tl.where((s.to(tl.uint32, bitcast=True) >> 31) != 0, -1.0, 1.0).to(tl.float64)  # -0 too
    return hi * sign, lo * sign


@triton.jit
def divide(x, s):
    """``x / s`` for fp32 ``x`` and a scalar ``s``, rounded as IEEE fp32
    division rounds it, through fp64 with the reciprocal formed once
    (:func:`reciprocal_split`).

    ``q = RN64(x·hi + RN64(x·lo))`` is within ``2^-104·|x/s|`` of ``x/s``.
    No fp32 rounding boundary (a midpoint of two fp32 neighbours) lies that
    close to a quotient of two fp32 numbers without being it: ``x - m·s`` is
    a multiple of ``2^-47`` times ``m·s``'s binade, so a quotient that is not
    a midpoint ``m`` is at least ``2^-49`` (relative; ``2^-174`` absolute
    below 2^-126) away from one, and rounding ``q`` to fp32 rounds ``x/s``.
    A quotient is a midpoint only below 2^-126, where the grid is fixed
    (``x = m·s`` needs more significant bits than ``x`` has above it); then
    ``q`` is ``m`` itself (fp64 holds it, and the error is far below half its
    ulp), which the conversion rounds to even as the division does (``hi``
    alone, within ``2^-53``, would round it to either side).  ``x·hi`` and
    ``x·lo`` have one sign and ``lo`` is not 0, so infinities, NaNs and
    signed zeros come out as the division's.  Four instructions per element where ``tl.div_rn`` takes
    ten, four more in its slow-path call, which the loops then keep."""
    hi, lo = reciprocal_split(s)
    x64 = x.to(tl.float64)
    return tl.fma(x64, hi, x64 * lo).to(tl.float32)


@triton.jit
def clip_grad(g, clip, GRAD: tl.constexpr):
    """A deferred clip coefficient applied where an update kernel reads its
    gradient: ``round_to_GRAD(g · clip)``, the value ``g.mul_(clip)`` would
    have stored in place (one fp32 product, rounded once to the gradient's
    dtype), so a clipped step is the in-place clip followed by the step."""
    return upcast(downcast(g * clip, GRAD), GRAD)


@triton.jit
def prepared_grad(
    g, clip, scale, inv_scale,
    GRAD: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_SCALE: tl.constexpr, BY_RECIPROCAL: tl.constexpr,
):
    """The gradient tile ``g`` as an update reads it: the deferred clip
    (:func:`clip_grad`), then AMP's ``g / grad_scale`` (:func:`unscale`),
    each only where the launch has it (:func:`grad_scalars`)."""
    if HAS_CLIP:
        g = clip_grad(g, clip, GRAD)
    if HAS_SCALE:
        g = unscale(g, scale, inv_scale, BY_RECIPROCAL)
    return g


@triton.jit
def lerp_coefficients(w):
    """``(coeff, small)`` of ``torch.lerp(a, b, w)`` for an fp32 scalar weight:
    torch computes ``a + w·(b-a)`` for ``w < 0.5``, else ``b - (1-w)·(b-a)``,
    both ``fma(coeff, b-a, base)`` (``w - 1`` is exact for ``w >= 0.5``)."""
    small = w < 0.5
    return tl.where(small, w, w - 1.0), small


@triton.jit
def lerp(a, b, coeff, small):
    """``torch.lerp(a, b, w)`` from :func:`lerp_coefficients` ``(w)``."""
    return tl.fma(coeff, b - a, tl.where(small, a, b))


# Tiles are [TILE // 8, 8]: each row is 8 consecutive elements, held by one
# thread.  A 16-bit buffer moves a row with one 16-byte access, a 32-bit one
# with two (the row's halves, joined in registers).  Every buffer of a
# kernel, whatever its dtype, so maps elements to threads alike and no tile
# is converted between layouts (through shared memory) on the way from
# loads to stores.  Without 16-byte alignment no access can be wider than
# an element: then tiles are flat, one layout for every dtype as well.
@triton.jit
def flat_offsets(TILE: tl.constexpr):
    """The element offsets of a flat (misaligned) tile: ``[0, TILE)`` in an
    order that keeps every warp access contiguous and lets a thread reach
    all its elements from one address.

    Over 4 warps a ``[TILE]`` tile gives thread ``t`` the positions
    ``t + 128·k``; here position ``lane + 32·warp + 128·k`` holds offset
    ``lane + 32·k + 32·(TILE/128)·warp``: the warp's 32 lanes still access
    32 consecutive elements, and a thread's elements are ``T + 32·k`` for
    one per-thread ``T``, so each stream takes one address per thread and
    immediate offsets.  (With plain ``t + 128·k`` the compiler, which knows
    ``t < 1024``, folds the last one, ``(t & 127) | 896``, into ``t | 896``:
    a second address per stream, advanced every iteration.)  Any order is
    correct: every stream and the rounding bits use the same offsets."""
    tl.static_assert(TILE % 128 == 0)
    REGS: tl.constexpr = TILE // 128
    a = tl.arange(0, TILE)
    return (a & 31) | (((a >> 7) & (REGS - 1)) << 5) | (((a >> 5) & 3) * (32 * REGS))


@triton.jit
def flat_pair_offsets(TILE: tl.constexpr):
    """``flat_offsets(TILE) >> 1`` built from the same bit fields, so that a
    compiled kernel sees every element's value as its thread's one with a
    constant ``or``-ed in (the stochastic rounding bits' pair index)."""
    tl.static_assert(TILE % 128 == 0)
    REGS: tl.constexpr = TILE // 128
    a = tl.arange(0, TILE)
    return ((a & 31) >> 1) | (((a >> 7) & (REGS - 1)) << 4) | (((a >> 5) & 3) * (16 * REGS))


@triton.jit
def _row_offsets(WIDTH: tl.constexpr, ROWS: tl.constexpr):
    return tl.arange(0, ROWS)[:, None] * 8 + tl.arange(0, WIDTH)[None, :]


@triton.jit
def _load(ptr, offs, limit, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + offs, mask=offs < limit, other=0.0)
    else:
        return tl.load(ptr + offs)


@triton.jit
def _store(ptr, offs, x, limit, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, x, mask=offs < limit)
    else:
        tl.store(ptr + offs, x)


@triton.jit
def load_tile(ptr, limit, DTYPE: tl.constexpr, TILE: tl.constexpr, MASKED: tl.constexpr, ALIGNED: tl.constexpr):
    """Elements ``[0, TILE)`` of ``ptr`` as an fp32 tile, ``[TILE // 8, 8]``
    (``ALIGNED``) or ``[TILE]`` (``MASKED``: those below ``limit``, others 0)."""
    ROWS: tl.constexpr = TILE // 8
    if not ALIGNED:
        return upcast(_load(ptr, flat_offsets(TILE), limit, MASKED), DTYPE)
    elif DTYPE.primitive_bitwidth == 16:
        return upcast(_load(ptr, _row_offsets(8, ROWS), limit, MASKED), DTYPE)
    else:
        offs = _row_offsets(4, ROWS)
        lo = upcast(_load(ptr, offs, limit, MASKED), DTYPE)
        hi = upcast(_load(ptr + 4, offs, limit - 4, MASKED), DTYPE)
        return tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (ROWS, 8))


@triton.jit
def store_tile(ptr, x, limit, DTYPE: tl.constexpr, TILE: tl.constexpr, MASKED: tl.constexpr, ALIGNED: tl.constexpr):
    """Store the fp32 tile ``x`` of :func:`load_tile` to elements ``[0, TILE)``
    of ``ptr`` (``MASKED``: those below ``limit``), rounded once to ``DTYPE``."""
    ROWS: tl.constexpr = TILE // 8
    if not ALIGNED:
        _store(ptr, flat_offsets(TILE), downcast(x, DTYPE), limit, MASKED)
    elif DTYPE.primitive_bitwidth == 16:
        _store(ptr, _row_offsets(8, ROWS), downcast(x, DTYPE), limit, MASKED)
    else:
        lo, hi = tl.split(tl.permute(tl.reshape(x, (ROWS, 2, 4)), (0, 2, 1)))
        offs = _row_offsets(4, ROWS)
        _store(ptr, offs, downcast(lo, DTYPE), limit, MASKED)
        _store(ptr + 4, offs, downcast(hi, DTYPE), limit - 4, MASKED)


# ----------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------
_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


def tl_dtype(dtype: torch.dtype):
    """The Triton element type for a torch storage dtype."""
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(
            f"backend='triton' supports float32, bfloat16 and float16 tensors, got {dtype} "
            "(use backend='eager' for other dtypes)"
        ) from None


def check_device(kernel, device: torch.device) -> None:
    """The kernels follow raw ``data_ptr()`` values: under ``TRITON_INTERPRET=1``
    they run on the host and can only follow CPU addresses; compiled, they
    need CUDA tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = isinstance(kernel, InterpretedFunction)
    if interpreted and device.type != "cpu":
        raise RuntimeError(
            f"fastmup.kernels were imported with TRITON_INTERPRET=1 (Triton's CPU interpreter), which cannot "
            f"step tensors on {device}; unset TRITON_INTERPRET before importing fastmup.kernels"
        )
    if not interpreted and device.type != "cuda":
        raise RuntimeError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests), got {device}")


def launch_plan(batch, kernel, block: int, *, algorithm: Optional[str], roles: Optional[Sequence[str]]) -> LaunchPlan:
    """The batch's :class:`~fastmup.plan.launch.LaunchPlan` for chunks of
    ``block`` elements, as ``kernel`` reads it.

    ``algorithm``: the ``kernel`` name the batch's spec must have (None: any
    batch, e.g. the probes of one).  ``roles``: the rows of the pointer
    table the kernel reads, in its order; the plan's must be a prefix of
    them (the optional buffer's row exists only when some tensor has it).
    None: the kernel reads no pointer table.
    Checked once per plan, with the device (:func:`check_device`)."""
    spec = batch.spec
    if algorithm is not None and (spec is None or spec.kernel != algorithm):
        raise ValueError(
            f"fastmup.kernels.{algorithm} steps batches of the {algorithm!r} algorithm, got one of "
            f"{None if spec is None else spec.name!r}"
        )
    plan = batch.launch_plan(block)
    plan.memo(("triton", kernel.__name__), lambda: _check_plan(plan, kernel, batch.device, roles))
    return plan


def _check_plan(plan: LaunchPlan, kernel, device: torch.device, roles: Optional[Sequence[str]]) -> None:
    check_device(kernel, device)
    # the storage mode's buffer (master weight, remainder), if any, comes last
    own = plan.roles[:-1] if plan.storage_role is not None else plan.roles
    if roles is not None and tuple(roles[: len(own)]) != own:
        raise ValueError(f"{kernel.__name__} reads pointer rows {roles}, the launch plan has {plan.roles}")
    for dtype in (plan.param_dtype, plan.grad_dtype, plan.state_dtype):
        tl_dtype(dtype)  # raises for a dtype no kernel takes


def run(kernel, batch, plan: LaunchPlan, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor], *,
        aligned: Optional[bool] = None, **kwargs) -> None:
    """Launch an optimizer ``kernel`` over ``plan``'s block map, one program
    per entry, with :func:`batch_args` and the kernel's own keyword
    arguments ``kwargs``, and count it in ``LAUNCHES`` under the batch's
    algorithm.

    ``grad_scale`` (1-element float32 tensor) divides the gradients;
    ``found_inf`` (1-element float32 tensor), when nonzero, makes the launch
    write nothing.  Neither is read on the host: the launch never syncs."""
    with device_guard(batch.device):
        kernel[(plan.nblocks,)](**batch_args(batch, plan, grad_scale, found_inf, aligned=aligned), **kwargs)
    LAUNCHES[batch.spec.kernel] += 1


def batch_args(batch, plan: LaunchPlan, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor], *, aligned: Optional[bool] = None) -> dict:
    """The keyword arguments every optimizer kernel takes the same way:

    * ``rows_ptr``: the batch's hyperparameter table, float64 ``[n, NCOLS]``
      (μP applied), and ``COL_<NAME>``: where each column of the batch's
      spec is in a row, one constexpr per column;
    * ``steps_ptr``: the step counts (the scalar state ``step``), float32
      ``[n]``: already advanced for this step, unless the algorithm
      advances its scalar state in the launch itself (ESGD-M);
    * ``ptrs_ptr``: the plan's pointer table, int64 ``[rows, n_tensors]``
      (``data_ptr()`` of each role, in the plan's order);
    * the block map: ``numels_ptr`` (int64 ``[n]``), ``tensor_of_block_ptr``
      (int32 ``[nblocks]``), ``start_of_block_ptr`` (int64 ``[nblocks]``);
    * ``PARAM``, ``GRAD``, ``STATE``: the storage dtypes; ``ALIGNED``: every
      address is 16-byte aligned (``aligned``: the plan's unless given);
    * AMP's ``grad_scale_ptr`` and ``found_inf_ptr`` (float32 ``[1]``, read
      only if ``HAS_SCALE`` / ``HAS_FOUND_INF``) and the deferred clip
      coefficient ``grad_clip_ptr`` (float32 ``[1]``, read only if
      ``HAS_CLIP``);
    * ``enable_fp_fusion``: the compile option every launch passes (the
      module docstring).
    """
    scale, inf = scalar_inputs(batch, grad_scale, found_inf)
    clip = batch.grad_clip  # a clip coefficient deferred into this step (MuOptimizer.clip_grad_norm_)
    if clip is not None and (clip.device != batch.device or clip.dtype != torch.float32 or clip.numel() != 1):
        raise ValueError(f"fastmup: a batch's grad_clip must be one float32 element on {batch.device}")
    columns = {"COL_" + name.upper(): col for col, name in enumerate(batch.spec.columns)}
    return dict(
        **columns,
        rows_ptr=batch.device_rows(),
        ptrs_ptr=plan.pointers,
        numels_ptr=plan.numels,
        tensor_of_block_ptr=plan.tensor_of_block,
        start_of_block_ptr=plan.start_of_block,
        grad_scale_ptr=scale,
        found_inf_ptr=inf,
        grad_clip_ptr=scale if clip is None else clip,  # a placeholder never read without HAS_CLIP
        steps_ptr=batch.steps,
        n_tensors=plan.n_tensors,
        NCOLS=len(batch.spec.columns),
        PARAM=tl_dtype(plan.param_dtype),
        GRAD=tl_dtype(plan.grad_dtype),
        STATE=tl_dtype(plan.state_dtype),
        HAS_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        HAS_CLIP=clip is not None,
        ALIGNED=plan.aligned if aligned is None else aligned,
        enable_fp_fusion=FP_FUSION,
    )


def scalar_inputs(batch, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]):
    """``(grad_scale, found_inf)`` as float32 tensors on the batch's device.

    ``None`` becomes a placeholder (the batch's ``steps``, never read: the
    kernel's HAS_SCALE / HAS_FOUND_INF constexprs are then False).  Tensors
    already on the right device and dtype are passed as they are, so the
    usual GradScaler case costs no copy and no host sync.
    """

    def prepare(x: Optional[torch.Tensor]) -> torch.Tensor:
        if x is None:
            return batch.steps
        if x.device != batch.device or x.dtype != torch.float32:
            x = x.to(batch.device, torch.float32, non_blocking=True)
        return x

    return prepare(grad_scale), prepare(found_inf)


def device_guard(device: torch.device):
    """Make ``device`` current for the launch: Triton launches on the current CUDA device."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()
