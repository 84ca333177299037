"""Fused multi-tensor SGD with momentum: one launch steps a whole :class:`TensorBatch`.

For tensor ``i`` of the batch, with its row of the hyperparameter table
(μP multipliers already applied to ``lr`` and ``wd``), ``μ`` its momentum and
``t`` its step count (already advanced for this step)::

    g   = ±grad / grad_scale + wd·p              (sign: maximize)
    b   = g                                      if t == 1     (torch's first step)
        = μ·b + (1-dampening)·g                  otherwise
    g   = g + μ·b if nesterov else b             (only when μ != 0)
    p   = p - lr·g

This is exactly ``fastmup.optim.sgd._single_tensor_sgd``: fp32 math on
values loaded from any storage dtype, one rounding per stored tensor (the
update uses the unrounded fp32 buffer, as the eager path does), scalars
rounded once from float64 to fp32.  Every ``add(.., alpha=a)`` of the eager
path is a fused multiply-add in torch (CPU vector code, nvcc-contracted CUDA
code), hence ``tl.fma`` here.

Launch layout as in :mod:`fastmup.kernels.adam`: one program per chunk of
``BLOCK`` elements of one tensor, found through the batch's block map; every
group's values and flags (momentum 0 or not, nesterov, maximize) come from
the table, so one launch covers every tensor of a dtype signature.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common, rounding
from .grad_norm import clip_grad
from .rounding import load_param, storage_key, storage_pointer, store_param
from ._common import block_extent, grad_unscaling, load_tile, program_pass, store_tile, tensor_ptr, unscale

__all__ = ["sgd_kernel", "launch", "BLOCK", "TILE"]

# Elements per program and per inner iteration; see fastmup.kernels.adam for
# the reasoning (SGD streams 3-4 arrays instead of 5: the same trade-off).
BLOCK = 4096
TILE = 1024
NUM_WARPS = 4

# The rows of the pointer table the kernel reads: the batch's spec's buffers
# (the momentum buffer only when some tensor of the batch has momentum != 0).
ROLES = ("param", "grad", "momentum_buffer")


@triton.jit
def _tile(
    param_ptr, grad_ptr, buf_ptr, aux_ptr, at, left, element0, key, key2,
    scale, inv_scale, maximize, wd, has_buf, first, one_minus_dampening, mu, nesterov, neg_lr, clip,
    PARAM: tl.constexpr, GRAD: tl.constexpr, STATE: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
    HAS_CLIP: tl.constexpr, HAS_SCALE: tl.constexpr, BY_RECIPROCAL: tl.constexpr, TILE: tl.constexpr, MASKED: tl.constexpr,
    ALIGNED: tl.constexpr, STORAGE: tl.constexpr,
):
    """One tile of ``_single_tensor_sgd`` (elements ``at`` on, ``left`` of them valid;
    ``element0``: the flat index of element ``at``)."""
    p = load_param(param_ptr + at, aux_ptr + at, left, PARAM, STORAGE, TILE, MASKED, ALIGNED)
    g = load_tile(grad_ptr + at, left, GRAD, TILE, MASKED, ALIGNED)
    if HAS_CLIP:
        g = clip_grad(g, clip, GRAD)  # a deferred clip: what g.mul_(clip) would hold

    if HAS_SCALE:
        g = unscale(g, scale, inv_scale, BY_RECIPROCAL)  # the eager path's g / scale
    g = tl.where(maximize, -g, g)
    # Skip the add when wd = 0 so that 0·inf does not turn a finite grad into nan.
    g = tl.where(wd != 0.0, tl.fma(wd, p, g), g)

    if HAS_MOMENTUM:
        if has_buf:  # uniform over the program: branches, not masks
            if first:
                b = g  # the old buffer is not even read
            else:
                b = load_tile(buf_ptr + at, left, STATE, TILE, MASKED, ALIGNED)
                b = tl.fma(one_minus_dampening, g, b * mu)
            store_tile(buf_ptr + at, b, left, STATE, TILE, MASKED, ALIGNED)
            if nesterov:
                g = tl.fma(mu, b, g)
            else:
                g = b

    p = tl.fma(neg_lr, g, p)
    store_param(param_ptr + at, aux_ptr + at, p, left, element0, key, key2, PARAM, STORAGE, TILE, MASKED, ALIGNED)


@triton.jit
def sgd_kernel(
    rows_ptr,  # float64 [n, NCOLS]: per-tensor hyperparameters
    ptrs_ptr,  # int64 [2 to 4, n]: data_ptr() of the ROLES, then the storage mode's buffer
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
    COL_MOMENTUM: tl.constexpr,
    COL_DAMPENING: tl.constexpr,
    COL_NESTEROV: tl.constexpr,
    COL_MAXIMIZE: tl.constexpr,
    PARAM: tl.constexpr,  # storage dtypes
    GRAD: tl.constexpr,
    STATE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,  # some tensor of the batch has a momentum buffer
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

    # ---- this tensor's hyperparameters, as fp32 scalars --------------------
    row = rows_ptr + i * NCOLS
    lr = tl.load(row + COL_LR)
    wd = tl.load(row + COL_WEIGHT_DECAY)
    momentum = tl.load(row + COL_MOMENTUM)
    dampening = tl.load(row + COL_DAMPENING)
    nesterov = tl.load(row + COL_NESTEROV) != 0.0
    maximize = tl.load(row + COL_MAXIMIZE) != 0.0
    neg_lr = (-lr).to(tl.float32)
    wd32 = wd.to(tl.float32)
    mu = momentum.to(tl.float32)
    one_minus_dampening = (1.0 - dampening).to(tl.float32)
    has_buf = momentum != 0.0
    first = tl.load(steps_ptr + i) == 1.0  # torch seeds the buffer with g on the first step
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
        buf_ptr = grad_ptr  # never touched unless HAS_MOMENTUM
        if HAS_MOMENTUM:
            # Address 0 for tensors with momentum 0: only touched when the row says so.
            buf_ptr = tensor_ptr(ptrs_ptr, 2, n_tensors, i, STATE, ALIGNED) + start
        aux_ptr = storage_pointer(ptrs_ptr, n_tensors, i, start, param_ptr, STORAGE, ROW_STORAGE, ALIGNED)
        key, key2 = storage_key(ids_ptr, rounding_prefix, tl.load(steps_ptr + i), i, start, STORAGE)
        # With a grad_scale: the pass for a power of two first, else the dividing one.
        for divide in tl.static_range(2):
            if exact == (divide == 0):
                for tile in range(first_tile, end_tile):
                    _tile(
                        param_ptr, grad_ptr, buf_ptr, aux_ptr, tile * TILE, n - tile * TILE, start + tile * TILE, key, key2,
                        scale, inv_scale, maximize, wd32, has_buf, first, one_minus_dampening, mu, nesterov, neg_lr, clip,
                        PARAM, GRAD, STATE, HAS_MOMENTUM, HAS_CLIP, HAS_SCALE, divide == 0, TILE, masked, ALIGNED, STORAGE,
                    )


def launch(batch, *, grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None) -> None:
    """One fused SGD step for every tensor of ``batch`` (one kernel launch).

    ``grad_scale`` (1-element float32 tensor) divides the gradients;
    ``found_inf`` (1-element float32 tensor), when nonzero, makes the launch
    write nothing.  Neither is read on the host.  The batch's launch plan
    (pointer table, block map, dtype checks) is built on its first step and
    reused.
    """
    plan = _common.launch_plan(batch, sgd_kernel, BLOCK, algorithm="sgd", roles=ROLES)
    if plan.nblocks == 0:
        return
    spec = batch.spec
    with _common.device_guard(batch.device):
        sgd_kernel[(plan.nblocks,)](
            **_common.batch_args(batch, plan, grad_scale, found_inf),
            **rounding.storage_args(batch, plan),
            steps_ptr=batch.steps,
            COL_LR=spec.col("lr"),
            COL_WEIGHT_DECAY=spec.col("weight_decay"),
            COL_MOMENTUM=spec.col("momentum"),
            COL_DAMPENING=spec.col("dampening"),
            COL_NESTEROV=spec.col("nesterov"),
            COL_MAXIMIZE=spec.col("maximize"),
            HAS_MOMENTUM=plan.has_optional,
            BLOCK=BLOCK,
            TILE=TILE,
            num_warps=NUM_WARPS,
        )
    _common.LAUNCHES["sgd"] += 1
