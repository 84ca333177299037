"""``MuOptimizer``: the planning half shared by every fastmup optimizer.

A subclass declares its algorithm (an :class:`~fastmup.plan.spec.AlgorithmSpec`:
columns, state buffers, scalar state), maps a param group to its columns
and names its update; this base class turns the user's param groups into
the per-tensor table of :mod:`fastmup.plan.batch` and hands each batch to
one backend.

The user's param groups are kept exactly as given (``group["lr"]`` is the
base learning rate, so any LR scheduler may set it absolutely); the μP
factors are per-tensor multipliers computed once from ``p.infshape``.
"""
from __future__ import annotations

import functools
import itertools
import math
import operator
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, TypedDict

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

import fastmup.ext as fastmup_ext
from fastmup.infshape_registry import explain_missing, find_infshape
from fastmup.optim import backend as backends
from fastmup.optim import clip as clipping
from fastmup.optim.mup_groups import regroup_state_dict
from fastmup.optim.multipliers import Family, Multiplier, mup_multipliers
from fastmup.optim import precision
from fastmup.plan.batch import Signature, TensorBatch, stack_scalars
from fastmup.plan.spec import STORAGE_BUFFERS, AlgorithmSpec, ParamStorage

try:  # DTensor (FSDP2) parameters are updated through their local shards
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch without distributed support
    _DTensor = None

__all__ = ["MuOptimizer", "MuOptions", "group_defaults"]

_GRAD = operator.attrgetter("grad")
_DTYPE = operator.attrgetter("dtype")
_PLAIN = (float, int, bool)  # hyperparameter values compared between steps as they are
#: state buffers whose dtype is their own, whatever the state dtype
_STORAGE_DTYPES = {name: dtype for name, dtype in STORAGE_BUFFERS.values()}
# Fused kernels specialise on 16-byte aligned addresses (vector loads); a new
# gradient that is not aligned where the last one was needs a new plan.
_ALIGNMENT = 16


@dataclass(eq=False)
class _PlanInputs:
    """What the batches of a plan were built from (not a plan: what tells
    whether the cached batches still hold), recorded when they were built.

    Gradients are held weakly: ``zero_grad(set_to_none=True)`` must free
    them, as it does with torch's optimizers."""

    group_keys: list
    params: list
    grad_refs: list  # weakref.ref to each param's grad at the last step (_NO_GRAD for none)
    grad_meta: list  # (dtype, shape, device, layout) a member's grad must have; None: not in the plan
    fused: list  # whether a member's batch runs a fused kernel (its grads must be contiguous and aligned)
    grad_ptrs: list  # their addresses (0: no grad)
    slot_dicts: list  # state[p] for every (p, key) slot of the plan
    slot_keys: list
    state_tensors: list
    tensors: list  # params and per-element state, as the kernels see them
    ptrs: list
    sharded: bool  # some param is a DTensor: kernels see local shards
    # what _bind_same_kind compares (built with the plan, _grad_kinds; (): not applicable)
    grad_kinds: Optional[tuple] = None
    # the compiled checks (fastmup.ext.plan_checks; None: the Python ones) and what they compare
    checks: Any = None
    ptr_array: Optional[np.ndarray] = None  # ``ptrs``
    compiled_kinds: Optional[tuple] = None  # bind_grads' dtype, numel, device and fused columns; None: not applicable
    spare: Optional[tuple] = None  # (addresses, present) arrays bind_grads writes


#: (dtype, device) -> (dtype code, device code) of the compiled checks
_KIND_CODES: dict = {}


