"""Fused multi-tensor ESGD-M: one launch steps a whole :class:`TensorBatch`.

For tensor ``i`` of the batch, with its row of the hyperparameter table
(μP multipliers already applied to ``lr`` and ``wd``) and its scalar state
(``step``, ``bc1 = β1^t``, ``bc2 = β2^k``, ``cum``), this is exactly
``fastmup.optim.esgd._single_tensor_esgd``:

* the scalars of ``fastmup.optim.esgd.tensor_scalars`` in float64 (the new
  ``bc1``, ``bc2``, ``cum``, ``step``; step size, decay, QHM correction, ...),
  each update factor rounded once to float32;
* per element, fp32 math on values loaded from any storage dtype, operation
  for operation as torch computes the reference (``lerp`` and ``addcmul`` end
  in a fused multiply-add in torch's CPU and CUDA kernels, so they are
  ``tl.fma`` here; ``addcdiv`` divides last and is not fused; square root and
  division are IEEE-rounded)::

      g  = grad / grad_scale
      m  = lerp(m, g, 1-β1)
      on HVP steps:  h = hvp / grad_scale
                     d = β2·d + (1-β2)·h²        (ema)
                     d = max(β2·d, h²)           (max)
      denom = sqrt(d) / sqrt(1-bc2) + eps        (max: sqrt(d) + eps)
      m̃  = lerp(m, g, 1-v)
      p  = p·(1 - wd·step_size) - step_size/(1 - bc1·v) · m̃/denom
                                                 (only once the tensor has seen an HVP)

  with one rounding per stored tensor (the HVP is read and ``d`` written on
  HVP steps only: ``HVP`` is a constexpr, two compiled variants; ``p`` is
  neither read nor written before the tensor's first HVP).

The scalar state in the same launch
-----------------------------------
Every program of tensor ``i`` needs the *old* scalars to form this step's
factors, and the *new* ones must be stored once.  Programs of one tensor run
concurrently, so a program that stored early would feed its successors an
already-advanced value.  Each program therefore loads the old values first,
then (after a barrier over its warps) takes a ticket (``atomic_add`` on a
per-tensor int32 counter, acq_rel);
the program that draws the last ticket (``nblocks_i - 1``) is the last to
have loaded, so it alone stores the new scalars and resets the counter to 0
for the next launch.  No host work, no extra launch, no host sync.  Every
tensor, empty ones included, gets at least one program, so the scalars of
every tensor of the batch advance, as in the eager reference.  When AMP's
``found_inf`` is set nothing is written (the tickets still reset).

Launch layout as in :mod:`fastmup.kernels.adam`: one program per ``BLOCK``
elements of one tensor, full tiles without a mask (16-byte vector accesses
when every address of the batch and of the step's HVPs is aligned), then at
most one masked tile; every group value (betas, v, warm-up, variant) is a
table value, so one compiled kernel and one launch cover a dtype signature.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from . import _common
from ._common import block_extent, grad_scalars, lerp, lerp_coefficients, load_tile, optional_ptr, param_grad_ptrs
from ._common import prepared_grad, program_pass, store_tile, stream_ptr, tensor_row, unscale

__all__ = ["esgd_kernel", "launch", "BLOCK", "TILE"]

# Elements per program: as Adam (5-6 streams of 2-4 bytes, ~40-100 KB per
# program), so a 1M-parameter model still yields 256 programs.
BLOCK = 4096
# Elements per inner iteration; ESGD-M has about Adam's live arrays.
TILE = 1024
NUM_WARPS = 4
# Misaligned batches move every element with its own access.  As many warps
# as aligned ones (8 elements a thread): with half of them (16 a thread) an
# AMP HVP step spilled registers on sm_80, for about 3% fewer instructions.
NUM_WARPS_UNALIGNED = 4

# The rows of the pointer table the kernel reads: the batch's spec's buffers.
ROLES = ("param", "grad", "exp_avg", "exp_avg_d")


@triton.jit
def _advanced_scalars(
    row, i, steps_ptr, bc1_ptr, bc2_ptr, cum_ptr, HVP: tl.constexpr,
    COL_BETA1: tl.constexpr, COL_BETA2: tl.constexpr, COL_V: tl.constexpr, COL_LR_WARMUP: tl.constexpr,
    COL_VARIANT: tl.constexpr,
):
    """Tensor ``i``'s old step and its new ``bc1``, ``bc2``, ``cum`` (float64),
    and ``v``: the first part of ``fastmup.optim.esgd.tensor_scalars``."""
    beta1 = tl.load(row + COL_BETA1)
    beta2 = tl.load(row + COL_BETA2)
    lr_warmup = tl.load(row + COL_LR_WARMUP)
    is_max = tl.load(row + COL_VARIANT) != 0.0
    v = tl.where(is_max, beta1, tl.load(row + COL_V))  # the max variant is Nesterov only
    bc1 = tl.load(bc1_ptr + i) * beta1
    bc2 = tl.load(bc2_ptr + i)
    cum = tl.load(cum_ptr + i)
    if HVP:
        bc2 = bc2 * beta2
        cum = cum * lr_warmup
    else:
        cum = tl.where(is_max, cum, cum * lr_warmup)  # max: warm-up counts HVP steps only
    return tl.load(steps_ptr + i), bc1, bc2, cum, v


@triton.jit
def _tile(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_d_ptr, hvp_ptr, at, left,
    clip, scale, inv_scale, coeff_m, small_m, coeff_q, small_q, beta2, one_minus_beta2, is_max, bc2_sqrt, eps, decay, coef,
    PARAM: tl.constexpr, GRAD: tl.constexpr, STATE: tl.constexpr, HVP: tl.constexpr, HVP_DTYPE: tl.constexpr,
    HAS_CLIP: tl.constexpr, HAS_SCALE: tl.constexpr, BY_RECIPROCAL: tl.constexpr, UPDATE_P: tl.constexpr, TILE: tl.constexpr,
    MASKED: tl.constexpr, ALIGNED: tl.constexpr,
):
    """One tile of ``_single_tensor_esgd`` (elements ``at`` on, ``left`` of them valid)."""
    g = load_tile(grad_ptr + at, left, GRAD, TILE, MASKED, ALIGNED)
    m = load_tile(exp_avg_ptr + at, left, STATE, TILE, MASKED, ALIGNED)
    d = load_tile(exp_avg_d_ptr + at, left, STATE, TILE, MASKED, ALIGNED)
    # The deferred clip (the gradient's only; the HVP comes from autograd):
    # what g.mul_(clip) would hold; then g / grad_scale.
    g = prepared_grad(g, clip, scale, inv_scale, GRAD, HAS_CLIP, HAS_SCALE, BY_RECIPROCAL)
    m = lerp(m, g, coeff_m, small_m)  # exp_avg.lerp_(g, 1-β1)
    store_tile(exp_avg_ptr + at, m, left, STATE, TILE, MASKED, ALIGNED)
    if HVP:
        h = load_tile(hvp_ptr + at, left, HVP_DTYPE, TILE, MASKED, ALIGNED)
        if HAS_SCALE:
            h = unscale(h, scale, inv_scale, BY_RECIPROCAL)
        if is_max:  # uniform over the program: a branch, not a select
            d = tl.maximum(d * beta2, h * h, propagate_nan=tl.PropagateNan.ALL)  # torch.maximum
        else:
            d = tl.fma(one_minus_beta2 * h, h, d * beta2)  # d.mul_(β2).addcmul_(h, h, value=1-β2)
        store_tile(exp_avg_d_ptr + at, d, left, STATE, TILE, MASKED, ALIGNED)
    if UPDATE_P:
        p = load_tile(param_ptr + at, left, PARAM, TILE, MASKED, ALIGNED)
        # IEEE sqrt and division (tl.sqrt / "/" may be approximate on GPUs).
        denom = tl.div_rn(tl.sqrt_rn(d), bc2_sqrt) + eps
        m_est = lerp(m, g, coeff_q, small_q)  # torch.lerp(m, g, 1-v)
        # p.mul_(decay).addcdiv_(m̃, denom, value=coef): (coef·m̃)/denom, added last, unfused
        p = p * decay + tl.div_rn(coef * m_est, denom)
        store_tile(param_ptr + at, p, left, PARAM, TILE, MASKED, ALIGNED)


@triton.jit
def esgd_kernel(
    # where each hyperparameter is in a row: the spec's columns
    COL_LR: tl.constexpr,
    COL_WEIGHT_DECAY: tl.constexpr,
    COL_BETA1: tl.constexpr,
    COL_BETA2: tl.constexpr,
    COL_V: tl.constexpr,
    COL_LR_WARMUP: tl.constexpr,
    COL_EPS: tl.constexpr,
    COL_VARIANT: tl.constexpr,
    # the per-tensor scalar state besides steps_ptr: old values in, new
    # values out (stored by the last program), float64 [n] each
    bc1_ptr, bc2_ptr, cum_ptr,
    tickets_ptr,  # int32 [n]: zero between launches
    hvp_ptrs_ptr,  # int64 [n]: data_ptr() of the HVPs (read only if HVP)
    HVP: tl.constexpr,  # this step updates d
    HVP_DTYPE: tl.constexpr,  # the HVPs' (the spec's read-only input: the grads' dtype)
    # the batch (_common.batch_args): tables, block map, step counts, AMP and clip scalars, dtypes
    rows_ptr, ptrs_ptr, numels_ptr, tensor_of_block_ptr, start_of_block_ptr, n_tensors, steps_ptr,
    grad_scale_ptr, found_inf_ptr, grad_clip_ptr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_CLIP: tl.constexpr,
    NCOLS: tl.constexpr, PARAM: tl.constexpr, GRAD: tl.constexpr, STATE: tl.constexpr,
    ALIGNED: tl.constexpr,  # every address (HVPs included) is 16-byte aligned
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,
):
    """ESGD-M's step of the program's elements and, by the tensor's last
    program, of its scalar state (the module docstring)."""
    # An empty tensor's one program gets n = 0: it only advances the scalars.
    # ---- this tensor's row and scalar state: tensor_scalars ----------------
    i, row, lr, wd = tensor_row(
        tensor_of_block_ptr, start_of_block_ptr, numels_ptr, rows_ptr, NCOLS, COL_LR, COL_WEIGHT_DECAY, BLOCK
    )
    is_max = tl.load(row + COL_VARIANT) != 0.0  # the max variant (else the EMA one)
    beta1 = tl.load(row + COL_BETA1)
    beta2 = tl.load(row + COL_BETA2)
    eps = tl.load(row + COL_EPS)
    _, bc1, bc2, cum, v = _advanced_scalars(
        row, i, steps_ptr, bc1_ptr, bc2_ptr, cum_ptr, HVP, COL_BETA1, COL_BETA2, COL_V, COL_LR_WARMUP, COL_VARIANT
    )
    step_size = lr * (1.0 - cum)
    bc2_sqrt = tl.where(is_max, 1.0, tl.sqrt(1.0 - bc2)).to(tl.float32)  # float64 sqrt is IEEE-rounded
    decay = (1.0 - wd * step_size).to(tl.float32)
    coef = (-(step_size / (1.0 - bc1 * v))).to(tl.float32)
    eps32 = eps.to(tl.float32)
    beta2_32 = beta2.to(tl.float32)
    one_minus_beta2 = (1.0 - beta2).to(tl.float32)
    coeff_m, small_m = lerp_coefficients((1.0 - beta1).to(tl.float32))  # exp_avg.lerp_(g, 1-β1)
    coeff_q, small_q = lerp_coefficients((1.0 - v).to(tl.float32))  # torch.lerp(m, g, 1-v)
    clip, scale, inv_scale, exact = grad_scalars(grad_clip_ptr, grad_scale_ptr, HAS_CLIP, HAS_SCALE)

    # Full tiles first, without a mask, so that their accesses vectorise;
    # then at most one masked partial tile.  (static_range: compiled twice.)
    for masked in tl.static_range(2):
        i, start, n, first_tile, end_tile = program_pass(
            tensor_of_block_ptr, start_of_block_ptr, numels_ptr, found_inf_ptr, BLOCK, TILE, masked, HAS_FOUND_INF
        )
        # Before its first HVP a tensor does not move: p is neither read nor
        # written.  Decided per pass, outside the loop (a flag tested in the
        # loop would keep bc2 in registers through it); the common case first.
        _, _, bc2_now, _, _ = _advanced_scalars(
            rows_ptr + i * NCOLS, i, steps_ptr, bc1_ptr, bc2_ptr, cum_ptr, HVP,
            COL_BETA1, COL_BETA2, COL_V, COL_LR_WARMUP, COL_VARIANT,
        )
        param_ptr, grad_ptr = param_grad_ptrs(ptrs_ptr, n_tensors, i, start, PARAM, GRAD, ALIGNED)
        exp_avg_ptr = stream_ptr(ptrs_ptr, 2, n_tensors, i, start, STATE, ALIGNED)
        exp_avg_d_ptr = stream_ptr(ptrs_ptr, 3, n_tensors, i, start, STATE, ALIGNED)
        hvp_ptr = optional_ptr(hvp_ptrs_ptr, 0, n_tensors, i, start, HVP_DTYPE, ALIGNED, HVP, grad_ptr)  # read only if HVP
        # With a grad_scale: the pass for a power of two first, else the dividing one.
        for skip_p in tl.static_range(2):
            if (bc2_now == 1.0) == skip_p:
                for divide in tl.static_range(2):
                    if exact == (divide == 0):
                        for tile in range(first_tile, end_tile):
                            _tile(
                                param_ptr, grad_ptr, exp_avg_ptr, exp_avg_d_ptr, hvp_ptr, tile * TILE, n - tile * TILE,
                                clip, scale, inv_scale, coeff_m, small_m, coeff_q, small_q, beta2_32, one_minus_beta2,
                                is_max, bc2_sqrt, eps32, decay, coef,
                                PARAM, GRAD, STATE, HVP, HVP_DTYPE, HAS_CLIP, HAS_SCALE, divide == 0, not skip_p, TILE, masked,
                                ALIGNED,
                            )

    # ---- the new scalar state: stored by the last program of the tensor ----
    # Read again rather than kept live through the loops (registers), and
    # unchanged: no program stores before every program has its ticket.
    i, _, _ = block_extent(tensor_of_block_ptr, start_of_block_ptr, numels_ptr, BLOCK)
    step, bc1, bc2, cum, v = _advanced_scalars(
        rows_ptr + i * NCOLS, i, steps_ptr, bc1_ptr, bc2_ptr, cum_ptr, HVP,
        COL_BETA1, COL_BETA2, COL_V, COL_LR_WARMUP, COL_VARIANT,
    )
    n_blocks = tl.maximum(tl.cdiv(tl.load(numels_ptr + i), BLOCK), 1)
    # The barrier keeps every warp's loads of the old scalars before the
    # ticket; acq_rel orders this program's ticket after them for the others.
    tl.debug_barrier()
    arrived = tl.atomic_add(tickets_ptr + i, 1)
    last = arrived == n_blocks - 1
    tl.store(tickets_ptr + i, 0, mask=last)
    write = last
    if HAS_FOUND_INF:
        write = write & (tl.load(found_inf_ptr) == 0.0)
    tl.store(steps_ptr + i, step + 1.0, mask=write)
    tl.store(bc1_ptr + i, bc1, mask=write)
    tl.store(bc2_ptr + i, bc2, mask=write)
    tl.store(cum_ptr + i, cum, mask=write)


def launch(
    batch,
    *,
    hvps: Optional[Sequence[torch.Tensor]] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    """One fused ESGD-M step for every tensor of ``batch`` (one kernel launch).

    ``hvps``: on HVP steps, one contiguous tensor per param, in the dtype
    the spec declares for its ``hvp`` input (the grads'); ``None``
    otherwise.  Advances the batch's scalar state (``step`` and the running
    products) in the same launch.  ``grad_scale`` (1-element float32)
    divides grads and HVPs; a nonzero ``found_inf`` makes the launch write
    nothing.  Neither is read on the host.
    """
    plan = _common.launch_plan(batch, esgd_kernel, BLOCK, algorithm="esgd", roles=ROLES)
    if plan.nblocks == 0:
        return
    aligned = plan.aligned
    hvp_ptrs = plan.numels  # placeholder, never read without HVPs
    if hvps is not None:
        hvp_ptrs, hvps_aligned = batch.input_table("hvp", hvps)
        aligned = aligned and hvps_aligned
    s = batch.scalars  # steps_ptr (the scalar state "step") comes with batch_args
    _common.run(
        esgd_kernel, batch, plan, grad_scale, found_inf, aligned=aligned,
        bc1_ptr=s["exp_avg_bias_corr"],
        bc2_ptr=s["exp_avg_d_bias_corr"],
        cum_ptr=s["lr_warmup_cumprod"],
        tickets_ptr=plan.tickets,
        hvp_ptrs_ptr=hvp_ptrs,
        HVP=hvps is not None,
        HVP_DTYPE=_common.tl_dtype(batch.input_dtype("hvp")),
        BLOCK=BLOCK,
        TILE=TILE,
        num_warps=NUM_WARPS if aligned else NUM_WARPS_UNALIGNED,
    )
