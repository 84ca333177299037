"""``LaunchPlan``: what a fused launch over a batch needs, built once.

Every fused backend (the Triton launchers, the compiled extension) reads
the same plan of a :class:`~fastmup.plan.batch.TensorBatch`, built from
the batch's :class:`~fastmup.plan.spec.AlgorithmSpec` and cached on the
batch (one per block size):

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
the plan; :func:`input_table` checks them against their declaration and
gathers their addresses, for every backend alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from fastmup.plan.spec import STORAGE_BUFFERS, ParamStorage

if TYPE_CHECKING:
    from fastmup.plan.batch import TensorBatch

__all__ = ["ALIGNMENT", "LaunchPlan", "block_map", "build_launch_plan", "check_gates", "input_dtype", "input_table"]

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


def _check_tensors(batch: "TensorBatch", roles: tuple[str, ...]) -> list[Tensor]:
    """Every addressed tensor, checked; raise naming the tensor and role."""
    sig, spec = batch.signature, batch.spec
    want = {"param": sig.param_dtype, "grad": sig.grad_dtype}
    want.update(STORAGE_BUFFERS.values())  # the storage modes' buffers have dtypes of their own
    gate = batch.col(spec.optional.gate) if spec.optional is not None else None
    checked = []
    for role in roles:
        listed = batch.params if role == "param" else batch.grads if role == "grad" else batch.state.get(role)
        for i, p in enumerate(batch.params):
            t = None if listed is None else listed[i]
            if t is None:
                optional_absent = spec.optional is not None and role == spec.optional.name and batch.rows[i, gate] == 0
                if optional_absent or (role == "grad" and not batch.is_active(i)) or p.numel() == 0:
                    continue  # address 0: never read
                raise ValueError(f"{spec.name} launch: tensor #{i} of the batch has no {role!r} buffer")
            dtype = want.get(role, sig.state_dtype)
            if t.dtype != dtype or t.numel() != p.numel() or not t.is_contiguous() or t.device != sig.device:
                raise ValueError(
                    f"{spec.name} launch: the {role} of tensor #{i} of the batch must be a contiguous {dtype} tensor "
                    f"of {p.numel()} elements on {sig.device}, got {t.dtype} {tuple(t.shape)} on {t.device} "
                    f"(contiguous={t.is_contiguous()})"
                )
            checked.append(t)
    return checked


def build_launch_plan(batch: "TensorBatch", block: int) -> LaunchPlan:
    """The launch plan of ``batch`` for chunks of ``block`` elements (checks every tensor)."""
    spec = batch.spec
    if spec is None:
        raise ValueError("a launch plan needs the batch's AlgorithmSpec (batch.spec)")
    if tuple(batch.columns) != spec.columns:
        raise ValueError(f"{spec.name} launch: the batch's columns {tuple(batch.columns)} are not {spec.columns}")
    for s in spec.scalars:
        col = batch.scalars.get(s.name)
        if col is None or col.dtype != s.dtype or tuple(col.shape) != (len(batch),) or not col.is_contiguous():
            raise ValueError(f"{spec.name} launch: scalar state {s.name!r} must be a contiguous {s.dtype} column of {len(batch)} entries")
    has_optional = spec.optional is not None and spec.optional.name in batch.state
    roles = ("param", "grad") + spec.state + ((spec.optional.name,) if has_optional else ())
    storage = batch.signature.storage
    storage_role = STORAGE_BUFFERS[storage][0] if storage in STORAGE_BUFFERS else None
    if storage_role is not None:
        roles += (storage_role,)
    tensors = _check_tensors(batch, roles)
    tensor_of_block, start_of_block, nblocks = batch.block_map(block, at_least_one=spec.advances_scalars)
    device = batch.device
    sig = batch.signature
    empty = batch.numel_counts() == 0  # address 0, and nothing to read
    present = {
        role: np.array([t is not None for t in batch.state[role]], dtype=bool) | empty
        for role in roles[2:]
    }
    return LaunchPlan(
        roles=roles,
        pointers=batch.pointers(roles),
        numels=batch.numels(),
        tensor_of_block=tensor_of_block,
        start_of_block=start_of_block,
        nblocks=nblocks,
        block=block,
        n_tensors=len(batch),
        param_dtype=sig.param_dtype,
        grad_dtype=sig.grad_dtype,
        state_dtype=sig.state_dtype,
        aligned=all(t.data_ptr() % ALIGNMENT == 0 for t in tensors),
        has_optional=has_optional,
        tickets=torch.zeros(len(batch), dtype=torch.int32, device=device) if spec.advances_scalars else None,
        present=present,
        storage=storage,
        storage_role=storage_role,
        tensor_ids=torch.tensor(list(batch.index), dtype=torch.int64).to(device) if storage == ParamStorage.STOCHASTIC else None,
    )


def check_gates(plan: LaunchPlan, spec, rows: np.ndarray) -> None:
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


def input_dtype(batch: "TensorBatch", name: str) -> torch.dtype:
    """The dtype every backend reads read-only input ``name`` of the batch's
    spec in: that of the batch's grads, params or state, as its
    :class:`~fastmup.plan.spec.ReadOnlyInput` declares."""
    spec, sig = batch.spec, batch.signature
    declared = next((x for x in spec.inputs if x.name == name), None)
    if declared is None:
        raise ValueError(f"{spec.name} has no read-only input {name!r} (it has {[x.name for x in spec.inputs]})")
    return {"param": sig.param_dtype, "grad": sig.grad_dtype, "state": sig.state_dtype}[declared.like]


def input_table(batch: "TensorBatch", name: str, tensors: Sequence[Tensor]) -> tuple[Tensor, bool]:
    """The addresses of read-only input ``name`` (one tensor per tensor of
    the batch) as an int64 ``[n]`` table on the batch's device, and whether
    every one is a multiple of :data:`ALIGNMENT` bytes.

    Each tensor must be a contiguous tensor with its param's element count,
    on the batch's device, in the dtype its :class:`~fastmup.plan.spec.ReadOnlyInput`
    declares (that of the grads, params or state of the batch)."""
    spec, sig = batch.spec, batch.signature
    dtype = input_dtype(batch, name)
    if len(tensors) != len(batch):
        raise ValueError(f"{spec.name} launch: {len(tensors)} {name} tensors for a batch of {len(batch)} tensors")
    for i, (t, p) in enumerate(zip(tensors, batch.params)):
        if t is None or t.dtype != dtype or t.numel() != p.numel() or not t.is_contiguous() or t.device != sig.device:
            got = "None" if t is None else f"{t.dtype} {tuple(t.shape)} on {t.device} (contiguous={t.is_contiguous()})"
            raise ValueError(
                f"{spec.name} launch: the {name} of tensor #{i} of the batch must be a contiguous {dtype} tensor "
                f"of {p.numel()} elements on {sig.device}, got {got}"
            )
    addresses = [t.data_ptr() for t in tensors]
    table = torch.tensor(addresses, dtype=torch.int64)
    if sig.device.type != "cpu":
        table = table.to(sig.device, non_blocking=True)
    return table, all(a % ALIGNMENT == 0 for a in addresses)
