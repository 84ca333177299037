"""Fused multi-tensor gradient norm: one launch reduces every gradient of a
dtype signature to its per-tensor and total norms.

For norm type ``p`` (2, 1 or inf) and the gradients ``g_i`` of a batch::

    s_i   = Σ_k |g_ik|^p        (p = inf: max_k |g_ik|)   per tensor, float64
    S     = Σ_i s_i             (max for inf), added to the running total of
            the launches before (``HAS_ACC``)
    norm  = S^(1/p)             rounded once to float32          (``FINAL``)
    coef  = min(1, max_norm · (1 / (norm + 1e-6)))   in float32, as torch's
            ``clip_grad_norm_`` computes it (``max_norm / t`` is
            ``t.reciprocal() * max_norm`` in torch; NaN propagates)

Layout of the launch: one program per entry of the batch's block map
(``BLOCK`` elements of one tensor; the launch plan the update kernels read).
Each program sums its entry in tiles (float64 terms, a tree sum per tile,
then across tiles) and stores the partial.  The last program of a
tensor to finish (a ticket per tensor) adds that tensor's partials in entry
order; the last tensor to finish (one more ticket) adds the per-tensor sums
in tensor order and, on the final launch, writes the norm and the clip
coefficient.  Every sum has a fixed order whatever the order the programs
ran in, so the result is the same bits on every run, and nothing is read
on the host: the launch can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common
from ._common import upcast

__all__ = ["grad_norm_kernel", "launch", "BLOCK", "TILE", "NORM_CODES"]

# Elements per program: the update kernels' block, so that the optimizer's
# clipping reads the same launch plan (block map, grad pointers) as its step.
BLOCK = 4096
TILE = 1024
# Partials (or per-tensor sums) added per iteration by a finishing program.
RBLOCK = 1024
NUM_WARPS = 4

#: norm type -> the kernel's NORM constexpr
NORM_CODES = {float("inf"): 0, 1.0: 1, 2.0: 2}


@triton.jit
def _combine(a, b, NORM: tl.constexpr):
    if NORM == 0:
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)
    else:
        return a + b


@triton.jit
def _reduce(x, NORM: tl.constexpr):
    """The sum (max for inf) of a tile of nonnegative terms."""
    if NORM == 0:
        # tl.max drops NaN; a NaN anywhere must make the norm NaN, as torch's
        has_nan = tl.sum((x != x).to(tl.int32)) > 0
        return tl.where(has_nan, float("nan"), tl.max(x))
    else:
        return tl.sum(x)


@triton.jit
def _term(x, NORM: tl.constexpr):
    if NORM == 2:
        return x * x
    else:
        return tl.abs(x)


@triton.jit
def _root(s, NORM: tl.constexpr):
    if NORM == 2:
        return tl.sqrt(s)  # float64: IEEE-rounded on every target
    else:
        return s


@triton.jit
def grad_norm_kernel(
    grad_ptrs_ptr,  # int64 [n]: data_ptr() of each gradient (0: none this step)
    numels_ptr,  # int64 [n]: elements stepped now (0: nothing to read)
    tensor_of_block_ptr,  # int32 [nblocks]
    start_of_block_ptr,  # int64 [nblocks]
    first_entry_ptr,  # int32 [n + 1]: tensor i owns entries [first[i], first[i+1])
    partials_ptr,  # float64 [nblocks]: one partial per entry
    sums_ptr,  # float64 [n]: per-tensor sums of |g|^p (max for inf)
    tickets_ptr,  # int32 [n]: zero between launches
    counter_ptr,  # int32 [1]: zero between launches
    acc_ptr,  # float64 [1]: running total (read if HAS_ACC; always written)
    result_ptr,  # float32 [2]: norm, clip coefficient (written if FINAL)
    norms_ptr,  # float32 [*]: per-tensor norms (written if PER_TENSOR)
    norms_index_ptr,  # int64 [n]: where tensor i's norm goes in norms
    max_norm,  # float32
    n_tensors,
    n_counted,  # tensors with at least one entry
    GRAD: tl.constexpr,
    NORM: tl.constexpr,  # 0: inf, 1, 2
    HAS_ACC: tl.constexpr,
    FINAL: tl.constexpr,
    PER_TENSOR: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,
    RBLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    i = tl.load(tensor_of_block_ptr + pid)
    start = tl.multiple_of(tl.load(start_of_block_ptr + pid), BLOCK)
    n = tl.minimum(tl.load(numels_ptr + i) - start, BLOCK).to(tl.int32)  # <= 0: nothing to read
    grad = tl.load(grad_ptrs_ptr + i).to(tl.pointer_type(GRAD))
    if ALIGNED:
        grad = tl.multiple_of(grad, 16)
    grad = grad + start
    offs = tl.arange(0, TILE)
    partial = tl.zeros((), dtype=tl.float64)
    for tile in range(0, tl.cdiv(tl.maximum(n, 0), TILE)):
        at = tile * TILE + offs
        # float64 terms: the square of an fp32 value is exact there, and so is
        # every sum of a tile's worth (no fp32 overflow of large gradients)
        x = upcast(tl.load(grad + at, mask=at < n, other=0.0), GRAD).to(tl.float64)
        partial = _combine(partial, _reduce(_term(x, NORM), NORM), NORM)
    tl.store(partials_ptr + pid, partial)

    # ---- the last program of tensor i adds its partials, in entry order ----
    # (the barrier: every thread's part of the store above precedes the ticket)
    tl.debug_barrier()
    first = tl.load(first_entry_ptr + i)
    count = tl.load(first_entry_ptr + i + 1) - first
    ticket = tl.atomic_add(tickets_ptr + i, 1)
    if ticket == count - 1:
        roffs = tl.arange(0, RBLOCK)
        s = tl.zeros((), dtype=tl.float64)
        for k in range(0, tl.cdiv(count, RBLOCK)):
            at = k * RBLOCK + roffs
            part = tl.load(partials_ptr + first + at, mask=at < count, other=0.0)
            s = _combine(s, _reduce(part, NORM), NORM)
        tl.store(sums_ptr + i, s)
        if PER_TENSOR:
            tl.store(norms_ptr + tl.load(norms_index_ptr + i), _root(s, NORM).to(tl.float32))
        tl.store(tickets_ptr + i, 0)
        tl.debug_barrier()
        done = tl.atomic_add(counter_ptr, 1)
        # ---- the last tensor to finish adds the per-tensor sums, in order ----
        if done == n_counted - 1:
            total = tl.zeros((), dtype=tl.float64)
            for k in range(0, tl.cdiv(n_tensors, RBLOCK)):
                at = k * RBLOCK + roffs
                owns = (tl.load(first_entry_ptr + at + 1, mask=at < n_tensors, other=0)
                        > tl.load(first_entry_ptr + at, mask=at < n_tensors, other=0))
                # tensors without entries (empty) were never written: they add nothing
                part = tl.load(sums_ptr + at, mask=(at < n_tensors) & owns, other=0.0)
                total = _combine(total, _reduce(part, NORM), NORM)
            if HAS_ACC:
                total = _combine(tl.load(acc_ptr), total, NORM)
            tl.store(acc_ptr, total)
            if FINAL:
                norm = _root(total, NORM).to(tl.float32)
                coef = tl.div_rn(1.0, norm + 1e-6) * max_norm
                coef = tl.where(coef > 1.0, 1.0, coef)  # NaN stays NaN, as torch.clamp
                tl.store(result_ptr, norm)
                tl.store(result_ptr + 1, coef)
            tl.store(counter_ptr, 0)


def launch(
    plan,
    *,
    norm_type: float,
    acc: torch.Tensor,
    has_acc: bool,
    result: Optional[torch.Tensor] = None,
    max_norm: float = 0.0,
    norms: Optional[torch.Tensor] = None,
) -> None:
    """One launch over a :class:`~fastmup.plan.norm.NormPlan` with entries.

    Adds the batch's sum (max for inf) of ``|g|^p`` to ``acc`` (float64 [1];
    overwritten when ``has_acc`` is False); with ``result`` (float32 [2])
    this is the last launch and writes the norm and clip coefficient; with
    ``norms`` every tensor's norm goes to ``norms[plan.norms_index[i]]``.
    """
    kernel = grad_norm_kernel
    _common.check_device(kernel, plan.device)
    if plan.nblocks == 0:
        raise ValueError("fastmup grad_norm launch: the plan has no block-map entries (nothing to reduce)")
    with _common.device_guard(plan.device):
        kernel[(plan.nblocks,)](
            grad_ptrs_ptr=plan.grad_ptrs,
            numels_ptr=plan.numels,
            tensor_of_block_ptr=plan.tensor_of_block,
            start_of_block_ptr=plan.start_of_block,
            first_entry_ptr=plan.first_entry,
            partials_ptr=plan.partials,
            sums_ptr=plan.sums,
            tickets_ptr=plan.tickets,
            counter_ptr=plan.counter,
            acc_ptr=acc,
            result_ptr=result if result is not None else acc,
            norms_ptr=norms if norms is not None else plan.sums,
            norms_index_ptr=plan.norms_index,
            max_norm=float(max_norm),
            n_tensors=plan.n_tensors,
            n_counted=plan.n_counted,
            GRAD=_common.tl_dtype(plan.grad_dtype),
            NORM=NORM_CODES[float(norm_type)],
            HAS_ACC=bool(has_acc),
            FINAL=result is not None,
            PER_TENSOR=norms is not None,
            ALIGNED=plan.aligned,
            BLOCK=plan.block,
            TILE=TILE,
            RBLOCK=RBLOCK,
            num_warps=NUM_WARPS,
            enable_fp_fusion=_common.FP_FUSION,
        )
    _common.LAUNCHES["grad_norm"] += 1