def _kind_codes(checks: Any, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """How the compiled checks see a gradient of ``dtype`` on ``device``."""
    key = (dtype, device)
    codes = _KIND_CODES.get(key)
    if codes is None:
        dtypes, _numels, devices = checks.kinds([torch.empty(0, dtype=dtype, device=device)])
        codes = _KIND_CODES[key] = (int(dtypes[0]), int(devices[0]))
    return codes


def _NO_GRAD() -> None:
    """Stands for the weak reference of an absent gradient."""
    return None


def _grad_ref(g: Optional[Tensor]):
    return _NO_GRAD if g is None else weakref.ref(g)


def _address(g: Optional[Tensor]) -> int:
    """A gradient's address as the plan records it (0: none, or sparse)."""
    return 0 if g is None or g.layout != torch.strided else g.data_ptr()


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """The tensor a kernel updates: a DTensor's local shard (FSDP2), else ``t``.

    ``to_local()`` shares storage with the DTensor, so updating it in place
    updates the sharded parameter or state."""
    if t is not None and _DTensor is not None and isinstance(t, _DTensor):
        return t.to_local()
    return t


class MuOptions(TypedDict, total=False):
    """The keyword options every fastmup optimizer takes besides torch's,
    with the defaults of :class:`MuOptimizer`'s constructor, where they are
    checked; a subclass constructor takes them as
    ``**options: Unpack[MuOptions]`` and hands them on.

    * ``backend`` (``"auto"``): ``"auto"``, ``"eager"``, ``"triton"``,
      ``"cpu"`` or ``"cuda"`` (:mod:`fastmup.optim.backend`);
    * ``state_dtype`` (``None``: each parameter's dtype): the dtype of the
      per-element state buffers;
    * ``param_lr_scales`` (``None``): extra per-tensor learning-rate
      factors (finite, >= 0), applied in the same launch as μP's;
    * ``stochastic_rounding`` (``False``), ``master_weights`` (``None``,
      ``"fp32"`` or ``"remainder"``), ``rounding_seed`` (``0``): how
      bf16/fp16 parameters are stored (:mod:`fastmup.optim.precision`);
      an algorithm with ``_storage_modes = False`` refuses any other value.
    """

    backend: str
    state_dtype: Optional[torch.dtype]
    param_lr_scales: Optional[Mapping[Tensor, float]]
    stochastic_rounding: bool
    master_weights: Optional[str]
    rounding_seed: int


#: constructor arguments that are never param-group defaults (``__class__``
#: is the cell of a zero-argument ``super()``, which ``locals()`` shows)
_NOT_GROUP_KEYS = frozenset(("self", "params", "impl", "options", "__class__"))


def group_defaults(arguments: Mapping[str, Any], *, optimizer_wide: Iterable[str] = ()) -> dict[str, Any]:
    """The param-group defaults of a subclass constructor: its arguments
    (``locals()`` taken before any other local is bound), in the order of its
    signature, without ``self``, ``params``, ``impl``, the fastmup options
    (``**options``) and the ``optimizer_wide`` settings.  The signature is
    then the one list of a group's keys, as torch's ``defaults`` holds every
    hyperparameter its constructor takes."""
    skip = _NOT_GROUP_KEYS.union(optimizer_wide)
    return {key: value for key, value in arguments.items() if key not in skip}


def describe_param(p: Tensor, group: Mapping[str, Any], group_index: int, position: int) -> str:
    """A name for error messages: the parameter's name when the user gave
    ``named_parameters()``, else its place in the groups and its shape."""
    names = group.get("param_names")
    if names is not None and position < len(names):
        return f"parameter {names[position]!r} (shape {tuple(p.shape)})"
    return f"parameter #{position} of param group {group_index} (shape {tuple(p.shape)})"


class MuOptimizer(Optimizer):
    """Base class of the fastmup optimizers.

    Subclasses set ``family`` ("adam", "sgd" or "esgd": which μP rule
    applies) and ``spec`` (the algorithm: its columns, state buffers and
    scalar state), and implement :meth:`_validate` and :meth:`_update` (one
    batch, one backend); :meth:`_group_values` (a param group's value of
    every column) reads the columns of the same name unless overridden.
    A constructor takes its torch-style hyperparameters, builds ``defaults``
    from them with :func:`group_defaults` and hands the fastmup options
    (:class:`MuOptions`) on as ``**options``.  The step has three hooks,
    no-ops here:
    :meth:`_check_step` (every step, before anything is mutated),
    :meth:`_step_inputs` (per-batch inputs of the update, such as ESGD-M's
    HVPs) and :meth:`_after_step`.

    Low-precision parameters (:mod:`fastmup.optim.precision`): the param
    group keys ``stochastic_rounding`` (bool) and ``master_weights`` (None,
    ``"fp32"`` or ``"remainder"``), defaulting to the constructor's, choose
    how each bf16/fp16 parameter is stored; ``rounding_seed`` seeds the
    stochastic-rounding bits.  A subclass whose update cannot store
    parameters that way sets ``_storage_modes = False``.
    """

    family: Family
    spec: AlgorithmSpec
    _step_supports_amp_scaling = True
    #: whether the algorithm takes the low-precision parameter options
    _storage_modes = True

    def __init__(
        self,
        params: Iterable,
        defaults: dict[str, Any],
        *,
        backend: str = "auto",
        state_dtype: Optional[torch.dtype] = None,
        param_lr_scales: Optional[Mapping[Tensor, float]] = None,
        stochastic_rounding: bool = False,
        master_weights: Optional[str] = None,
        rounding_seed: int = 0,
    ) -> None:
        if not self._storage_modes:
            for name, value, default in (
                ("stochastic_rounding", stochastic_rounding, False),
                ("master_weights", master_weights, None),
                ("rounding_seed", rounding_seed, 0),
            ):
                if value != default:
                    raise NotImplementedError(f"{type(self).__name__} does not support {name}={value!r}")
        else:
            defaults = dict(defaults, stochastic_rounding=stochastic_rounding, master_weights=master_weights)
            precision.check_precision_options(defaults)
        if isinstance(rounding_seed, bool) or not isinstance(rounding_seed, int):
            raise ValueError(f"Invalid rounding_seed={rounding_seed!r}: must be an int")
        self.rounding_seed = rounding_seed
        # torch's order: the hyperparameters are checked before the params
        self._validate(defaults)
        if backend not in backends.NAMES:
            raise ValueError(f"backend={backend!r} is not one of {backends.NAMES}")
        if state_dtype is not None and not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
            raise ValueError(f"state_dtype must be a floating torch.dtype or None, got {state_dtype!r}")
        self._lr_scales: dict[Tensor, float] = {}
        if param_lr_scales is not None:
            for p, s in param_lr_scales.items():
                if not (isinstance(s, (int, float)) and math.isfinite(s) and s >= 0):
                    raise ValueError(f"param_lr_scales: scale {s!r} for a parameter of shape {tuple(p.shape)} must be a finite float >= 0")
                self._lr_scales[p] = float(s)
        self._mults: dict[Tensor, tuple[Multiplier, Multiplier]] = {}
        self._requested_backend = backend
        self.state_dtype = state_dtype
        self._reset_plan()
        super().__init__(params, defaults)
        devices = {p.device for g in self.param_groups for p in g["params"]}
        self.backend = backends.resolve(backend, devices)

    # ------------------------------------------------------------------
    # subclass interface
    # ------------------------------------------------------------------
    #: whether a tensor that has state but no gradient this step keeps its
    #: place in the plan (skipped in the launch) instead of forcing a re-plan
    _skips_tensors_without_grad = True

    def _validate(self, group: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming the bad hyperparameter."""

    def _group_values(self, group: Mapping[str, Any]) -> dict[str, float]:
        """The value of every column of ``spec`` for the tensors of ``group``:
        here the group's value of the same name (a subclass whose columns
        are derived, such as Adam's ``beta1`` from ``betas``, overrides it)."""
        return {column: group[column] for column in self.columns}

    def _update(self, batch: TensorBatch, grad_scale: Optional[Tensor], found_inf: Optional[Tensor], **inputs: Any) -> None:
        raise NotImplementedError

    def _check_step(self) -> None:
        """Validate what only this step can show (every step, before the plan)."""

    def _step_inputs(self, batches: list[TensorBatch]) -> list[dict[str, Any]]:
        """Per-batch keyword inputs of :meth:`_update` for this step."""
        return [{} for _ in batches]

    def _after_step(self) -> None:
        """Advance optimizer-wide counters once the step is done."""

    # ------------------------------------------------------------------
    # what the spec says
    # ------------------------------------------------------------------
    @property
    def columns(self) -> tuple[str, ...]:
        return self.spec.columns

    @property
    def scalar_state(self) -> dict[str, tuple[float, torch.dtype]]:
        """Per-tensor scalar state: key -> (initial value, dtype).  Each key
        lives in one device column per batch (``batch.scalars[key]``) and
        ``state[p][key]`` is a 0-d view into it, like torch's ``step``."""
        return self.spec.scalar_state

    def _state_keys(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        """The state buffers of the tensors of ``group``."""
        optional = self.spec.optional
        if optional is None:
            return self.spec.state
        return self.spec.state_keys(self._group_values(group)[optional.gate])

    def _fill_group_defaults(self, group: dict[str, Any]) -> None:
        """Complete a param group from an older or foreign state dict (keys
        added since, such as ``foreach`` or ``decoupled_wd``), as torch's
        optimizers do in ``__setstate__``."""
        for key, value in self.defaults.items():
            group.setdefault(key, value)

    # ------------------------------------------------------------------
    # pickling and deepcopy: configuration travels, plan caches are rebuilt
    # ------------------------------------------------------------------
    #: attributes that are caches of the plan (rebuilt on the next step)
    _PLAN_CACHES = ("_batches", "_plan_inputs", "_backend_ready", "_eager_noted", "_rows_from", "_pending_clip", "per_tensor_grad_norms")

    def _reset_plan(self) -> None:
        self._batches: list[TensorBatch] = []
        self._plan_inputs: Optional[_PlanInputs] = None
        # (batches, group values) the batches' rows were last written from
        self._rows_from: Optional[tuple[list[TensorBatch], list[tuple]]] = None
        self._backend_ready = False
        self._eager_noted = False
        self._pending_clip: Optional[clipping.PendingClip] = None
        #: the per-tensor gradient norms of the last ``clip_grad_norm_(..., per_tensor=True)``
        self.per_tensor_grad_norms: Optional[Tensor] = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        # torch keeps defaults, state and param groups; the rest of a fastmup
        # optimizer's configuration (backend, state dtype, μP multipliers,
        # subclass settings) travels too.  Hooks are not kept, as in torch.
        for key, value in self.__dict__.items():
            if key in state or key in self._PLAN_CACHES or key.startswith("_optimizer_") or key == "_zero_grad_profile_name":
                continue
            state[key] = value
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            self._fill_group_defaults(group)
        self._reset_plan()

    # ------------------------------------------------------------------
    # param groups: μP multipliers are computed when a group is added
    # ------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
            self._validate(merged)
            self._check_storage_options(merged)
        index = len(self.param_groups)
        super().add_param_group(param_group)  # torch's checks: types, names, duplicates, overlaps
        group = self.param_groups[-1]
        try:
            mults = self._group_multipliers(group["params"], group, index)
            for position, p in enumerate(group["params"]):
                self._check_storage(p, group, index, position)
        except BaseException:
            self.param_groups.pop()
            raise
        self._mults.update(mults)
        self._plan_inputs = None

    def _check_storage_options(self, group: Mapping[str, Any]) -> None:
        if self._storage_modes:
            precision.check_precision_options(group)
            return
        for name, default in (("stochastic_rounding", False), ("master_weights", None)):
            if group.get(name, default) != default:
                raise NotImplementedError(f"{type(self).__name__} does not support {name}={group[name]!r}")

    def _check_storage(self, p: Tensor, group: Mapping[str, Any], group_index: int, position: int) -> None:
        """The group's storage options fit ``p``'s dtype (ValueError naming both)."""
        if self._storage_modes and (group.get("stochastic_rounding") or group.get("master_weights")):
            precision.check_param_storage(p.dtype, group, describe_param(p, group, group_index, position))

    def _storage_of(self, p: Tensor, group: Mapping[str, Any]) -> str:
        """``p``'s storage mode (:class:`~fastmup.plan.spec.ParamStorage`)."""
        if not self._storage_modes:
            return ParamStorage.NEAREST
        return precision.param_storage(p.dtype, group)

    def sync_master_weights(self) -> None:
        """Set every master weight to its parameter's value (and every
        remainder to 0), after the parameters were changed outside the
        optimizer (e.g. loaded from a checkpoint without the optimizer).

        With ``master_weights="fp32"`` the master is the truth: a step
        overwrites the parameter with the master's rounded copy, so a change
        made to the parameter alone is lost unless this is called.  (With
        remainders a changed parameter keeps its new value, plus the old
        remainder's fraction of an ulp.)"""
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    st = self.state.get(p)
                    if not st:
                        continue
                    if precision.MASTER_BUFFER in st:
                        st[precision.MASTER_BUFFER].copy_(p.detach())
                    if precision.REMAINDER_BUFFER in st:
                        st[precision.REMAINDER_BUFFER].zero_()

    def _group_multipliers(self, tensors: list, group: Mapping[str, Any], group_index: int) -> dict:
        mults = {}
        for position, p in enumerate(tensors):
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer params must be Tensors, got {type(p).__name__} in param group {group_index}")
            where = describe_param(p, group, group_index, position)
            infshape = find_infshape(p)
            if infshape is None:
                raise ValueError(f"{where} has no μP base shapes (no `infshape` attribute): {explain_missing(p)}")
            try:
                lr_m, wd_m = mup_multipliers(
                    infshape,
                    self.family,
                    bool(group.get("decoupled_wd", False)),
                    decoupled_decay=bool(group.get("decoupled_weight_decay", False)),
                )
            except NotImplementedError as e:
                raise NotImplementedError(f"{where}: {e}") from None
            scale = self._lr_scales.get(p)
            if scale is not None:
                lr_m = Multiplier(lr_m.num * scale, lr_m.den)
            mults[p] = (lr_m, wd_m)
        return mults

    # ------------------------------------------------------------------
    # the plan
    # ------------------------------------------------------------------
    def _snapshot(self) -> _PlanInputs:
        """Record what the plan just built depends on."""
        params = [p for g in self.param_groups for p in g["params"]]
        member_sig = {p: b.signature for b in self._batches for p in b.owners}
        grads = [local(p.grad) for p in params]
        slots = [(self.state[p], k) for b in self._batches for p in b.owners for k in self.state[p]]
        state_tensors = [st[k] for st, k in slots]
        # Addresses of params and per-element state.  The scalar state
        # (``step``...) are views into the batch's own columns: their identity
        # (compared by _structure_is_current) says all.
        per_element = [st[k] for st, k in slots if k not in self.scalar_state and isinstance(st[k], Tensor)]
        tensors = [local(t) for t in params + per_element]
        meta = []
        for p in params:
            sig = member_sig.get(p)
            if sig is None:
                meta.append(None)
            else:
                layout = p.grad.layout if p.grad is not None else torch.strided
                meta.append((sig.grad_dtype, local(p).shape, sig.device, layout))
        return _PlanInputs(
            group_keys=[self._group_key(g) for g in self.param_groups],
            params=params,
            grad_refs=[_grad_ref(p.grad) for p in params],
            grad_meta=meta,
            fused=[p in member_sig and member_sig[p].backend != "eager" for p in params],
            grad_ptrs=[_address(g) for g in grads],
            slot_dicts=[st for st, _ in slots],
            slot_keys=[k for _, k in slots],
            state_tensors=state_tensors,
            tensors=tensors,
            ptrs=[t.data_ptr() for t in tensors],
            sharded=any(local(p) is not p for p in params),
        )

    def _group_key(self, group: Mapping[str, Any]) -> tuple:
        """What of a group the plan's structure depends on: its state buffers
        and its storage options."""
        return (self._state_keys(group), group.get("stochastic_rounding", False), group.get("master_weights"))

    def _structure_is_current(self, inputs: _PlanInputs) -> bool:
        """Cheap per-step check: the same groups, state objects and param /
        state addresses as when the plan was built (a new ``p.data`` or a
        replaced state buffer invalidate it)."""
        if [self._group_key(g) for g in self.param_groups] != inputs.group_keys:
            return False
        checks = inputs.checks
        if checks is not None:
            return checks.same_entries(inputs.slot_dicts, inputs.slot_keys, inputs.state_tensors) and checks.same_addresses(
                inputs.tensors, inputs.ptr_array
            )
        # map() over C-level callables: this runs every step, over every tensor
        if not all(map(operator.is_, map(dict.get, inputs.slot_dicts, inputs.slot_keys), inputs.state_tensors)):
            return False
        return list(map(Tensor.data_ptr, inputs.tensors)) == inputs.ptrs

    def _bind_grads(self, inputs: _PlanInputs) -> bool:
        """Point the plan at this step's gradients.

        The usual loop (``zero_grad(set_to_none=True)``, backward) makes new
        gradient tensors every step.  When they have the dtype, shape and
        device of the last ones (and, for fused batches, are contiguous and
        aligned wherever the last ones were), only the grad row of the
        batches' pointer tables is rewritten.  A member of the plan without a
        gradient now is skipped in the launch (:meth:`TensorBatch.set_active`).
        A param outside the plan that has a gradient now, or a gradient of
        another kind, re-plans (the caller rebuilds).
        """
        grads = list(map(_GRAD, inputs.params))
        if inputs.compiled_kinds is not None:
            if self._bind_compiled(inputs, grads):
                return True
            return self._bind_general(inputs, grads)
        locals_ = [None if g is None else local(g) for g in grads] if inputs.sharded else grads
        refs = inputs.grad_refs
        # the first gradient is the cheap test: after zero_grad(set_to_none=True) and a backward none is the same
        same = not grads or grads[0] is refs[0]()
        if same and all(map(operator.is_, grads, [ref() for ref in refs])) and all(map(operator.is_not, grads, [None] * len(grads))):
            # the same tensors: only their storage may have been swapped
            if list(map(_address, locals_)) == inputs.grad_ptrs:
                for batch in self._batches:
                    batch.grads = self._batch_grads(batch, inputs)
                return True
        if self._bind_same_kind(inputs, grads):
            return True
        return self._bind_general(inputs, grads)

    def _bind_general(self, inputs: _PlanInputs, grads: list) -> bool:
        """:meth:`_bind_grads` tensor by tensor: any gradient the plan has a
        place for (False: re-plan)."""
        locals_ = [None if g is None else local(g) for g in grads] if inputs.sharded else grads
        skips = self._skips_tensors_without_grad
        ptrs = []
        for g, meta, fused, old in zip(locals_, inputs.grad_meta, inputs.fused, inputs.grad_ptrs):
            if g is None:
                if meta is not None and not skips:
                    return False
                ptrs.append(0)
                continue
            if meta is None or (g.dtype, g.shape, g.device, g.layout) != meta:
                return False  # a gradient the plan has no place for
            if fused:
                if not g.is_contiguous():
                    return False
                ptr = g.data_ptr()
                if ptr % _ALIGNMENT and not old % _ALIGNMENT:
                    return False
            ptrs.append(_address(g))
        inputs.grad_refs = [_grad_ref(g) for g in grads]
        inputs.grad_ptrs = ptrs
        flat_ptrs = np.asarray(ptrs, dtype=np.int64)
        has_grad = np.fromiter((g is not None for g in grads), dtype=bool, count=len(grads))
        for batch in self._batches:  # batch.index: each tensor's place in the flat list
            batch.rebind_grads(self._batch_grads(batch, inputs), flat_ptrs[batch.index])
            batch.set_active(has_grad[batch.index])
        return True

    def _bind_compiled(self, inputs: _PlanInputs, grads: list) -> bool:
        """:meth:`_bind_same_kind` in one pass of the compiled checks
        (``csrc/plan/checks.cpp``), which also write the addresses."""
        previous = inputs.grad_ptrs
        if not isinstance(previous, np.ndarray):
            previous = np.asarray(previous, dtype=np.int64)
        addresses, present = inputs.spare
        count = inputs.checks.bind_grads(grads, *inputs.compiled_kinds, previous, addresses, present)
        if count < 0:
            return False
        every = count == len(grads)
        if not every and not self._skips_tensors_without_grad:
            return False
        inputs.grad_refs = list(map(weakref.ref, grads)) if every else [_grad_ref(g) for g in grads]
        inputs.grad_ptrs = addresses
        inputs.spare = (previous, present)  # written by the next step's call
        self._rebind_batches(grads, addresses, None if every else present.astype(bool), inputs.grad_kinds[5])
        return True

    def _rebind_batches(self, grads: list, addresses: np.ndarray, has_grad: Optional[np.ndarray], places: list) -> None:
        """Point each batch at its members' gradients (``places``: each
        batch's places in the flat list, None: all of it in order) and skip
        those without one (``has_grad`` False; None: every member has one)."""
        for batch, at in zip(self._batches, places):
            if at is None:
                batch.rebind_grads(grads, addresses)
                batch.set_active(has_grad)
            else:
                batch.rebind_grads(list(map(grads.__getitem__, at.tolist())), addresses[at])
                batch.set_active(None if has_grad is None else has_grad[at])

    def _compile_checks(self, inputs: _PlanInputs) -> None:
        """Give ``inputs`` the compiled checks (:func:`fastmup.ext.plan_checks`)
        when they are available and the plan allows them (no DTensor
        shards, every member a dense gradient place)."""
        checks = fastmup_ext.plan_checks()
        if checks is None or inputs.sharded:
            return
        inputs.checks = checks
        inputs.ptr_array = np.asarray(inputs.ptrs, dtype=np.int64)
        if not inputs.grad_kinds:
            return
        _dtypes, numels, _devices, _fused_at, fused_mask, _places = inputs.grad_kinds
        codes = [_kind_codes(checks, m[0], m[2]) for m in inputs.grad_meta]
        n = len(codes)
        inputs.compiled_kinds = (
            np.fromiter((c[0] for c in codes), dtype=np.int8, count=n),
            np.asarray(numels, dtype=np.int64).reshape(n),
            np.fromiter((c[1] for c in codes), dtype=np.int64, count=n),
            np.asarray(fused_mask, dtype=np.uint8).reshape(n),
        )
        inputs.spare = (np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.uint8))

    def _bind_same_kind(self, inputs: _PlanInputs, grads: list) -> bool:
        """:meth:`_bind_grads` for the usual step: every member of the plan
        has a dense gradient of the dtype, shape and device it had (contiguous
        where fused), and none is misaligned where the last one was aligned.
        The checks run as C-level maps over the whole list: a Python loop
        costs about a microsecond per tensor, every step, which is most of a
        small tensor's step.  False: take the general path (which also
        explains what is wrong).
        """
        kinds = inputs.grad_kinds
        if kinds is None:
            kinds = inputs.grad_kinds = self._grad_kinds(inputs)
        if not kinds:
            return False
        dtypes, numels, devices, fused_at, fused_mask, places = kinds
        every = all(map(operator.is_not, grads, itertools.repeat(None)))
        if not every:
            present = list(map(operator.is_not, grads, itertools.repeat(None)))
            if not self._skips_tensors_without_grad:
                return False
            # a member without a gradient keeps its place, skipped (set_active)
            dtypes, numels, devices = (list(itertools.compress(x, present)) for x in (dtypes, numels, devices))
            fused_at = list(itertools.compress(range(len(grads)), map(operator.and_, inputs.fused, present)))
        given = grads if every else list(itertools.compress(grads, present))
        try:
            if (
                list(map(_DTYPE, given)) != dtypes
                or list(map(Tensor.numel, given)) != numels
                or list(map(Tensor.get_device, given)) != devices
                or not all(map(Tensor.is_contiguous, grads if fused_at is None else map(grads.__getitem__, fused_at)))
            ):
                return False
            ptrs = list(map(Tensor.data_ptr, given))  # raises for a sparse gradient
        except RuntimeError:
            return False
        if every:
            flat_ptrs = np.array(ptrs, dtype=np.int64)
            has_grad = None
        else:
            has_grad = np.array(present, dtype=bool)
            flat_ptrs = np.zeros(len(grads), dtype=np.int64)
            flat_ptrs[has_grad] = ptrs
            ptrs = flat_ptrs.tolist()
        misaligned = (flat_ptrs & (_ALIGNMENT - 1)) != 0  # addresses are non-negative: the low bits are the remainder
        # (all aligned, the usual case: one test instead of the comparison with the last addresses)
        if misaligned.any() and np.any(fused_mask & misaligned & (np.array(inputs.grad_ptrs, dtype=np.int64) % _ALIGNMENT == 0)):
            return False
        if every:
            inputs.grad_refs = list(map(weakref.ref, grads))
        elif len(grads) - len(given) <= 16:  # a few places without a gradient, filled in in order
            refs = list(map(weakref.ref, given))
            for i in itertools.compress(range(len(grads)), map(operator.not_, present)):
                refs.insert(i, _NO_GRAD)
            inputs.grad_refs = refs
        else:
            inputs.grad_refs = [_grad_ref(g) for g in grads]
        inputs.grad_ptrs = ptrs
        self._rebind_batches(grads, flat_ptrs, has_grad, places)
        return True

    def _grad_kinds(self, inputs: _PlanInputs) -> tuple:
        """What :meth:`_bind_same_kind` compares the gradients with (``()``:
        not applicable), derived from the plan: built with it (a loop over
        the tensors, which would otherwise land on the second step)."""
        metas = inputs.grad_meta
        if inputs.sharded or any(m is None or m[3] != torch.strided for m in metas):
            return ()  # members without a place, sparse grads: the general path, always
        flat = list(range(len(metas)))
        return (
            [m[0] for m in metas],
            [math.prod(m[1]) for m in metas],
            [-1 if m[2].type == "cpu" else m[2].index for m in metas],  # as Tensor.get_device
            None if all(inputs.fused) else [i for i, f in enumerate(inputs.fused) if f],
            np.asarray(inputs.fused, dtype=bool),
            # each batch's places in the flat list (None: all of it, in order)
            [None if list(b.index) == flat else np.asarray(b.index, dtype=np.int64) for b in self._batches],
        )

    @staticmethod
    def _batch_grads(batch: TensorBatch, inputs: _PlanInputs) -> list[Optional[Tensor]]:
        if inputs.sharded:
            return [local(p.grad) for p in batch.owners]
        return list(map(_GRAD, batch.owners))

    def _release_grads(self) -> None:
        """Drop the batches' references to the gradients after a step."""
        for batch in self._batches:
            batch.grads = []

    def _state_dtype_for(self, p: Tensor) -> torch.dtype:
        return self.state_dtype or p.dtype

    def _with_grads_and_storage(self) -> Iterator[tuple[Tensor, Tensor, Callable[[], str], str]]:
        """:meth:`_with_grads` with each param's storage mode."""
        for gi, group in enumerate(self.param_groups):
            for position, p in enumerate(group["params"]):
                if p.grad is not None:
                    yield p, p.grad, functools.partial(describe_param, p, group, gi, position), self._storage_of(p, group)

    def _with_grads(self) -> Iterator[tuple[Tensor, Tensor, Callable[[], str]]]:
        """``(param, grad, where)`` for every param with a gradient, in group
        order; ``where()`` names the param for an error message (built only
        on failure: ESGD-M checks every step)."""
        for gi, group in enumerate(self.param_groups):
            for position, p in enumerate(group["params"]):
                if p.grad is not None:
                    yield p, p.grad, functools.partial(describe_param, p, group, gi, position)

    #: the algorithm takes sparse gradients on the eager path (torch's SGD does)
    _sparse_grads = False

    def _check(self) -> None:
        """Validate every tensor of the next step before anything is mutated."""
        explicit_fused = self._requested_backend != "auto" and self.backend != "eager"
        if self._storage_modes:
            for gi, group in enumerate(self.param_groups):
                if group.get("stochastic_rounding") or group.get("master_weights"):
                    for position, p in enumerate(group["params"]):
                        if p.grad is not None:
                            self._check_storage(p, group, gi, position)
        for p, g, where, storage in self._with_grads_and_storage():
            if g.layout != torch.strided and (explicit_fused or not self._sparse_grads):
                raise RuntimeError(
                    f"{where()} has a sparse gradient ({g.layout}); "
                    + (
                        f"backend {self.backend!r} supports dense gradients only (use backend='auto' or 'eager')"
                        if self._sparse_grads
                        else f"{type(self).__name__} does not support sparse gradients (as torch's)"
                    )
                )
            if g.shape != p.shape:
                raise RuntimeError(f"{where()} has a gradient of shape {tuple(g.shape)}")
            if not p.is_floating_point() or not g.is_floating_point():
                raise TypeError(
                    f"{where()}: fastmup optimizers need real floating-point params and grads, got {p.dtype}/{g.dtype}"
                    + (" (complex parameters are not supported: optimize torch.view_as_real(p) instead)" if p.is_complex() else "")
                )
            if g.device != p.device:
                raise RuntimeError(f"{where()} is on {p.device} but its gradient is on {g.device}")
            if explicit_fused:
                refusal = backends.fused_refusal(local(p), local(g), self._state_dtype_for(p), storage, self.backend)
                if refusal is not None:
                    raise refusal.error(
                        f"{where()}: backend {self.backend!r} cannot step it ({refusal.reason}); "
                        "use backend='auto' (which steps such tensors on the eager path) or backend='eager'"
                    )

    def _init_state(self, p: Tensor, group: Mapping[str, Any]) -> None:
        state = self.state[p]
        dtype = self._state_dtype_for(p)
        for key in self._state_keys(group):
            if state.get(key) is None:
                state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        for key, (initial, dtype) in self.scalar_state.items():
            if key not in state:
                state[key] = torch.full((), initial, dtype=dtype, device=p.device)
        if self._storage_modes:
            # a master weight starts as the parameter (as after loading a torch.optim state)
            precision.init_storage_state(p, self._storage_of(p, group), state)

    def _ensure_backend(self) -> None:
        """Build the compiled backend before its first step.  Under
        ``backend="auto"`` a failed build (no working compiler, an unwritable
        cache directory...) falls back to the eager reference with one
        warning that says why; a requested backend raises."""
        if self._backend_ready:
            return
        if self.backend in ("cpu", "cuda"):
            try:
                from fastmup import ext

                ext.load(self.backend)
            except Exception as e:  # noqa: BLE001
                if self._requested_backend != "auto":
                    raise
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                warnings.warn(
                    f"fastmup: the {self.backend!r} backend could not be built ({reason}); backend='auto' "
                    "uses the eager reference instead",
                    RuntimeWarning,
                    stacklevel=4,
                )
                self.backend = "eager"
        self._backend_ready = True

    def _backend_for(self, p: Tensor, g: Tensor, storage: str, refused: dict[str, int]) -> str:
        """The backend of ``p``'s batch: under ``auto``, a tensor the fused
        backend cannot take runs on the eager path in the same step."""
        if self.backend == "eager" or self._requested_backend != "auto":
            return self.backend
        refusal = backends.fused_refusal(local(p), local(g), self._state_dtype_for(p), storage, self.backend)
        if refusal is None:
            return self.backend
        refused[refusal.reason] = refused.get(refusal.reason, 0) + 1
        return "eager"

    def _build_plan(self) -> list[TensorBatch]:
        self._check()
        self._ensure_backend()
        skips = self._skips_tensors_without_grad
        previous = {p: b.signature for b in self._batches for p in b.owners} if skips else {}
        members: dict[Signature, list[tuple[int, int, Tensor, dict]]] = {}
        refused: dict[str, int] = {}
        flat = 0
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is not None:
                    self._init_state(p, group)
                    device = local(p).device
                    storage = self._storage_of(p, group)
                    backend = self._backend_for(p, p.grad, storage, refused)
                    sig = Signature(device, p.dtype, p.grad.dtype, self._state_dtype_for(p), backend, storage)
                    members.setdefault(sig, []).append((flat, gi, p, group))
                elif p in previous and p in self.state:
                    # keeps its place: skipped while it has no gradient
                    self._init_state(p, group)
                    members.setdefault(previous[p], []).append((flat, gi, p, group))
                flat += 1
        if refused and not self._eager_noted:
            self._eager_noted = True
            what = ", ".join(f"{n} {why}" for why, n in refused.items())
            warnings.warn(
                f"fastmup: backend='auto' steps some tensors on the eager reference path ({what}); "
                f"the others run on {self.backend!r}",
                RuntimeWarning,
                stacklevel=4,
            )
        batches = []
        for sig, entries in members.items():
            params = [p for _, _, p, _ in entries]
            st = [self.state[p] for p in params]
            state_keys = sorted({k for _, _, _, g in entries for k in self._state_keys(g)})
            if sig.storage in STORAGE_BUFFERS:
                state_keys.append(STORAGE_BUFFERS[sig.storage][0])
            scalars = {}
            for key, (_, dtype) in self.scalar_state.items():
                scalars[key] = stack_scalars([self.state[p][key] for p in params], sig.device, dtype)
                for i, p in enumerate(params):
                    self.state[p][key] = scalars[key][i]
            batch = TensorBatch(
                signature=sig,
                spec=self.spec,
                columns=self.columns,
                index=[f for f, _, _, _ in entries],
                params=[local(p) for p in params],
                grads=[local(p.grad) for p in params],
                state={k: [local(s.get(k)) for s in st] for k in state_keys},
                owners=params,
                rows=np.zeros((len(params), len(self.columns)), dtype=np.float64),
                steps=scalars["step"],
                scalars=scalars,
                rounding_seed=self.rounding_seed,
                rounding_prefix=precision.seed_prefix(self.rounding_seed),
                group_index=np.array([gi for _, gi, _, _ in entries], dtype=np.int64),
                lr_num=np.array([self._mults[p][0].num for p in params]),
                lr_den=np.array([self._mults[p][0].den for p in params]),
                wd_num=np.array([self._mults[p][1].num for p in params]),
                wd_den=np.array([self._mults[p][1].den for p in params]),
            )
            batch.set_active(np.array([p.grad is not None for p in params], dtype=bool))
            batches.append(batch)
        return batches

    @torch.compiler.disable
    def _plan(self) -> list[TensorBatch]:
        """The batches of this step, their ``grads`` bound to the current
        gradients (:meth:`_release_grads` drops them after the step).

        Host-side bookkeeping over weak references and addresses: a compiled
        training loop runs it as it is, never traced (a guard on a weak
        reference that has died since would fail)."""
        inputs = self._plan_inputs
        if inputs is None or not self._structure_is_current(inputs) or not self._bind_grads(inputs):
            self._plan_inputs = None
            self._batches = self._build_plan()
            inputs = self._snapshot()
            inputs.grad_kinds = self._grad_kinds(inputs)
            self._compile_checks(inputs)
            self._plan_inputs = inputs
        return self._batches

    def _refresh_rows(self, batches: list[TensorBatch]) -> bool:
        """Write this step's per-tensor hyperparameters into each batch's rows.

        Returns False when the rows already hold them (nothing written)."""
        values = [self._group_values(group) for group in self.param_groups]
        # A Tensor lr (capturable training) stays on the device for the
        # backends whose kernels read the table there: they compute that
        # column on the device, so a step never syncs on it.  The host
        # backends (eager, cpu) read it here.
        device_lr = [g["lr"] if isinstance(g["lr"], Tensor) else None for g in self.param_groups]
        tensor_lr = any(lr is not None for lr in device_lr)
        # Unchanged group values (most steps without a scheduler): the rows are
        # as written.  Only plain numbers are compared (a tensor can change in place).
        written = None if tensor_lr else [tuple(v[c] for c in self.columns) for v in values]
        if written is not None and not all(type(x) in _PLAIN for row in written for x in row):
            written = None
        if written is not None and self._rows_from is not None and self._rows_from[0] is batches and self._rows_from[1] == written:
            return False
        self._rows_from = None
        tables: dict[bool, np.ndarray] = {}

        def table(on_device: bool) -> np.ndarray:
            if on_device not in tables:
                rows = [
                    [math.nan if (c == "lr" and on_device) else float(v[c]) for c in self.columns] for v in values
                ]
                tables[on_device] = np.array(rows, dtype=np.float64).reshape(len(values), len(self.columns))
            return tables[on_device]

        lr, wd = self.columns.index("lr"), self.columns.index("weight_decay")
        for batch in batches:
            on_device = tensor_lr and batch.backend in backends.DEVICE_TABLE_BACKENDS
            rows = table(on_device)[batch.group_index]
            rows[:, lr] = rows[:, lr] * batch.lr_num / batch.lr_den
            rows[:, wd] = rows[:, wd] * batch.wd_num / batch.wd_den
            batch.rows[...] = rows
            batch.device_lr = (
                [lr_ if lr_ is not None else torch.tensor(float(g["lr"])) for lr_, g in zip(device_lr, self.param_groups)]
                if on_device
                else None
            )
        if written is not None:
            self._rows_from = (batches, written)
        return True

    # ------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Perform one optimization step (one fused launch per batch)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Optional[Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[Tensor] = getattr(self, "found_inf", None)
        self._check_step()
        batches = self._plan()
        self._bind_clip(batches)
        # an update that advances its own scalar state counts the step itself
        # (and writes nothing, on the device, when found_inf is set)
        counts_steps = not self.spec.advances_scalars
        try:
            if batches:
                self._refresh_rows(batches)
                inputs = self._step_inputs(batches)
            eager_skips: Optional[bool] = None
            for batch, batch_inputs in zip(batches, inputs if batches else ()):
                batch_inf = found_inf
                if found_inf is not None and batch.backend == "eager":
                    # The reference path is allowed a host sync; fused paths skip on device.
                    if eager_skips is None:
                        eager_skips = bool(found_inf.item())
                    if eager_skips:
                        continue
                    batch_inf = None
                if counts_steps:
                    batch.advance_steps()
                if batch.has_work or not counts_steps:
                    self._update(batch, grad_scale, batch_inf, **batch_inputs)
                if batch_inf is not None and counts_steps:
                    batch.retract_steps(batch_inf)
        finally:
            self._release_grads()  # the grads of a step may carry autograd graphs: never keep them
            for batch in batches:
                batch.grad_clip = None
        self._after_step()
        return loss

    # ------------------------------------------------------------------
    # gradient clipping, deferred into the next step
    # ------------------------------------------------------------------
    @torch.no_grad()
    def clip_grad_norm_(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        foreach: Optional[bool] = None,
        *,
        grad_scaler: Optional[Any] = None,
        per_tensor: bool = False,
    ) -> Tensor:
        """Clip the gradient norm of every parameter of the optimizer, as
        ``torch.nn.utils.clip_grad_norm_(opt's params, max_norm, ...)``, with
        the multiplication deferred into the next :meth:`step`.

        Computes ``norm = (Σ |g|^p)^(1/p)`` over the raw gradients of every
        param group (``max |g|`` for ``inf``; μP multipliers play no part), one
        fused reduction per batch on the launch plans of the step, and returns
        it (a device tensor, in the dtype torch returns).  Instead of
        rewriting the gradients, ``coef = min(1, max_norm / (norm + 1e-6))``
        stays on the device and the next ``step()``'s update kernels read
        ``round_to_grad_dtype(g · coef)`` where they read ``g`` anyway: the
        parameters and state end bit-identical to clipping in place
        (``fastmup.clip_grad_norm_`` with the same backend) and then stepping.
        No host sync (unless ``error_if_nonfinite``: torch's error, raised
        before anything is deferred); capturable in a CUDA graph.

        ``grad_scaler``: with AMP's fused unscaling (``scaler.step(opt)``
        without ``scaler.unscale_(opt)`` first) the gradients are still
        scaled: pass the scaler and the norm is that of the unscaled
        gradients (Σ|g|^p / scale^p); after ``scaler.unscale_(opt)`` it is not
        needed.  A step GradScaler skips (inf/nan) consumes the coefficient.
        ``per_tensor=True`` also leaves every parameter's gradient norm in
        :attr:`per_tensor_grad_norms` (float32 device tensor in the order of
        the param groups, 0 without a gradient).

        The coefficient applies to the gradients it was computed from: a
        step whose gradients were replaced since (``zero_grad``, a closure)
        drops it with a warning.
        """
        return clipping.defer(self, max_norm, norm_type, error_if_nonfinite, foreach, grad_scaler, per_tensor)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; a deferred clip coefficient goes with the gradients."""
        self._pending_clip = None
        super().zero_grad(set_to_none)

    def _bind_clip(self, batches: list[TensorBatch]) -> None:
        """Hand a pending clip coefficient to this step's batches."""
        pending = self._pending_clip
        if pending is None:
            return
        self._pending_clip = None
        if not pending.still_current(self._plan_inputs):
            warnings.warn(
                "fastmup: the gradients changed between clip_grad_norm_() and step(); the step runs unclipped",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        for batch in batches:
            batch.grad_clip = pending.coef[batch.device]

    # ------------------------------------------------------------------
    # the table, as the user reads it
    # ------------------------------------------------------------------
    def tensor_hyperparameters(self) -> dict[Tensor, dict[str, float]]:
        """Every parameter's hyperparameters as the next step applies them.

        For each parameter of the param groups (in group order): the value of
        every column of the algorithm (``opt.spec.columns``), with ``lr`` and
        ``weight_decay`` multiplied by the parameter's μP factors and any
        ``param_lr_scales``.  A Tensor lr is read on the host (one sync).
        """
        out: dict[Tensor, dict[str, float]] = {}
        for group in self.param_groups:
            values = {c: float(v) for c, v in self._group_values(group).items()}
            for p in group["params"]:
                lr_m, wd_m = self._mults[p]
                out[p] = {
                    **values,
                    "lr": values["lr"] * lr_m.num / lr_m.den,
                    "weight_decay": values["weight_decay"] * wd_m.num / wd_m.den,
                }
        return out

    # ------------------------------------------------------------------
    # state_dict: keep the state's own dtype (torch casts state to the
    # param's dtype on load, which would round fp32 state of bf16 params)
    # ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict``, plus ``"precision"``: the seed of the
        stochastic-rounding bits (master weights and remainders are per-tensor
        state, ``master_weight`` fp32 and ``weight_remainder`` int16).

        ``torch.optim`` optimizers load it and ignore those two buffers
        (keeping them unused, cast to the parameter's dtype): training
        continues from the bf16/fp16 parameters and the low bits are lost;
        :func:`fastmup.optim.precision.strip_master_weights` removes them
        first.  Back in fastmup, a master or remainder that is no longer fp32
        / int16 is such a cast copy: it is dropped and built again from the
        parameter, as for a state without them."""
        sd = super().state_dict()
        if self._storage_modes:
            sd["precision"] = {"rounding_seed": self.rounding_seed}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = regroup_state_dict(self, state_dict)  # a mup optimizer's layout, if it is one
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, the optimizer has {len(self.param_groups)}"
            )
        id_map = {}
        for gi, (sg, g) in enumerate(zip(saved_groups, self.param_groups)):
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(
                    f"param group {gi}: the loaded state dict has {len(sg['params'])} parameters, the optimizer has {len(g['params'])}"
                )
            id_map.update(zip(sg["params"], g["params"]))
        saved_state = state_dict["state"]
        for gi, sg in enumerate(saved_groups):
            merged = {**self.defaults, **{k: v for k, v in sg.items() if k != "params"}}
            self._validate(merged)
            self._check_storage_options(merged)
        extra = state_dict.get("precision")
        seed = self.rounding_seed
        if isinstance(extra, Mapping) and "rounding_seed" in extra:
            seed = extra["rounding_seed"]
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ValueError(f"loaded state dict: invalid rounding_seed={seed!r} (must be an int)")
        super().load_state_dict(state_dict)
        self.rounding_seed = seed
        for gi, group in enumerate(self.param_groups):
            self._mults.update(self._group_multipliers(group["params"], group, gi))
        warned = False
        for pid, values in saved_state.items():
            p = id_map.get(pid)
            if p is None:
                continue
            restored = {}
            dropped: list[str] = []
            for key, value in values.items():
                if not isinstance(value, Tensor):
                    if key in self.scalar_state:  # a plain number (older checkpoints): a tensor, as torch does
                        value = torch.tensor(float(value), dtype=self.scalar_state[key][1], device=p.device)
                    restored[key] = value
                elif key in self.scalar_state:
                    dtype = self.scalar_state[key][1]
                    restored[key] = value.detach().to(device=p.device, dtype=dtype).clone()
                elif key in _STORAGE_DTYPES:
                    if value.dtype != _STORAGE_DTYPES[key] or value.shape != p.shape:
                        dropped.append(key)  # cast by torch.optim: built again from the parameter
                        continue
                    restored[key] = value.detach().to(device=p.device).clone()
                else:
                    restored[key] = value.detach().to(device=p.device, dtype=self._state_dtype_for(p)).clone()
            self.state[p] = restored
            if dropped and not warned:
                warned = True
                warnings.warn(
                    f"fastmup: the loaded state's {', '.join(sorted(set(dropped)))} is not "
                    f"{' / '.join(str(_STORAGE_DTYPES[k]) for k in sorted(set(dropped)))} (another optimizer cast it): "
                    "dropped, and built again from the parameters at the next step",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self._reset_plan()
