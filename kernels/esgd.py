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
  HVP steps only: ``HVP`` is a constexpr, two compiled variants).

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
elements of one tensor; every group value (betas, v, warm-up, variant) is a
table value, so one compiled kernel and one launch cover a dtype signature.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from . import _common
from ._common import downcast, upcast

__all__ = ["esgd_kernel", "launch", "BLOCK", "TILE"]

# Elements per program: as Adam (5-6 streams of 2-4 bytes, ~40-100 KB per
# program), so a 1M-parameter model still yields 256 programs.
BLOCK = 4096
# Elements per inner iteration; ESGD-M has about Adam's live arrays.
TILE = 1024
NUM_WARPS = 4

# Order of the columns of ``batch.rows`` (fastmup.optim.esgd.COLUMNS).
COLUMNS = ("lr", "weight_decay", "beta1", "beta2", "v", "lr_warmup", "eps", "variant")
NCOLS = len(COLUMNS)
POINTERS = ("param", "grad", "exp_avg", "exp_avg_d")


@triton.jit
def esgd_kernel(
    rows_ptr,  # float64 [n, NCOLS]
    ptrs_ptr,  # int64 [4, n]: data_ptr() of param, grad, exp_avg, exp_avg_d
    hvp_ptrs_ptr,  # int64 [n]: data_ptr() of the HVPs (read only if HVP)
    step_ptr,  # float32 [n]   \
    bc1_ptr,  # float64 [n]     |  per-tensor scalar state: old values in,
    bc2_ptr,  # float64 [n]     |  new values out (stored by the last program)
    cum_ptr,  # float64 [n]    /
    tickets_ptr,  # int32 [n]: zero between launches
    numels_ptr,  # int64 [n]
    tensor_of_block_ptr,  # int32 [nblocks]
    start_of_block_ptr,  # int64 [nblocks]
    grad_scale_ptr,  # float32 [1] (read only if HAS_SCALE)
    found_inf_ptr,  # float32 [1] (read only if HAS_FOUND_INF)
    n_tensors,
    NCOLS: tl.constexpr,
    PARAM: tl.constexpr,
    GRAD: tl.constexpr,
    STATE: tl.constexpr,
    HVP: tl.constexpr,  # this step updates d
    HAS_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    BLOCK: tl.constexpr,
    TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    i = tl.load(tensor_of_block_ptr + pid).to(tl.int64)
    start = tl.load(start_of_block_ptr + pid)
    numel = tl.load(numels_ptr + i)
    end = tl.minimum(start + BLOCK, numel)
    n_blocks = tl.maximum((numel + BLOCK - 1) // BLOCK, 1)
    if HAS_FOUND_INF:
        # AMP found inf/nan: every program gets an empty range, no host sync.
        end = tl.where(tl.load(found_inf_ptr) != 0.0, start, end)

    # ---- this tensor's row and old scalar state (float64) ------------------
    row = rows_ptr + i * NCOLS
    lr = tl.load(row + 0)
    wd = tl.load(row + 1)
    beta1 = tl.load(row + 2)
    beta2 = tl.load(row + 3)
    v = tl.load(row + 4)
    lr_warmup = tl.load(row + 5)
    eps = tl.load(row + 6)
    is_max = tl.load(row + 7) != 0.0
    v = tl.where(is_max, beta1, v)  # the max variant is Nesterov only
    step = tl.load(step_ptr + i)
    bc1 = tl.load(bc1_ptr + i)
    bc2 = tl.load(bc2_ptr + i)
    cum = tl.load(cum_ptr + i)

    # ---- fastmup.optim.esgd.tensor_scalars ---------------------------------
    bc1 = bc1 * beta1
    if HVP:
        bc2 = bc2 * beta2
        cum = cum * lr_warmup
    else:
        cum = tl.where(is_max, cum, cum * lr_warmup)  # max: warm-up counts HVP steps only
    started = bc2 != 1.0  # no update before the tensor's first HVP
    step_size = lr * (1.0 - cum)
    bc2_sqrt = tl.where(is_max, 1.0, tl.sqrt(1.0 - bc2)).to(tl.float32)  # float64 sqrt is IEEE-rounded
    decay = (1.0 - wd * step_size).to(tl.float32)
    coef = (-(step_size / (1.0 - bc1 * v))).to(tl.float32)
    eps32 = eps.to(tl.float32)
    beta2_32 = beta2.to(tl.float32)
    one_minus_beta2 = (1.0 - beta2).to(tl.float32)
    # lerp(a, b, w) as torch computes it: a + w·(b-a) for w < 0.5, else
    # b - (1-w)·(b-a); both are fma(coeff, b-a, base) (w-1 is exact for w >= 0.5).
    w_m = (1.0 - beta1).to(tl.float32)
    small_m = w_m < 0.5
    coeff_m = tl.where(small_m, w_m, w_m - 1.0)
    w_q = (1.0 - v).to(tl.float32)
    small_q = w_q < 0.5
    coeff_q = tl.where(small_q, w_q, w_q - 1.0)
    if HAS_SCALE:
        scale = tl.load(grad_scale_ptr)

    # ---- this tensor's buffers ----------------------------------------------
    param_ptr = tl.load(ptrs_ptr + 0 * n_tensors + i).to(tl.pointer_type(PARAM))
    grad_ptr = tl.load(ptrs_ptr + 1 * n_tensors + i).to(tl.pointer_type(GRAD))
    exp_avg_ptr = tl.load(ptrs_ptr + 2 * n_tensors + i).to(tl.pointer_type(STATE))
    exp_avg_d_ptr = tl.load(ptrs_ptr + 3 * n_tensors + i).to(tl.pointer_type(STATE))
    if HVP:
        hvp_ptr = tl.load(hvp_ptrs_ptr + i).to(tl.pointer_type(PARAM))

    for off in range(start, end, TILE):
        offs = off + tl.arange(0, TILE).to(tl.int64)
        mask = offs < end
        p = upcast(tl.load(param_ptr + offs, mask=mask, other=0.0), PARAM)
        g = upcast(tl.load(grad_ptr + offs, mask=mask, other=0.0), GRAD)
        m = upcast(tl.load(exp_avg_ptr + offs, mask=mask, other=0.0), STATE)
        d = upcast(tl.load(exp_avg_d_ptr + offs, mask=mask, other=0.0), STATE)
        if HAS_SCALE:
            g = tl.div_rn(g, scale)
        m = tl.fma(coeff_m, g - m, tl.where(small_m, m, g))  # exp_avg.lerp_(g, 1-β1)
        if HVP:
            h = upcast(tl.load(hvp_ptr + offs, mask=mask, other=0.0), PARAM)
            if HAS_SCALE:
                h = tl.div_rn(h, scale)
            d_max = tl.maximum(d * beta2_32, h * h, propagate_nan=tl.PropagateNan.ALL)  # torch.maximum
            d_ema = tl.fma(one_minus_beta2 * h, h, d * beta2_32)  # d.mul_(β2).addcmul_(h, h, value=1-β2)
            d = tl.where(is_max, d_max, d_ema)
            tl.store(exp_avg_d_ptr + offs, downcast(d, STATE), mask=mask)
        # IEEE sqrt and division (tl.sqrt / "/" may be approximate on GPUs).
        denom = tl.div_rn(tl.sqrt_rn(d), bc2_sqrt) + eps32
        m_est = tl.fma(coeff_q, g - m, tl.where(small_q, m, g))  # torch.lerp(m, g, 1-v)
        # p.mul_(decay).addcdiv_(m̃, denom, value=coef): (coef·m̃)/denom, added last, unfused
        p = tl.where(started, p * decay + tl.div_rn(coef * m_est, denom), p)
        tl.store(param_ptr + offs, downcast(p, PARAM), mask=mask)
        tl.store(exp_avg_ptr + offs, downcast(m, STATE), mask=mask)

    # ---- the new scalar state: stored by the last program of the tensor ----
    # The barrier keeps every warp's loads of the old scalars before the
    # ticket; acq_rel orders this program's ticket after them for the others.
    tl.debug_barrier()
    arrived = tl.atomic_add(tickets_ptr + i, 1)
    last = arrived == n_blocks - 1
    tl.store(tickets_ptr + i, 0, mask=last)
    write = last
    if HAS_FOUND_INF:
        write = write & (tl.load(found_inf_ptr) == 0.0)
    tl.store(step_ptr + i, step + 1.0, mask=write)
    tl.store(bc1_ptr + i, bc1, mask=write)
    tl.store(bc2_ptr + i, bc2, mask=write)
    tl.store(cum_ptr + i, cum, mask=write)


class _Plan(NamedTuple):
    """Everything a launch needs besides the rows, scalars, HVPs and AMP tensors."""

    pointers: torch.Tensor
    numels: torch.Tensor
    tensor_of_block: torch.Tensor
    start_of_block: torch.Tensor
    nblocks: int
    tickets: torch.Tensor
    n_tensors: int
    param: object
    grad: object
    state: object


def block_map(numels: Sequence[int], block: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Like ``TensorBatch.block_map`` but with at least one block per tensor
    (an empty tensor's program only advances its scalar state)."""
    numel = np.asarray(numels, dtype=np.int64)
    nblocks = np.maximum((numel + block - 1) // block, 1)
    tensor_of_block = np.repeat(np.arange(len(numel), dtype=np.int32), nblocks)
    first = np.cumsum(nblocks) - nblocks
    start = (np.arange(int(nblocks.sum()), dtype=np.int64) - np.repeat(first, nblocks)) * block
    return torch.from_numpy(tensor_of_block).to(device), torch.from_numpy(start).to(device), int(nblocks.sum())


def _build_plan(batch) -> _Plan:
    if tuple(batch.columns) != COLUMNS:
        raise ValueError(f"esgd kernel expects columns {COLUMNS}, the batch has {tuple(batch.columns)}")
    sig = batch.signature
    for name in POINTERS[2:]:
        for i, buf in enumerate(batch.state[name]):
            if buf is None or buf.dtype != sig.state_dtype or not buf.is_contiguous() or buf.shape != batch.params[i].shape:
                raise ValueError(f"esgd kernel: {name!r} of tensor {i} must be a contiguous {sig.state_dtype} tensor like its param")
    for p, g in zip(batch.params, batch.grads):
        if not (p.is_contiguous() and g.is_contiguous()):
            raise ValueError("esgd kernel: params and grads must be contiguous")
    for key, dtype in (("step", torch.float32), ("exp_avg_bias_corr", torch.float64), ("exp_avg_d_bias_corr", torch.float64), ("lr_warmup_cumprod", torch.float64)):
        col = batch.scalars.get(key)
        if col is None or col.dtype != dtype or col.shape != (len(batch),) or not col.is_contiguous():
            raise ValueError(f"esgd kernel: scalar state {key!r} must be a contiguous {dtype} column of {len(batch)} entries")
    _common.check_device(esgd_kernel, sig.device)
    tensor_of_block, start_of_block, nblocks = block_map([p.numel() for p in batch.params], BLOCK, sig.device)
    return _Plan(
        pointers=batch.pointers(POINTERS),
        numels=batch.numels(),
        tensor_of_block=tensor_of_block,
        start_of_block=start_of_block,
        nblocks=nblocks,
        tickets=torch.zeros(len(batch), dtype=torch.int32, device=sig.device),
        n_tensors=len(batch),
        param=_common.tl_dtype(sig.param_dtype),
        grad=_common.tl_dtype(sig.grad_dtype),
        state=_common.tl_dtype(sig.state_dtype),
    )


def launch(
    batch,
    *,
    hvps: Optional[Sequence[torch.Tensor]] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    """One fused ESGD-M step for every tensor of ``batch`` (one kernel launch).

    ``hvps``: on HVP steps, one contiguous tensor per param (the param's
    dtype and shape); ``None`` otherwise.  Advances the batch's scalar state
    (``step`` and the running products) in the same launch.  ``grad_scale``
    (1-element float32) divides grads and HVPs; a nonzero ``found_inf`` makes
    the launch write nothing.  Neither is read on the host.
    """
    plan = _common.plan_for(batch, "esgd", lambda: _build_plan(batch))
    if plan.nblocks == 0:
        return
    if hvps is not None:
        if len(hvps) != len(batch):
            raise ValueError(f"esgd kernel: {len(hvps)} HVPs for {len(batch)} tensors")
        for i, (h, p) in enumerate(zip(hvps, batch.params)):
            if h.dtype != p.dtype or h.shape != p.shape or not h.is_contiguous() or h.device != p.device:
                raise ValueError(f"esgd kernel: the HVP of tensor {i} must be a contiguous {p.dtype} tensor like its param")
        hvp_ptrs = torch.tensor([h.data_ptr() for h in hvps], dtype=torch.int64).to(batch.device)
    else:
        hvp_ptrs = plan.numels  # placeholder, never read
    scale, inf = _common.scalar_inputs(batch, grad_scale, found_inf)
    s = batch.scalars
    with _common.device_guard(batch.device):
        esgd_kernel[(plan.nblocks,)](
            batch.device_rows(),
            plan.pointers,
            hvp_ptrs,
            s["step"],
            s["exp_avg_bias_corr"],
            s["exp_avg_d_bias_corr"],
            s["lr_warmup_cumprod"],
            plan.tickets,
            plan.numels,
            plan.tensor_of_block,
            plan.start_of_block,
            scale,
            inf,
            plan.n_tensors,
            NCOLS=NCOLS,
            PARAM=plan.param,
            GRAD=plan.grad,
            STATE=plan.state,
            HVP=hvps is not None,
            HAS_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            BLOCK=BLOCK,
            TILE=TILE,
            num_warps=NUM_WARPS,
        )
    _common.LAUNCHES["esgd"] += 1
