"""The per-tensor metadata table: the one structure every backend consumes.

An optimizer step is planned once and replayed: the tensors that have a
gradient are grouped into :class:`TensorBatch` es, one per device and dtype
signature ``(param dtype, grad dtype, state dtype)``.  A batch holds

* the tensor lists (params, grads, one list per state buffer),
* ``rows``: a float64 host table, one row per tensor, one column per
  hyperparameter, with μP multipliers and per-group values already applied
  (``lr = group_lr * lr_num / lr_den``),
* ``steps``: a float32 device tensor, the per-tensor step counts.  The
  optimizer's ``state[p]["step"]`` entries are 0-d views into it, so one
  ``steps.add_(1)`` advances every tensor and no step count lives on the host.
  Other per-tensor scalar state (``MuOptimizer.scalar_state``) lives the same
  way in ``scalars[key]``; ``steps`` is ``scalars["step"]``.

Fused backends additionally ask a batch for device copies of the table
(:meth:`device_rows`), for pointer tables built from ``data_ptr()``
(:meth:`pointers`) and for a block map (:meth:`block_map`).  All of them are
cached: replaying a step with unchanged tensors rebuilds nothing, and a
changed hyperparameter costs one small host-to-device copy of ``rows``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from fastmup.plan.launch import ALIGNMENT, LaunchPlan, block_map
from fastmup.plan.spec import STORAGE_BUFFERS, AlgorithmSpec, ParamStorage


@dataclass(frozen=True)
class Signature:
    """What one launch specialises on, and the backend that runs it."""

    device: torch.device
    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    state_dtype: torch.dtype
    backend: str = "eager"
    #: how the parameters are stored (``fastmup.plan.spec.ParamStorage``)
    storage: str = "nearest"


@dataclass(eq=False)
class TensorBatch:
    """Tensors of one device and dtype signature, stepped together.

    ``index[i]`` is the position of tensor ``i`` in the optimizer's flat list
    of parameters (group order), ``columns`` names the columns of ``rows``.
    """

    signature: Signature
    columns: tuple[str, ...]
    index: list[int]
    params: list[Tensor]
    grads: list[Tensor]
    state: dict[str, list[Tensor | None]]
    rows: np.ndarray
    steps: Tensor
    scalars: dict[str, Tensor] = field(default_factory=dict)
    #: the optimizer's parameters (``params`` holds what kernels update: the
    #: same tensors, or a DTensor's local shard)
    owners: list[Tensor] = field(default_factory=list)
    #: the algorithm whose update steps this batch (its columns are ``columns``)
    spec: Optional[AlgorithmSpec] = None
    #: the seed of the stochastic-rounding bits (``ParamStorage.STOCHASTIC``)
    #: and its part of their hash (``fastmup.optim.precision.seed_prefix``,
    #: uint32), which the fused kernels start from
    rounding_seed: int = 0
    rounding_prefix: int = 0
    #: per-group lr tensors (capturable mode) or None; see :meth:`device_rows`
    device_lr: list[Tensor] | None = None
    #: the clip coefficient deferred into this step (float32, one element on
    #: the batch's device; ``MuOptimizer.clip_grad_norm_``) or None: every
    #: backend's update reads ``round_to_grad_dtype(grad · grad_clip)``
    grad_clip: Tensor | None = None
    #: per tensor: its param group, and its μP multipliers of ``lr`` and
    #: ``weight_decay`` as exact fractions ``num / den`` (the rows apply them)
    group_index: np.ndarray | None = None
    lr_num: np.ndarray | None = None
    lr_den: np.ndarray | None = None
    wd_num: np.ndarray | None = None
    wd_den: np.ndarray | None = None
    _device_rows: Tensor | None = field(default=None, repr=False)
    _uploaded: np.ndarray | None = field(default=None, repr=False)
    _pointers: dict[tuple[str, ...], Tensor] = field(default_factory=dict, repr=False)
    _block_maps: dict[tuple[int, bool], tuple[Tensor, Tensor, int]] = field(default_factory=dict, repr=False)
    _launch_plans: dict[int, LaunchPlan] = field(default_factory=dict, repr=False)
    _numels: Tensor | None = field(default=None, repr=False)
    _lr_factors: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    _staging: dict[object, tuple[Tensor, object]] = field(default_factory=dict, repr=False)
    #: which tensors have a gradient this step (None: all of them); see :meth:`set_active`
    active: np.ndarray | None = None
    _step_increment: Tensor | None = field(default=None, repr=False)
    _steps_view: tuple[Tensor, np.ndarray] | None = field(default=None, repr=False)
    _grad_rows: tuple[int, list[np.ndarray]] | None = field(default=None, repr=False)
    _has_work: bool | None = field(default=None, repr=False)
    _numel_host: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def device(self) -> torch.device:
        return self.signature.device

    @property
    def backend(self) -> str:
        """The backend that steps this batch."""
        return self.signature.backend

    # ------------------------------------------------------------------
    # tensors without a gradient this step
    # ------------------------------------------------------------------
    def set_active(self, mask: np.ndarray | None) -> None:
        """Step only the tensors where ``mask`` is True (None: all).

        A tensor without a gradient keeps its place in the batch: its grad
        address is 0, its entry of :meth:`numels` is 0 (so a kernel's blocks
        of it load and store nothing) and its step count does not advance.
        A changed mask costs two small copies, never a new plan."""
        if mask is not None and mask.all():
            mask = None
        if (mask is None and self.active is None) or (
            mask is not None and self.active is not None and np.array_equal(mask, self.active)
        ):
            return
        self.active = None if mask is None else mask.copy()
        self._has_work = None
        if self._numels is not None:
            self._upload("numels", self._numels, self._active_numels())
        if self.active is not None:
            if self._step_increment is None:
                self._step_increment = torch.empty(len(self), dtype=self.steps.dtype, device=self.device)
            self._upload("increment", self._step_increment, self.active.astype(np.float32))

    def is_active(self, i: int) -> bool:
        return self.active is None or bool(self.active[i])

    @property
    def has_work(self) -> bool:
        """Whether some tensor stepped now has elements (else a launch would do nothing)."""
        if self._has_work is None:
            self._has_work = bool(self._active_numels().any())
        return self._has_work

    def advance_steps(self) -> None:
        """Count one more step for every tensor stepped now."""
        if self.device.type == "cpu" and not torch.compiler.is_compiling():
            # Through a numpy view: the same float32 sums without a dispatcher
            # round trip, which costs tens of microseconds with the caches
            # cold after a forward and backward (a host step's whole budget
            # for a few hundred small tensors).
            view = self._steps_view
            if view is None or view[0] is not self.steps:
                view = self._steps_view = (self.steps, self.steps.numpy())
            counts = view[1]
            counts += 1 if self.active is None else self._step_increment.numpy()
            return
        if self.active is None:
            self.steps.add_(1)
        else:
            self.steps.add_(self._step_increment)

    def retract_steps(self, found_inf: Tensor) -> None:
        """Undo :meth:`advance_steps` where ``found_inf`` is nonzero (on the device: no sync)."""
        skipped = found_inf.to(self.steps.device, self.steps.dtype)
        if self.active is not None:
            skipped = skipped * self._step_increment
        self.steps.sub_(skipped)

    def numel_counts(self) -> np.ndarray:
        """int64 ``[n]`` element counts of the tensors, on the host (cached; do not modify)."""
        if self._numel_host is None:
            self._numel_host = np.fromiter((p.numel() for p in self.params), dtype=np.int64, count=len(self.params))
        return self._numel_host

    def _active_numels(self) -> np.ndarray:
        counts = self.numel_counts()
        return counts if self.active is None else counts * self.active

    def col(self, name: str) -> int:
        """Column number of hyperparameter ``name`` in ``rows``."""
        return self.columns.index(name)

    def value(self, i: int, name: str) -> float:
        return float(self.rows[i, self.columns.index(name)])

    # ------------------------------------------------------------------
    # device-side views for fused backends
    # ------------------------------------------------------------------
    def device_rows(self) -> Tensor:
        """The hyperparameter table on the batch's device (float64, ``[n, ncols]``).

        Uploaded only when ``rows`` changed since the last upload; the tensor
        keeps its address, so a captured CUDA graph sees new values.  With
        ``device_lr`` (Tensor learning rates) the ``lr`` column is computed on
        the device from them: no host sync, capturable.
        """
        if self._device_rows is None:
            self._device_rows = torch.empty(self.rows.shape, dtype=torch.float64, device=self.device)
        if self._uploaded is None or not np.array_equal(self._uploaded, self.rows, equal_nan=True):
            self._upload("rows", self._device_rows, self.rows)
            self._uploaded = self.rows.copy()
        if self.device_lr is not None:
            if self._lr_factors is None:
                self._lr_factors = (
                    torch.from_numpy(self.group_index).to(self.device),
                    torch.from_numpy(self.lr_num / self.lr_den).to(self.device),
                )
            group_of, factor = self._lr_factors
            lrs = torch.stack([lr.to(self.device, torch.float64).reshape(()) for lr in self.device_lr])
            self._device_rows[:, self.columns.index("lr")] = lrs[group_of] * factor
        return self._device_rows

    def pointers(self, names: Sequence[str]) -> Tensor:
        """int64 table ``[len(names), n]`` of ``data_ptr()`` values.

        ``names`` are ``"param"``, ``"grad"`` or a state key; a missing state
        buffer (e.g. no ``max_exp_avg_sq`` without amsgrad) has address 0.
        """
        key = tuple(names)
        table = self._pointers.get(key)
        if table is None:
            host = torch.zeros((len(key), len(self)), dtype=torch.int64)
            for r, name in enumerate(key):
                tensors = self.params if name == "param" else self.grads if name == "grad" else self.state[name]
                for i, t in enumerate(tensors):
                    if t is not None:
                        host[r, i] = t.data_ptr()
            table = host.to(self.device)
            self._pointers[key] = table
        return table

    def rebind_grads(self, grads: Sequence[Tensor], addresses: np.ndarray | None = None) -> None:
        """Use ``grads`` from now on: new gradient tensors with the dtype,
        shape and device of the last ones (the caller checks), whose
        ``data_ptr()`` s are ``addresses`` when given.

        The grad row of every cached pointer table is rewritten in place, so
        the backends' cached launch plans, which hold these tables, follow
        without being rebuilt."""
        self.grads = list(grads)
        if not self._pointers:
            return
        if addresses is None:
            addresses = np.fromiter((0 if g is None else g.data_ptr() for g in self.grads), dtype=np.int64, count=len(self.grads))
        if self.device.type == "cpu":
            # the tables' grad rows as numpy views, kept: indexing a table
            # is a dispatcher round trip per table and step
            views = self._grad_rows
            if views is None or views[0] != len(self._pointers):
                rows = [table[key.index("grad")].numpy() for key, table in self._pointers.items() if "grad" in key]
                views = self._grad_rows = (len(self._pointers), rows)
            for row in views[1]:
                row[...] = addresses
            return
        for key, table in self._pointers.items():
            if "grad" in key:
                self._upload(("pointers", key), table[key.index("grad")], addresses)

    def _upload(self, slot: object, dst: Tensor, src: np.ndarray) -> None:
        """Copy host ``src`` into ``dst`` (same shape) without a host sync.

        On CUDA: through a pinned staging buffer and an asynchronous copy,
        ordered on the current stream after the launches that read ``dst``
        before.  Each ``slot`` has its own staging buffer, reused only once
        the copy that last read it has run."""
        if dst.device.type == "cpu":
            dst.numpy()[...] = src  # no dispatcher round trip: a step's host work is microseconds
            return
        if dst.device.type != "cuda":
            dst.copy_(torch.from_numpy(src))
            return
        staged = self._staging.get(slot)
        if staged is None:
            staged = self._staging[slot] = (torch.empty(src.shape, dtype=dst.dtype, pin_memory=True), torch.cuda.Event())
        buffer, copied = staged
        copied.synchronize()  # an unrecorded event returns at once
        buffer.numpy()[...] = src
        dst.copy_(buffer, non_blocking=True)
        copied.record()

    def numels(self) -> Tensor:
        """int64 ``[n]`` element counts on the device, 0 for a tensor that is
        not stepped now (:meth:`set_active`).  Updated in place: launch plans
        that hold it follow."""
        if self._numels is None:
            # a copy: on the host, from_numpy would share memory with the cached counts
            self._numels = torch.tensor(self._active_numels(), dtype=torch.int64, device=self.device)
        return self._numels

    def block_map(self, block: int, *, at_least_one: bool = False) -> tuple[Tensor, Tensor, int]:
        """Map program id -> (tensor index, first element) for chunks of
        ``block``: ``(tensor_of_block int32, start_of_block int64, nblocks)``
        on the device; empty tensors get no block, or one with
        ``at_least_one`` (see :func:`fastmup.plan.launch.block_map`; cached)."""
        key = (block, at_least_one)
        cached = self._block_maps.get(key)
        if cached is None:
            tensor_of_block, start = block_map(self.numel_counts(), block, at_least_one=at_least_one)
            cached = self._block_maps[key] = (
                torch.from_numpy(tensor_of_block).to(self.device),
                torch.from_numpy(start).to(self.device),
                len(tensor_of_block),
            )
        return cached

    def launch_plan(self, block: int) -> LaunchPlan:
        """The :class:`~fastmup.plan.launch.LaunchPlan` of this batch for
        chunks of ``block`` elements, built (and its tensors checked) once."""
        plan = self._launch_plans.get(block)
        if plan is None:
            plan = self._launch_plans[block] = self._build_launch_plan(block)
        return plan

    def _build_launch_plan(self, block: int) -> LaunchPlan:
        spec = self.spec
        if spec is None:
            raise ValueError("a launch plan needs the batch's AlgorithmSpec (batch.spec)")
        if tuple(self.columns) != spec.columns:
            raise ValueError(f"{spec.name} launch: the batch's columns {tuple(self.columns)} are not {spec.columns}")
        for s in spec.scalars:
            col = self.scalars.get(s.name)
            if col is None or col.dtype != s.dtype or tuple(col.shape) != (len(self),) or not col.is_contiguous():
                raise ValueError(f"{spec.name} launch: scalar state {s.name!r} must be a contiguous {s.dtype} column of {len(self)} entries")
        has_optional = spec.optional is not None and spec.optional.name in self.state
        roles = ("param", "grad") + spec.state + ((spec.optional.name,) if has_optional else ())
        storage = self.signature.storage
        storage_role = STORAGE_BUFFERS[storage][0] if storage in STORAGE_BUFFERS else None
        if storage_role is not None:  # the storage mode's buffer comes last
            roles += (storage_role,)
        tensors = self._checked_tensors(roles)
        tensor_of_block, start_of_block, nblocks = self.block_map(block, at_least_one=spec.advances_scalars)
        sig = self.signature
        empty = self.numel_counts() == 0  # address 0, and nothing to read
        return LaunchPlan(
            roles=roles,
            pointers=self.pointers(roles),
            numels=self.numels(),
            tensor_of_block=tensor_of_block,
            start_of_block=start_of_block,
            nblocks=nblocks,
            block=block,
            n_tensors=len(self),
            param_dtype=sig.param_dtype,
            grad_dtype=sig.grad_dtype,
            state_dtype=sig.state_dtype,
            aligned=all(t.data_ptr() % ALIGNMENT == 0 for t in tensors),
            has_optional=has_optional,
            tickets=torch.zeros(len(self), dtype=torch.int32, device=self.device) if spec.advances_scalars else None,
            present={role: np.array([t is not None for t in self.state[role]], dtype=bool) | empty for role in roles[2:]},
            storage=storage,
            storage_role=storage_role,
            tensor_ids=(
                torch.tensor(list(self.index), dtype=torch.int64).to(self.device) if storage == ParamStorage.STOCHASTIC else None
            ),
        )

    def _checked_tensors(self, roles: tuple[str, ...]) -> list[Tensor]:
        """Every tensor a plan with pointer rows ``roles`` addresses, checked;
        raise naming the tensor and role."""
        sig, spec = self.signature, self.spec
        want = {"param": sig.param_dtype, "grad": sig.grad_dtype}
        want.update(STORAGE_BUFFERS.values())  # the storage modes' buffers have dtypes of their own
        gate = self.col(spec.optional.gate) if spec.optional is not None else None
        checked = []
        for role in roles:
            listed = self.params if role == "param" else self.grads if role == "grad" else self.state.get(role)
            for i, p in enumerate(self.params):
                t = None if listed is None else listed[i]
                if t is None:
                    optional_absent = spec.optional is not None and role == spec.optional.name and self.rows[i, gate] == 0
                    if optional_absent or (role == "grad" and not self.is_active(i)) or p.numel() == 0:
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

    # ------------------------------------------------------------------
    # a step's read-only inputs (spec.inputs)
    # ------------------------------------------------------------------
    def input_dtype(self, name: str) -> torch.dtype:
        """The dtype every backend reads read-only input ``name`` of the
        batch's spec in: that of the batch's grads, params or state, as its
        :class:`~fastmup.plan.spec.ReadOnlyInput` declares."""
        spec, sig = self.spec, self.signature
        declared = next((x for x in spec.inputs if x.name == name), None)
        if declared is None:
            raise ValueError(f"{spec.name} has no read-only input {name!r} (it has {[x.name for x in spec.inputs]})")
        return {"param": sig.param_dtype, "grad": sig.grad_dtype, "state": sig.state_dtype}[declared.like]

    def input_table(self, name: str, tensors: Sequence[Tensor]) -> tuple[Tensor, bool]:
        """The addresses of read-only input ``name`` (one tensor per tensor
        of the batch) as an int64 ``[n]`` table on the batch's device, and
        whether every one is a multiple of ``ALIGNMENT`` bytes.

        Each tensor must be a contiguous tensor with its param's element
        count, on the batch's device, in the dtype of :meth:`input_dtype`."""
        spec, sig = self.spec, self.signature
        dtype = self.input_dtype(name)
        if len(tensors) != len(self):
            raise ValueError(f"{spec.name} launch: {len(tensors)} {name} tensors for a batch of {len(self)} tensors")
        for i, (t, p) in enumerate(zip(tensors, self.params)):
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


def math_dtype(*storage: torch.dtype) -> torch.dtype:
    """The dtype an update computes in for tensors stored in ``storage``:
    float32 for 16- and 32-bit storage, float64 when any is float64 (as
    torch.optim, whose float64 results the reference matches bit for bit)."""
    return torch.float64 if torch.float64 in storage else torch.float32


def stack_scalars(values: Sequence[Tensor | float], device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """Gather per-tensor scalar state (e.g. step counts) into one column on ``device``."""
    parts = [
        v.detach().reshape(()).to(device=device, dtype=dtype) if isinstance(v, Tensor) else torch.tensor(float(v), dtype=dtype, device=device)
        for v in values
    ]
    return torch.stack(parts) if parts else torch.zeros(0, dtype=dtype, device=device)
