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
from .grad_norm import clip_grad
from .rounding import load_param, storage_key, storage_pointer, store_param
from ._common import (
    bias_correction,
    block_extent,
    grad_unscaling,
    lerp,
    lerp_coefficients,
    load_tile,
    program_pass,
    store_tile,
    tensor_ptr,
    unscale,
)

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
def _tile(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_sq_ptr, aux_ptr, at, left, element0, key, key2,
    scale, inv_scale, maximize, coupled_wd, decay, lerp_coeff, small, beta2, one_minus_beta2,
    amsgrad, bc2_sqrt, eps, neg_step_size,
    clip,
    PARAM: tl.constexpr, GRAD: tl.constexpr, STATE: tl.constexpr, HAS_AMSGRAD: tl.constexpr,
    HAS_CLIP: tl.constexpr, HAS_SCALE: tl.constexpr, BY_RECIPROCAL: tl.constexpr, TILE: tl.constexpr, MASKED: tl.constexpr,
    ALIGNED: tl.constexpr, STORAGE: tl.constexpr,
):
    """One tile of ``_single_tensor_adam`` (elements ``at`` on, ``left`` of them valid;
    ``element0``: the flat index of element ``at``)."""
    p = load_param(param_ptr + at, aux_ptr + at, left, PARAM, STORAGE, TILE, MASKED, ALIGNED)
    g = load_tile(grad_ptr + at, left, GRAD, TILE, MASKED, ALIGNED)
    m = load_tile(exp_avg_ptr + at, left, STATE, TILE, MASKED, ALIGNED)
    v = load_tile(exp_avg_sq_ptr + at, left, STATE, TILE, MASKED, ALIGNED)

    if HAS_CLIP:
        g = clip_grad(g, clip, GRAD)  # a deferred clip: what g.mul_(clip) would hold
    if HAS_SCALE:
        g = unscale(g, scale, inv_scale, BY_RECIPROCAL)
    g = tl.where(maximize, -g, g)
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

    # IEEE sqrt and division (tl.sqrt and "/" may be approximate on GPUs).
    denom = tl.div_rn(tl.sqrt_rn(v_hat), bc2_sqrt) + eps
    p = p + tl.div_rn(neg_step_size * m, denom)

    store_param(param_ptr + at, aux_ptr + at, p, left, element0, key, key2, PARAM, STORAGE, TILE, MASKED, ALIGNED)
    store_tile(exp_avg_ptr + at, m, left, STATE, TILE, MASKED, ALIGNED)
    store_tile(exp_avg_sq_ptr + at, v, left, STATE, TILE, MASKED, ALIGNED)


