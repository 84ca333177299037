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
from .rounding import load_param, storage_key, storage_pointer, store_param
from ._common import grad_scalars, load_tile, optional_ptr, param_grad_ptrs, prepared_grad, program_pass, store_tile, tensor_row

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
    param_ptr, grad_ptr, buf_ptr, aux_ptr, at, left, element0, key,
    clip, scale, inv_scale, maximize, wd, has_buf, first, one_minus_dampening, mu, nesterov, neg_lr,
    PARAM: tl.constexpr, GRAD: tl.constexpr, STATE: tl.constexpr, STORAGE: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
    HAS_CLIP: tl.constexpr, HAS_SCALE: tl.constexpr, BY_RECIPROCAL: tl.constexpr,
    TILE: tl.constexpr, MASKED: tl.constexpr, ALIGNED: tl.constexpr,
):
    """One tile of ``_single_tensor_sgd`` (elements ``at`` on, ``left`` valid;
    ``element0``, the flat index of element ``at``, counts the rounding
    bits of a stochastically rounded parameter)."""
    p = load_param(param_ptr + at, aux_ptr + at, left, PARAM, STORAGE, TILE, MASKED, ALIGNED)
    g = load_tile(grad_ptr + at, left, GRAD, TILE, MASKED, ALIGNED)
    # the deferred clip (what g.mul_(clip) would hold), then the eager path's g / scale
    g = prepared_grad(g, clip, scale, inv_scale, GRAD, HAS_CLIP, HAS_SCALE, BY_RECIPROCAL)
    if not HAS_SCALE:  # else maximize's sign rides on the scale (sgd_kernel)
        g = tl.where(maximize, -g, g)
    # Skip the add when wd = 0 so that 0·inf does not turn a finite grad into nan.
    g = tl.where(wd != 0.0, tl.fma(wd, p, g), g)

    if HAS_MOMENTUM:
        if has_buf:  # uniform over the program: branches, not masks
            # (on the first step the old buffer, read all the same, is not used:
            # a select per element costs less than the branch's register moves)
            b = load_tile(buf_ptr + at, left, STATE, TILE, MASKED, ALIGNED)
            b = tl.where(first, g, tl.fma(one_minus_dampening, g, b * mu))
            store_tile(buf_ptr + at, b, left, STATE, TILE, MASKED, ALIGNED)
            if nesterov:
                g = tl.fma(mu, b, g)
            else:
                g = b

    p = tl.fma(neg_lr, g, p)
    store_param(param_ptr + at, aux_ptr + at, p, left, element0, key, PARAM, STORAGE, TILE, MASKED, ALIGNED)


@triton.jit
def sgd_kernel(
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,
    # where each hyperparameter is in a row: the spec's columns
    COL_LR: tl.constexpr,
    COL_WEIGHT_DECAY: tl.constexpr,
    COL_MOMENTUM: tl.constexpr,
    COL_DAMPENING: tl.constexpr,
    COL_NESTEROV: tl.constexpr,
    COL_MAXIMIZE: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,  # some tensor of the batch has a momentum buffer (pointer row 2)
    # how the parameters are stored (rounding.storage_args)
    ids_ptr, rounding_prefix, STORAGE: tl.constexpr, ROW_STORAGE: tl.constexpr,
    # the batch (_common.batch_args): tables, block map, step counts, AMP and clip scalars, dtypes
    rows_ptr, ptrs_ptr, numels_ptr, tensor_of_block_ptr, start_of_block_ptr, n_tensors, steps_ptr,
    grad_scale_ptr, found_inf_ptr, grad_clip_ptr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_CLIP: tl.constexpr,
    NCOLS: tl.constexpr, PARAM: tl.constexpr, GRAD: tl.constexpr, STATE: tl.constexpr, ALIGNED: tl.constexpr,
):
    """SGD's step of the program's ``BLOCK`` elements (the module docstring):
    the fp32 scalars from the row once, then :func:`_tile` over the tiles."""
    i, row, lr, wd = tensor_row(
        tensor_of_block_ptr, start_of_block_ptr, numels_ptr, rows_ptr, NCOLS, COL_LR, COL_WEIGHT_DECAY, BLOCK
    )
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
    clip, scale, inv_scale, exact = grad_scalars(grad_clip_ptr, grad_scale_ptr, HAS_CLIP, HAS_SCALE)
    if HAS_SCALE:
        # -(g / s) == g / -s and -(g * r) == g * -r exactly: maximize's negation
        # folded into the unscaling (one select per element less)
        scale = tl.where(maximize, -scale, scale)
        inv_scale = tl.where(maximize, -inv_scale, inv_scale)

    # Full tiles first, without a mask, so that their accesses vectorise;
    # then at most one masked partial tile.  (static_range: compiled twice.)
    for masked in tl.static_range(2):
        i, start, n, first_tile, end_tile = program_pass(
            tensor_of_block_ptr, start_of_block_ptr, numels_ptr, found_inf_ptr, BLOCK, TILE, masked, HAS_FOUND_INF
        )
        param_ptr, grad_ptr = param_grad_ptrs(ptrs_ptr, n_tensors, i, start, PARAM, GRAD, ALIGNED)
        aux_ptr = storage_pointer(ptrs_ptr, n_tensors, i, start, param_ptr, STORAGE, ROW_STORAGE, ALIGNED)
        key = storage_key(ids_ptr, rounding_prefix, tl.load(steps_ptr + i), i, start, STORAGE)
        # the buffer of tensors with momentum != 0 (the others never touch it)
        buf_ptr = optional_ptr(ptrs_ptr, 2, n_tensors, i, start, STATE, ALIGNED, HAS_MOMENTUM, grad_ptr)
        # With a grad_scale: the pass for a power of two first, else the dividing one.
        for divide in tl.static_range(2):
            if exact == (divide == 0):
                for tile in range(first_tile, end_tile):
                    _tile(
                        param_ptr, grad_ptr, buf_ptr, aux_ptr, tile * TILE, n - tile * TILE, start + tile * TILE, key,
                        clip, scale, inv_scale, maximize, wd32, has_buf, first, one_minus_dampening, mu, nesterov, neg_lr,
                        PARAM, GRAD, STATE, STORAGE, HAS_MOMENTUM, HAS_CLIP, HAS_SCALE, divide == 0, TILE, masked, ALIGNED,
                    )


def launch(batch, *, grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None) -> None:
    """One fused SGD step for every tensor of ``batch``: one kernel launch
    (:func:`fastmup.kernels._common.run`, which says what ``grad_scale`` and
    ``found_inf`` do), on the launch plan built at the batch's first step."""
    plan = _common.launch_plan(batch, sgd_kernel, BLOCK, algorithm="sgd", roles=ROLES)
    if plan.nblocks:
        _common.run(
            sgd_kernel, batch, plan, grad_scale, found_inf, **rounding.storage_args(batch, plan),
            HAS_MOMENTUM=plan.has_optional, BLOCK=BLOCK, TILE=TILE, num_warps=NUM_WARPS,
        )
