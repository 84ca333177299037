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

from . import _common
from ._common import bias_correction, downcast, tensor_ptr, upcast

__all__ = ["adam_kernel", "launch", "BLOCK", "TILE"]

# Elements per program.  4096 amortises the per-program prologue (row loads,
# two float64 exp/log for the bias corrections) over 40-80 KB of traffic
# (5 streams × 4096 × 2-4 B), while a 1M-parameter model still yields 256
# programs for an H100's 132 SMs; there is no cap on the grid: big models
# simply get more programs.
BLOCK = 4096
# Elements per inner iteration: 1024 over 4 warps is 8 per thread per array
# (two 16-byte accesses in fp32), which keeps Adam's ~6 live arrays in registers.
TILE = 1024
NUM_WARPS = 4

# Order of the columns of ``batch.rows`` (fastmup.optim.adam.COLUMNS).
COLUMNS = ("lr", "weight_decay", "beta1", "beta2", "eps", "amsgrad", "maximize", "decoupled_weight_decay")
NCOLS = len(COLUMNS)


@triton.jit
def adam_kernel(
    rows_ptr,  # float64 [n, NCOLS]: per-tensor hyperparameters
    ptrs_ptr,  # int64 [4 or 5, n]: data_ptr() of param, grad, exp_avg, exp_avg_sq(, max_exp_avg_sq)
    steps_ptr,  # float32 [n]: step counts, already incremented
    numels_ptr,  # int64 [n]
    tensor_of_block_ptr,  # int32 [nblocks]
    start_of_block_ptr,  # int64 [nblocks]
    grad_scale_ptr,  # float32 [1] (read only if HAS_SCALE)
    found_inf_ptr,  # float32 [1] (read only if HAS_FOUND_INF)
    n_tensors,  # row stride of the pointer table
    NCOLS: tl.constexpr,
    PARAM: tl.constexpr,  # storage dtypes
    GRAD: tl.constexpr,
    STATE: tl.constexpr,
    HAS_AMSGRAD: tl.constexpr,  # some tensor of the batch has max_exp_avg_sq
    HAS_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr,  # every address is 16-byte aligned
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    i = tl.load(tensor_of_block_ptr + pid).to(tl.int64)
    # int64 offsets: tensors may exceed 2**31 elements.  Blocks start at
    # multiples of BLOCK, which the compiler needs to know to vectorise.
    start = tl.multiple_of(tl.load(start_of_block_ptr + pid), BLOCK)
    n = tl.minimum(tl.load(numels_ptr + i) - start, BLOCK)  # elements of this program
    if HAS_FOUND_INF:
        # AMP found inf/nan in the grads: the step is skipped on device, with
        # no host sync, by giving every program nothing to do.
        n = tl.where(tl.load(found_inf_ptr) != 0.0, 0, n)

    # ---- this tensor's hyperparameters (float64) --------------------------
    row = rows_ptr + i * NCOLS
    lr = tl.load(row + 0)
    wd = tl.load(row + 1)
    beta1 = tl.load(row + 2)
    beta2 = tl.load(row + 3)
    eps = tl.load(row + 4)
    amsgrad = tl.load(row + 5) != 0.0
    maximize = tl.load(row + 6) != 0.0
    decoupled = tl.load(row + 7) != 0.0
    t = tl.load(steps_ptr + i)

    # ---- fp32 scalars, each rounded once from float64 ----------------------
    neg_step_size = (-lr / bias_correction(beta1, t)).to(tl.float32)
    bc2_sqrt = tl.sqrt(bias_correction(beta2, t)).to(tl.float32)
    eps32 = eps.to(tl.float32)
    # AdamW multiplies p by (1 - lr·wd); Adam adds wd·p to the gradient.
    decay = tl.where(decoupled, 1.0 - lr * wd, 1.0).to(tl.float32)
    coupled_wd = tl.where(decoupled, 0.0, wd).to(tl.float32)
    # m.lerp_(g, w) as torch computes it: m + w·(g-m) for w < 0.5, else
    # g - (1-w)·(g-m); both are fma(coeff, g-m, base) (w-1 is exact for w >= 0.5).
    w = (1.0 - beta1).to(tl.float32)
    small = w < 0.5
    lerp_coeff = tl.where(small, w, w - 1.0)
    beta2_32 = beta2.to(tl.float32)
    one_minus_beta2 = (1.0 - beta2).to(tl.float32)
    if HAS_SCALE:
        scale = tl.load(grad_scale_ptr)

    # ---- this tensor's buffers --------------------------------------------
    param_ptr = tensor_ptr(ptrs_ptr, 0, n_tensors, i, PARAM, ALIGNED)
    grad_ptr = tensor_ptr(ptrs_ptr, 1, n_tensors, i, GRAD, ALIGNED)
    exp_avg_ptr = tensor_ptr(ptrs_ptr, 2, n_tensors, i, STATE, ALIGNED)
    exp_avg_sq_ptr = tensor_ptr(ptrs_ptr, 3, n_tensors, i, STATE, ALIGNED)
    if HAS_AMSGRAD:
        # Address 0 for tensors without amsgrad: only touched when the row says so.
        max_sq_ptr = tensor_ptr(ptrs_ptr, 4, n_tensors, i, STATE, ALIGNED)

    # Full tiles first, without a mask, so that their accesses vectorise;
    # then at most one masked partial tile.  (static_range: compiled twice.)
    n_full = n // TILE
    for masked in tl.static_range(2):
        if masked:
            first_tile, end_tile = n_full, tl.cdiv(n, TILE)
        else:
            first_tile, end_tile = 0, n_full
        for tile in range(first_tile, end_tile):
            offs = start + tile * TILE + tl.arange(0, TILE)
            if masked:
                mask = offs < start + n
            else:
                mask = None
            p = upcast(tl.load(param_ptr + offs, mask=mask), PARAM)
            g = upcast(tl.load(grad_ptr + offs, mask=mask), GRAD)
            m = upcast(tl.load(exp_avg_ptr + offs, mask=mask), STATE)
            v = upcast(tl.load(exp_avg_sq_ptr + offs, mask=mask), STATE)

            if HAS_SCALE:
                g = tl.div_rn(g, scale)
            g = tl.where(maximize, -g, g)
            # Skip the add when wd = 0 so that 0·inf does not turn a finite grad into nan.
            g = tl.where(coupled_wd != 0.0, tl.fma(coupled_wd, p, g), g)
            p = p * decay

            m = tl.fma(lerp_coeff, g - m, tl.where(small, m, g))
            v = tl.fma(one_minus_beta2 * g, g, v * beta2_32)
            v_hat = v
            if HAS_AMSGRAD:
                if amsgrad:  # uniform over the program: a branch, not a mask
                    v_max = upcast(tl.load(max_sq_ptr + offs, mask=mask), STATE)
                    v_hat = tl.maximum(v_max, v, propagate_nan=tl.PropagateNan.ALL)  # as torch.maximum
                    tl.store(max_sq_ptr + offs, downcast(v_hat, STATE), mask=mask)

            # IEEE sqrt and division (tl.sqrt and "/" may be approximate on GPUs).
            denom = tl.div_rn(tl.sqrt_rn(v_hat), bc2_sqrt) + eps32
            p = p + tl.div_rn(neg_step_size * m, denom)

            tl.store(param_ptr + offs, downcast(p, PARAM), mask=mask)
            tl.store(exp_avg_ptr + offs, downcast(m, STATE), mask=mask)
            tl.store(exp_avg_sq_ptr + offs, downcast(v, STATE), mask=mask)


def launch(batch, *, grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None) -> None:
    """One fused Adam step for every tensor of ``batch`` (one kernel launch).

    ``grad_scale`` (1-element float32 tensor) divides the gradients;
    ``found_inf`` (1-element float32 tensor), when nonzero, makes the launch
    write nothing.  Neither is read on the host.  The pointer table, block
    map and dtype checks are built on the first call for a batch and reused.
    """
    _common.launch_elementwise(
        adam_kernel, "adam", batch, grad_scale, found_inf,
        columns=COLUMNS, block=BLOCK, tile=TILE, num_warps=NUM_WARPS,
        state=("exp_avg", "exp_avg_sq"), optional="max_exp_avg_sq", flag="amsgrad", has_optional="HAS_AMSGRAD",
    )