@triton.jit
def adam_kernel(
    rows_ptr,  # float64 [n, NCOLS]: per-tensor hyperparameters
    ptrs_ptr,  # int64 [4 to 6, n]: data_ptr() of the ROLES, then the storage mode's buffer
    steps_ptr,  # float32 [n]: step counts, already incremented
    numels_ptr,  # int64 [n]
    tensor_of_block_ptr,  # int32 [nblocks]
    start_of_block_ptr,  # int64 [nblocks]
    grad_scale_ptr,  # float32 [1] (read only if HAS_SCALE)
    found_inf_ptr,  # float32 [1] (read only if HAS_FOUND_INF)
    grad_clip_ptr,  # float32 [1]: deferred clip coefficient (read only if HAS_CLIP)
    ids_ptr,  # int64 [n]: tensor ids (read only for stochastic rounding)
    rounding_prefix,  # int32: the seed's part of the rounding bits' hash
    n_tensors,  # row stride of the pointer table
    NCOLS: tl.constexpr,
    # where each hyperparameter is in a row: the spec's columns
    COL_LR: tl.constexpr,
    COL_WEIGHT_DECAY: tl.constexpr,
    COL_BETA1: tl.constexpr,
    COL_BETA2: tl.constexpr,
    COL_EPS: tl.constexpr,
    COL_AMSGRAD: tl.constexpr,
    COL_MAXIMIZE: tl.constexpr,
    COL_DECOUPLED_WEIGHT_DECAY: tl.constexpr,
    PARAM: tl.constexpr,  # storage dtypes
    GRAD: tl.constexpr,
    STATE: tl.constexpr,
    HAS_AMSGRAD: tl.constexpr,  # some tensor of the batch has max_exp_avg_sq
    HAS_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    ALIGNED: tl.constexpr,  # every address is 16-byte aligned
    STORAGE: tl.constexpr,  # how the parameters are stored (fastmup.kernels.rounding)
    ROW_STORAGE: tl.constexpr,  # the pointer row of the storage mode's buffer
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,
):
    i, _, _ = block_extent(tensor_of_block_ptr, start_of_block_ptr, numels_ptr, BLOCK)

    # ---- this tensor's hyperparameters (float64) --------------------------
    row = rows_ptr + i * NCOLS
    lr = tl.load(row + COL_LR)
    wd = tl.load(row + COL_WEIGHT_DECAY)
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
    eps32 = eps.to(tl.float32)
    # AdamW multiplies p by (1 - lr·wd); Adam adds wd·p to the gradient.
    decay = tl.where(decoupled, 1.0 - lr * wd, 1.0).to(tl.float32)
    coupled_wd = tl.where(decoupled, 0.0, wd).to(tl.float32)
    lerp_coeff, small = lerp_coefficients((1.0 - beta1).to(tl.float32))  # exp_avg.lerp_(g, 1-β1)
    beta2_32 = beta2.to(tl.float32)
    one_minus_beta2 = (1.0 - beta2).to(tl.float32)
    clip = 1.0  # no deferred clip coefficient
    if HAS_CLIP:
        clip = tl.load(grad_clip_ptr)
    scale, inv_scale, exact = grad_unscaling(grad_scale_ptr, HAS_SCALE)

    # Full tiles first, without a mask, so that their accesses vectorise;
    # then at most one masked partial tile.  (static_range: compiled twice.)
    for masked in tl.static_range(2):
        i, start, n, first_tile, end_tile = program_pass(
            tensor_of_block_ptr, start_of_block_ptr, numels_ptr, found_inf_ptr, BLOCK, TILE, masked, HAS_FOUND_INF
        )
        param_ptr = tensor_ptr(ptrs_ptr, 0, n_tensors, i, PARAM, ALIGNED) + start
        grad_ptr = tensor_ptr(ptrs_ptr, 1, n_tensors, i, GRAD, ALIGNED) + start
        exp_avg_ptr = tensor_ptr(ptrs_ptr, 2, n_tensors, i, STATE, ALIGNED) + start
        exp_avg_sq_ptr = tensor_ptr(ptrs_ptr, 3, n_tensors, i, STATE, ALIGNED) + start
        max_sq_ptr = exp_avg_sq_ptr  # never touched unless HAS_AMSGRAD
        if HAS_AMSGRAD:
            # Address 0 for tensors without amsgrad: only touched when the row says so.
            max_sq_ptr = tensor_ptr(ptrs_ptr, 4, n_tensors, i, STATE, ALIGNED) + start
        aux_ptr = storage_pointer(ptrs_ptr, n_tensors, i, start, param_ptr, STORAGE, ROW_STORAGE, ALIGNED)
        key, key2 = storage_key(ids_ptr, rounding_prefix, tl.load(steps_ptr + i), i, start, STORAGE)
        # With a grad_scale: the pass for a power of two first, else the dividing one.
        for divide in tl.static_range(2):
            if exact == (divide == 0):
                for tile in range(first_tile, end_tile):
                    _tile(
                        param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_sq_ptr, aux_ptr, tile * TILE,
                        n - tile * TILE, start + tile * TILE, key, key2,
                        scale, inv_scale, maximize, coupled_wd, decay, lerp_coeff, small, beta2_32, one_minus_beta2,
                        amsgrad, bc2_sqrt, eps32, neg_step_size, clip,
                        PARAM, GRAD, STATE, HAS_AMSGRAD, HAS_CLIP, HAS_SCALE, divide == 0, TILE, masked, ALIGNED, STORAGE,
                    )


def launch(batch, *, grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None) -> None:
    """One fused Adam step for every tensor of ``batch`` (one kernel launch).

    ``grad_scale`` (1-element float32 tensor) divides the gradients;
    ``found_inf`` (1-element float32 tensor), when nonzero, makes the launch
    write nothing.  Neither is read on the host.  The batch's launch plan
    (pointer table, block map, dtype checks) is built on its first step and
    reused.
    """
    plan = _common.launch_plan(batch, adam_kernel, BLOCK, algorithm="adam", roles=ROLES)
    if plan.nblocks == 0:
        return
    spec = batch.spec
    with _common.device_guard(batch.device):
        adam_kernel[(plan.nblocks,)](
            **_common.batch_args(batch, plan, grad_scale, found_inf),
            **rounding.storage_args(batch, plan),
            steps_ptr=batch.steps,
            COL_LR=spec.col("lr"),
            COL_WEIGHT_DECAY=spec.col("weight_decay"),
            COL_BETA1=spec.col("beta1"),
            COL_BETA2=spec.col("beta2"),
            COL_EPS=spec.col("eps"),
            COL_AMSGRAD=spec.col("amsgrad"),
            COL_MAXIMIZE=spec.col("maximize"),
            COL_DECOUPLED_WEIGHT_DECAY=spec.col("decoupled_weight_decay"),
            HAS_AMSGRAD=plan.has_optional,
            BLOCK=BLOCK,
            TILE=TILE,
            num_warps=NUM_WARPS,
        )
    _common.LAUNCHES["adam"] += 1
