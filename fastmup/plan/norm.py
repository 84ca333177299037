"""``NormPlan``: what one fused gradient-norm launch reads, built once.

A gradient-norm reduction (``fastmup.optim.clip``) reads, for one device
and gradient dtype, the same things an update kernel reads of a batch: the
gradients' addresses, their element counts and a block map.  The plan holds
them, plus the few device buffers the reduction writes (a float64 partial
per block-map entry, a float64 sum per tensor, the per-tensor and launch
tickets that find the last program, zero between launches):

* :func:`from_launch_plan`: the optimizer's case.  The addresses are the grad
  row of the batch's :class:`~fastmup.plan.launch.LaunchPlan` (a view: the
  optimizer rewrites it in place when new gradients arrive), the counts its
  ``numels`` (0 for a tensor without a gradient now), the block map its own.
  Built once per launch plan, nothing per step.
* :func:`from_grads`: a list of gradients (``fastmup.clip_grad_norm_``).

``norms_index[i]`` is where tensor ``i``'s norm goes in a per-tensor norm
table (the optimizer's flat parameter order).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from fastmup.plan.launch import ALIGNMENT, LaunchPlan, block_map

__all__ = ["NormPlan", "from_grads", "from_launch_plan"]


@dataclass(eq=False)
class NormPlan:
    """See the module docstring."""

    device: torch.device
    grad_dtype: torch.dtype
    grad_ptrs: Tensor  # int64 [n]
    numels: Tensor  # int64 [n]
    tensor_of_block: Tensor  # int32 [nblocks]
    start_of_block: Tensor  # int64 [nblocks]
    first_entry: Tensor  # int32 [n + 1]
    nblocks: int
    block: int
    n_tensors: int
    n_counted: int  # tensors with at least one entry
    aligned: bool
    partials: Tensor  # float64 [max(nblocks, 1)]
    sums: Tensor  # float64 [max(n, 1)]
    tickets: Tensor  # int32 [max(n, 1)]
    counter: Tensor  # int32 [1]
    norms_index: Tensor  # int64 [max(n, 1)]
    #: host copies the host backend reads (no device round trip on the CPU)
    first_entry_host: np.ndarray
    keep: tuple = ()  # tensors the addresses point into
    #: a compiled backend's per-plan launch arguments (set on its first launch)
    fixed_args: Optional[dict] = None


def _entries(tensor_of_block: np.ndarray, n: int) -> np.ndarray:
    counts = np.bincount(tensor_of_block, minlength=n) if n else np.zeros(0, dtype=np.int64)
    first = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(counts, out=first[1:])
    return first


def _build(device, grad_dtype, grad_ptrs, numels, host_map, device_map, block, n, aligned, norms_index, keep) -> NormPlan:
    """``host_map``: the block map's tensor column on the host; ``device_map``
    (tensor, start) on the device, or None to upload ``host_map``."""
    first = _entries(host_map[0], n)
    if device_map is None:
        device_map = (torch.from_numpy(host_map[0]).to(device), torch.from_numpy(host_map[1]).to(device))
    tensor_of_block, start = device_map
    nblocks = len(host_map[0])
    index = np.arange(n, dtype=np.int64) if norms_index is None else np.asarray(norms_index, dtype=np.int64)
    return NormPlan(
        device=device,
        grad_dtype=grad_dtype,
        grad_ptrs=grad_ptrs,
        numels=numels,
        tensor_of_block=tensor_of_block,
        start_of_block=start,
        first_entry=torch.from_numpy(first).to(device),
        nblocks=nblocks,
        block=block,
        n_tensors=n,
        n_counted=int((np.diff(first) > 0).sum()),
        aligned=aligned,
        partials=torch.zeros(max(nblocks, 1), dtype=torch.float64, device=device),
        sums=torch.zeros(max(n, 1), dtype=torch.float64, device=device),
        tickets=torch.zeros(max(n, 1), dtype=torch.int32, device=device),
        counter=torch.zeros(1, dtype=torch.int32, device=device),
        norms_index=torch.from_numpy(np.concatenate([index, np.zeros(max(1 - n, 0), dtype=np.int64)])).to(device),
        first_entry_host=first,
        keep=keep,
    )


def from_launch_plan(
    plan: LaunchPlan, numel_counts: np.ndarray, device: torch.device, norms_index: Optional[Sequence[int]] = None
) -> NormPlan:
    """The reduction over the gradients of a batch's launch plan
    (``numel_counts``: the batch's host element counts, from which the plan's
    block map was built; an algorithm with tickets gives empty tensors an entry)."""
    grad_row = plan.pointers[plan.row("grad")]
    host_map = block_map(numel_counts, plan.block, at_least_one=plan.tickets is not None)
    return _build(
        device, plan.grad_dtype, grad_row, plan.numels, host_map, (plan.tensor_of_block, plan.start_of_block),
        plan.block, plan.n_tensors, plan.aligned, norms_index, (plan,),
    )


def from_grads(grads: Sequence[Tensor], block: int) -> NormPlan:
    """The reduction over ``grads`` (contiguous, one device and dtype)."""
    g0 = grads[0]
    device, dtype = g0.device, g0.dtype
    numels = np.fromiter((g.numel() for g in grads), dtype=np.int64, count=len(grads))
    ptrs = np.fromiter((g.data_ptr() if g.numel() else 0 for g in grads), dtype=np.int64, count=len(grads))
    aligned = bool(np.all(ptrs % ALIGNMENT == 0))
    return _build(
        device, dtype, torch.from_numpy(ptrs).to(device), torch.from_numpy(numels).to(device), block_map(numels, block),
        None, block, len(grads), aligned, None, tuple(grads),
    )
