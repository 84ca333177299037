"""Fused multi-tensor Adam / AdamW: one launch steps a whole :class:`TensorBatch`.

For tensor ``i`` of the batch, with its row of the hyperparameter table
(μP multipliers already applied to ``lr`` and ``wd``) and ``t`` its step
count (already advanced for this step)::

    g   = ±grad / grad_scale                     (sign: maximize)
    g   = g + wd·p                               (coupled weight decay, Adam)
    p   = p·(1 - lr·wd)                          (decoupled weight decay, AdamW)
    m   = lerp(m, g, 1-β1)
    v   = β2·v + (1-β2)·g²
    v̂   = max(v̂, v) if amsgrad else v
    p   = p - lr/(1-β1^t) · m / (sqrt(v̂)/sqrt(1-β2^t) + eps)

This is exactly ``fastmup.optim.adam._single_tensor_adam``: fp32 math on
values loaded from any storage dtype, one rounding per stored tensor, and the
scalars (bias corrections, step size, decay factor) computed in float64 and
rounded once to fp32, as Python computes them in double before torch casts
them to the tensor's math type.  Operation for operation it follows torch's
kernels: ``add(.., alpha=)``, ``lerp`` and ``addcmul`` end in a fused
multiply-add there (CPU vector code and nvcc-contracted CUDA code alike), so
they are ``tl.fma`` here; ``addcdiv`` divides last and is not fused; square
root and division are IEEE-rounded (``sqrt_rn`` / ``div_rn``), not the
GPU's approximate defaults.

Layout of the launch: one program per chunk of ``BLOCK`` elements of one
tensor.  The batch's block map says which tensor and which offset a program
owns; the program reads that tensor's row and step, turns them into fp32
scalars once, then streams its chunk in tiles of ``TILE`` elements.  All
groups, multipliers and per-tensor flags (amsgrad, maximize, decoupled decay)
are table values, not constexprs, so one compiled kernel and one launch cover
every tensor of a dtype signature.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common, rounding
from .rounding import load_param, storage_key, storage_pointer, store_param
from ._common import bias_correction, grad_scalars, lerp, lerp_coefficients, load_tile, optional_ptr, param_grad_ptrs
from ._common import prepared_grad, program_pass, store_tile, stream_ptr, tensor_row

__all__ = ["adam_kernel", "launch", "BLOCK", "TILE"]

# Elements per program.  4096 amortises the per-program prologue (row loads,
# two float64 exp/log for the bias corrections) over 40-80 KB of traffic
# (5 streams × 4096 × 2-4 B), while a 1M-parameter model still yields 256
# programs for an H100's 132 SMs; there is no cap on the grid: big models
# simply get more programs.
BLOCK = 4096
# Elements per inner iteration: 1024 over 4 warps is one row of 8 per thread
# per array (one 16-byte access in bf16/fp16, two in fp32; see
# _common.load_tile), which keeps Adam's ~6 live arrays in registers.
TILE = 1024
NUM_WARPS = 4

# The rows of the pointer table the kernel reads: the batch's spec's buffers
# (the last, amsgrad's, only when some tensor of the batch has it).
ROLES = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@triton.jit
def _div_bias_correction(x, d, inv_d):
    """``tl.div_rn(x, d)``, the IEEE quotient, for ``x = sqrt_rn(v̂)`` and
    ``d = bc2_sqrt`` (the program's scalar), given ``inv_d = div_rn(1, d)``.

    ``q = x·inv_d`` corrected once by its exact remainder ``x - d·q`` (an
    fma): four instructions a element, where a division takes ten (the GPU
    refines the reciprocal and branches to a slow path per element).  It is
    the correctly rounded quotient on the domain: ``x`` in ``{±0, +inf, NaN}
    ∪ [2^-75, 2^64]`` (square roots of fp32 values), ``d`` in ``[2^-27, 1]``
    (square roots of ``1 - β2^t`` for ``β2`` in ``[0, 1)``, rounded from
    float64) or 0 (``t = 0``).  There the quotient, the product and the
    remainder stay normal and exact where they must, so the significands
    alone decide; before its rounding the corrected quotient is
    ``x/d + (q - x/d)·(1 - d·inv_d)``, which can round differently from
    ``x/d`` only if a rounding boundary lies within that error of ``x/d``:
    a few dozen pairs of significands per ``d`` at most, found by a congruence,
    and none of them rounds differently (checked for every fp32
    significand of ``d``; tests/kernels/test_adam.py checks a sample).  The
    maximum sends the NaN remainder of ``x = inf`` to -inf, so that
    ``inf / d`` stays inf; for any other remainder it is the identity."""
    q = x * inv_d
    r = tl.maximum(tl.fma(d, q, -x), float("-inf"))  # -(x - d·q), exact
    return tl.fma(-r, inv_d, q)


# How a tile loop applies the weight decay (the DECAY constexpr of _tile):
# per program, by a branch inside the loop; or fixed for the loop, the
# decoupled factor or the coupled add (see _runs_decay_loop).
DECAY_IN_LOOP = tl.constexpr(0)
DECAY_FACTOR = tl.constexpr(1)
DECAY_COUPLED = tl.constexpr(2)


@triton.jit
def _runs_decay_loop(coupled_wd, DECAY: tl.constexpr, STORAGE: tl.constexpr, HAS_SCALE: tl.constexpr,
                     ALIGNED: tl.constexpr):
    """Whether the program runs the tile loop compiled for ``DECAY``.

    With stochastic rounding on misaligned buffers and no grad_scale, the
    two decays are two loops, the coupled add where ``coupled_wd != 0``,
    else the decoupled factor: one instruction a element where a branch in
    the loop takes two (both, predicated), which the scalar accesses leave
    no room for.  Otherwise one loop (aligned, the issue is well within its
    budget; with a grad_scale the kernel has two passes already: four loops
    spill registers on sm_80 with amsgrad)."""
    if STORAGE == rounding.STOCHASTIC and not HAS_SCALE and not ALIGNED:
        return (coupled_wd != 0.0) == (DECAY == DECAY_COUPLED)
    else:
        return DECAY == DECAY_IN_LOOP


@triton.jit
def _tile(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_sq_ptr, aux_ptr, at, left, element0, key,
    clip, scale, inv_scale, maximize, coupled_wd, decay, lerp_coeff, small, beta2, one_minus_beta2,
    amsgrad, bc2_sqrt, inv_bc2_sqrt, eps, neg_step_size,
    PARAM: tl.constexpr, GRAD: tl.constexpr, STATE: tl.constexpr, STORAGE: tl.constexpr, HAS_AMSGRAD: tl.constexpr,
    HAS_CLIP: tl.constexpr, HAS_SCALE: tl.constexpr, BY_RECIPROCAL: tl.constexpr,
    TILE: tl.constexpr, MASKED: tl.constexpr, ALIGNED: tl.constexpr, DECAY: tl.constexpr,
):
    """One tile of ``_single_tensor_adam``: elements ``at`` on, ``left`` of
    them valid, ``element0`` the flat index of element ``at`` (the rounding
    bits' counter of a stochastically rounded parameter)."""
    p = load_param(param_ptr + at, aux_ptr + at, left, PARAM, STORAGE, TILE, MASKED, ALIGNED)
    g = load_tile(grad_ptr + at, left, GRAD, TILE, MASKED, ALIGNED)
    m = load_tile(exp_avg_ptr + at, left, STATE, TILE, MASKED, ALIGNED)
    v = load_tile(exp_avg_sq_ptr + at, left, STATE, TILE, MASKED, ALIGNED)

    # the deferred clip (what g.mul_(clip) would hold), then / grad_scale
    g = prepared_grad(g, clip, scale, inv_scale, GRAD, HAS_CLIP, HAS_SCALE, BY_RECIPROCAL)
    g = tl.where(maximize, -g, g)
    if STORAGE == rounding.STOCHASTIC:
        # One of the two decays, uniform over the program (DECAY): the
        # coupled add only when wd != 0, else the decoupled factor (1 for
        # Adam: p·1 = p, nan stays nan; with coupled_wd != 0 the factor is 1,
        # so skipping it changes nothing).  The same values as below, in
        # fewer instructions after the rounding's hash (elsewhere the
        # branches cost registers: spills on sm_80 with amsgrad and AMP).
        if DECAY == DECAY_COUPLED:
            g = tl.fma(coupled_wd, p, g)
        elif DECAY == DECAY_FACTOR:
            p = p * decay
        elif coupled_wd != 0.0:
            g = tl.fma(coupled_wd, p, g)
        else:
            p = p * decay
    else:
        # Skip the add when wd = 0 so that 0·inf does not turn a finite grad into nan.
        g = tl.where(coupled_wd != 0.0, tl.fma(coupled_wd, p, g), g)
        p = p * decay

    m = lerp(m, g, lerp_coeff, small)
    v = tl.fma(one_minus_beta2 * g, g, v * beta2)
    v_hat = v
    if HAS_AMSGRAD:
        if amsgrad:  # uniform over the program: a branch, not a mask
            v_max = load_tile(max_sq_ptr + at, left, STATE, TILE, MASKED, ALIGNED)
            v_hat = tl.maximum(v_max, v, propagate_nan=tl.PropagateNan.ALL)  # as torch.maximum
            store_tile(max_sq_ptr + at, v_hat, left, STATE, TILE, MASKED, ALIGNED)

    # IEEE sqrt and division (tl.sqrt and "/" may be approximate on GPUs).  The
    # partial tile, once per program, keeps the plain division (the same bits)
    # in the storage modes without stochastic rounding: there its loop has no
    # register left for the reciprocal (fp32 with amsgrad and AMP would spill
    # on sm_80); with stochastic rounding the division's slow-path calls would
    # spill instead (fp32 state, sm_90).
    if MASKED and STORAGE != rounding.STOCHASTIC:
        denom = tl.div_rn(tl.sqrt_rn(v_hat), bc2_sqrt) + eps
    else:
        denom = _div_bias_correction(tl.sqrt_rn(v_hat), bc2_sqrt, inv_bc2_sqrt) + eps
    p = p + tl.div_rn(neg_step_size * m, denom)

    store_param(param_ptr + at, aux_ptr + at, p, left, element0, key, PARAM, STORAGE, TILE, MASKED, ALIGNED)
    store_tile(exp_avg_ptr + at, m, left, STATE, TILE, MASKED, ALIGNED)
    store_tile(exp_avg_sq_ptr + at, v, left, STATE, TILE, MASKED, ALIGNED)


@triton.jit
def adam_kernel(
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,
    # where each hyperparameter is in a row: the spec's columns
    COL_LR: tl.constexpr,
    COL_WEIGHT_DECAY: tl.constexpr,
    COL_BETA1: tl.constexpr,
    COL_BETA2: tl.constexpr,
    COL_EPS: tl.constexpr,
    COL_AMSGRAD: tl.constexpr,
    COL_MAXIMIZE: tl.constexpr,
    COL_DECOUPLED_WEIGHT_DECAY: tl.constexpr,
    HAS_AMSGRAD: tl.constexpr,  # some tensor of the batch has max_exp_avg_sq (pointer row 4)
    # how the parameters are stored (rounding.storage_args)
    ids_ptr, rounding_prefix, STORAGE: tl.constexpr, ROW_STORAGE: tl.constexpr,
    # the batch (_common.batch_args): tables, block map, step counts, AMP and clip scalars, dtypes
    rows_ptr, ptrs_ptr, numels_ptr, tensor_of_block_ptr, start_of_block_ptr, n_tensors, steps_ptr,
    grad_scale_ptr, found_inf_ptr, grad_clip_ptr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_CLIP: tl.constexpr,
    NCOLS: tl.constexpr, PARAM: tl.constexpr, GRAD: tl.constexpr, STATE: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Adam's step of the program's ``BLOCK`` elements (the module
    docstring); the scalars are computed once, from the float64 row and the
    step count, then each tile is :func:`_tile`."""
    i, row, lr, wd = tensor_row(
        tensor_of_block_ptr, start_of_block_ptr, numels_ptr, rows_ptr, NCOLS, COL_LR, COL_WEIGHT_DECAY, BLOCK
    )
    beta1 = tl.load(row + COL_BETA1)
    beta2 = tl.load(row + COL_BETA2)
    eps = tl.load(row + COL_EPS)
    amsgrad = tl.load(row + COL_AMSGRAD) != 0.0
    maximize = tl.load(row + COL_MAXIMIZE) != 0.0
    decoupled = tl.load(row + COL_DECOUPLED_WEIGHT_DECAY) != 0.0
    t = tl.load(steps_ptr + i)

    # ---- fp32 scalars, each rounded once from float64 ----------------------
    neg_step_size = (-lr / bias_correction(beta1, t)).to(tl.float32)
    bc2_sqrt = tl.sqrt(bias_correction(beta2, t)).to(tl.float32)
    inv_bc2_sqrt = tl.div_rn(1.0, bc2_sqrt)  # for _div_bias_correction
    eps32 = eps.to(tl.float32)
    # AdamW multiplies p by (1 - lr·wd); Adam adds wd·p to the gradient.
    decay = tl.where(decoupled, 1.0 - lr * wd, 1.0).to(tl.float32)
    coupled_wd = tl.where(decoupled, 0.0, wd).to(tl.float32)
    lerp_coeff, small = lerp_coefficients((1.0 - beta1).to(tl.float32))  # exp_avg.lerp_(g, 1-β1)
    beta2_32 = beta2.to(tl.float32)
    one_minus_beta2 = (1.0 - beta2).to(tl.float32)
    clip, scale, inv_scale, exact = grad_scalars(grad_clip_ptr, grad_scale_ptr, HAS_CLIP, HAS_SCALE)

    # Full tiles first, without a mask, so that their accesses vectorise;
    # then at most one masked partial tile.  (static_range: compiled twice.)
    for masked in tl.static_range(2):
        i, start, n, first_tile, end_tile = program_pass(
            tensor_of_block_ptr, start_of_block_ptr, numels_ptr, found_inf_ptr, BLOCK, TILE, masked, HAS_FOUND_INF
        )
        param_ptr, grad_ptr = param_grad_ptrs(ptrs_ptr, n_tensors, i, start, PARAM, GRAD, ALIGNED)
        exp_avg_ptr = stream_ptr(ptrs_ptr, 2, n_tensors, i, start, STATE, ALIGNED)
        exp_avg_sq_ptr = stream_ptr(ptrs_ptr, 3, n_tensors, i, start, STATE, ALIGNED)
        max_sq_ptr = optional_ptr(ptrs_ptr, 4, n_tensors, i, start, STATE, ALIGNED, HAS_AMSGRAD, exp_avg_sq_ptr)
        aux_ptr = storage_pointer(ptrs_ptr, n_tensors, i, start, param_ptr, STORAGE, ROW_STORAGE, ALIGNED)
        key = storage_key(ids_ptr, rounding_prefix, tl.load(steps_ptr + i), i, start, STORAGE)
        # With a grad_scale: the pass for a power of two first, else the dividing one.
        for divide in tl.static_range(2):
            if exact == (divide == 0):
                for decay_form in tl.static_range(3):
                    if _runs_decay_loop(coupled_wd, decay_form, STORAGE, HAS_SCALE, ALIGNED):
                        for tile in range(first_tile, end_tile):
                            _tile(
                                param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_sq_ptr, aux_ptr,
                                tile * TILE, n - tile * TILE, start + tile * TILE, key,
                                clip, scale, inv_scale, maximize, coupled_wd, decay, lerp_coeff, small, beta2_32, one_minus_beta2,
                                amsgrad, bc2_sqrt, inv_bc2_sqrt, eps32, neg_step_size,
                                PARAM, GRAD, STATE, STORAGE, HAS_AMSGRAD, HAS_CLIP, HAS_SCALE, divide == 0, TILE, masked, ALIGNED,
                                decay_form,
                            )


def launch(batch, *, grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None) -> None:
    """One fused Adam step for every tensor of ``batch``, in one kernel
    launch (:func:`fastmup.kernels._common.run`: ``grad_scale`` and
    ``found_inf`` as there).  The batch's launch plan (pointer table, block
    map, dtype checks) is built on its first step and reused."""
    plan = _common.launch_plan(batch, adam_kernel, BLOCK, algorithm="adam", roles=ROLES)
    if plan.nblocks:
        _common.run(
            adam_kernel, batch, plan, grad_scale, found_inf, **rounding.storage_args(batch, plan),
            HAS_AMSGRAD=plan.has_optional, BLOCK=BLOCK, TILE=TILE, num_warps=NUM_WARPS,
        )
