"""``LaunchPlan``: what a fused launch over a batch needs, built once.

Every fused backend (the Triton launchers, the compiled extension) reads
the same plan of a :class:`~fastmup.plan.batch.TensorBatch`, built by
:meth:`TensorBatch.launch_plan <fastmup.plan.batch.TensorBatch.launch_plan>`
from the batch's :class:`~fastmup.plan.spec.AlgorithmSpec` and cached on
the batch (one per block size):

* ``pointers`` — int64 ``[2 + len(spec.buffers), n]`` on the device: the
  addresses of each tensor's param, grad and state buffers in the order of
  ``spec.buffers`` (0 where a tensor has no such buffer, or no gradient
  this step);
* the block map — ``tensor_of_block`` (int32) and ``start_of_block``
  (int64) for chunks of ``block`` elements; an algorithm that advances its
  own scalar state gets one entry even for an empty tensor;
* ``numels`` — the batch's device table of element counts (0 for a tensor
  not stepped now: its blocks load and store nothing);
* the parameter storage mode (``storage``, a
  :class:`~fastmup.plan.spec.ParamStorage` name); the modes with extra state
  (an fp32 master weight, an int16 remainder) add that buffer's row last,
  ``storage_role``; ``tensor_ids`` — int64 ``[n]`` on the device, each
  tensor's position in the optimizer's parameter list (what keys its
  stochastic-rounding bits);
* the storage dtypes, whether every address is 16-byte aligned (vector
  accesses), whether the optional buffer exists in the batch, and for
  algorithms that advance their scalar state a ``tickets`` counter per
  tensor (the last program of a tensor writes its new scalars).

The tensors are checked once, when the plan is built: each must be a
contiguous tensor of its role's dtype with the param's element count, on
the batch's device.  A backend keeps what it derives from a plan (its
launch arguments, its dtype codes) with the plan: :meth:`LaunchPlan.memo`.
A step's read-only inputs (``spec.inputs``: ESGD-M's HVPs) are not part of
the plan (``TensorBatch.input_table``).

This module knows no batch: :func:`block_map` and :func:`check_gates` work
on arrays, the plan on tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from fastmup.plan.spec import AlgorithmSpec, ParamStorage

__all__ = ["ALIGNMENT", "LaunchPlan", "block_map", "check_gates"]

#: bytes: addresses that are multiples of this allow 128-bit vector accesses
ALIGNMENT = 16


@dataclass(frozen=True, eq=False)
class LaunchPlan:
    """See the module docstring."""

    roles: tuple[str, ...]  # the rows of ``pointers``: "param", "grad", then spec.buffers
    pointers: Tensor
    numels: Tensor
    tensor_of_block: Tensor
    start_of_block: Tensor
    nblocks: int
    block: int
    n_tensors: int
    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    state_dtype: torch.dtype
    aligned: bool
    has_optional: bool
    tickets: Optional[Tensor]
    #: which tensors have each buffer, by role (host; for per-step checks of the gates)
    present: dict
    #: how the parameters are stored, and the role of the buffer that mode adds (None: none)
    storage: str = ParamStorage.NEAREST
    storage_role: Optional[str] = None
    tensor_ids: Optional[Tensor] = None
    _memo: dict = field(default_factory=dict, repr=False)

    def memo(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()``, computed once per plan and ``key``: what a backend
        derives from the plan and passes unchanged to every launch of it."""
        try:
            return self._memo[key]
        except KeyError:
            value = self._memo[key] = build()
            return value

    def row(self, role: str) -> int:
        """The row of ``pointers`` that holds ``role``'s addresses."""
        return self.roles.index(role)

    def row_address(self, role: str) -> int:
        """The device address of ``role``'s row of ``pointers`` (0: no such row)."""
        if role not in self.roles:
            return 0
        return self.pointers.data_ptr() + self.roles.index(role) * self.n_tensors * self.pointers.element_size()


def block_map(numels: np.ndarray, block: int, *, at_least_one: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Program id -> (tensor index int32, first element int64) for chunks of ``block``.

    Empty tensors get no entry, or one with ``at_least_one``.  Offsets are
    int64, so tensors beyond 2**31 elements are addressed correctly."""
    numels = np.asarray(numels, dtype=np.int64)
    nblocks = (numels + block - 1) // block
    if at_least_one:
        nblocks = np.maximum(nblocks, 1)
    tensor_of_block = np.repeat(np.arange(len(numels), dtype=np.int32), nblocks)
    first = np.cumsum(nblocks) - nblocks
    start = (np.arange(int(nblocks.sum()), dtype=np.int64) - np.repeat(first, nblocks)) * block
    return tensor_of_block, start


def check_gates(plan: LaunchPlan, spec: AlgorithmSpec, rows: np.ndarray) -> None:
    """Every tensor whose row asks for the optional buffer has it (a step's
    rows may change after the plan was built; the plan's addresses not)."""
    if spec.optional is None:
        return
    needs = rows[:, spec.columns.index(spec.optional.gate)] != 0
    if not needs.any():
        return
    have = plan.present.get(spec.optional.name)
    missing = needs if have is None else needs & ~have
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise RuntimeError(
            f"fastmup: tensor #{i} of the batch has {spec.optional.gate}={rows[i, spec.col(spec.optional.gate)]} "
            f"but no {spec.optional.name!r} buffer"
        )
