"""Gradient-norm clipping: the norm as one fused reduction per dtype signature.

:func:`clip_grad_norm_` is ``torch.nn.utils.clip_grad_norm_`` (same
signature, results and errors) with the norm computed by one multi-tensor
launch per (device, gradient dtype) in the fused backends.  For norm type
``p`` and gradients ``g``::

    norm = (Σ_tensors Σ_elements |g|^p)^(1/p)        (p = inf: max |g|)
    coef = min(1, max_norm / (norm + 1e-6))
    g    ← g · coef                                   (in place)

The sums run in float64 (each term of an fp32 gradient is exact there) and
the norm is rounded once to float32, so the result equals torch's float32
norm to its own rounding; the coefficient is computed from that float32
norm with torch's operations.  torch returns the norm in the gradients'
dtype (its per-tensor norms are rounded to bf16/fp16 for 16-bit gradients,
and so are its norm and coefficient); fastmup returns the norm in that same
dtype, computed and applied in float32.  The multiplication rounds once:
``g ← round_to_dtype(float32(g) · coef)``, as torch's in-place multiply of
a 16-bit tensor by a float32 scalar on the CPU.

The same reduction serves the optimizers' deferred clipping
(``MuOptimizer.clip_grad_norm_``), which reads the launch plans of the
optimizer's batches instead of building its own: see
:mod:`fastmup.optim.optimizer`.

Backends: ``eager`` is torch's own function; ``triton``
(:mod:`fastmup.kernels.grad_norm`), ``cuda`` and ``cpu`` (``csrc/grad_norm.h``)
launch one reduction per dtype signature, chained on a float64 running total
so that the last launch of a device also writes the norm and the
coefficient: no host sync, capturable in a CUDA graph.  Norm types other
than 2, 1 and inf, float64, sparse, non-contiguous or DTensor gradients go
to torch's function.
"""
from __future__ import annotations

import functools
import math
import operator
import weakref
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from fastmup.optim import backend as backends
from fastmup.plan import norm as norm_plans
from fastmup.plan.norm import NormPlan

__all__ = ["clip_grad_norm_", "FUSED_NORM_TYPES"]

#: norm types the fused reductions compute (code of csrc/grad_norm.h NormKind)
FUSED_NORM_TYPES = {math.inf: 0, 1.0: 1, 2.0: 2}

_TensorOrTensors = Union[Tensor, Iterable[Tensor]]


def _nonfinite_error(norm_type: float) -> RuntimeError:
    # torch's wording
    return RuntimeError(
        f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
        "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
        "`error_if_nonfinite=False`"
    )


def check_nonfinite(total: Tensor, norm_type: float) -> None:
    """torch's ``error_if_nonfinite`` check (one host sync, only when asked for)."""
    if torch.logical_or(total.isnan(), total.isinf()):
        raise _nonfinite_error(norm_type)


# ----------------------------------------------------------------------
# one launch per plan, in the backend of the plan
# ----------------------------------------------------------------------
def block_for(backend: str, total_elements: int) -> int:
    """The block-map entry size of ``backend``'s reduction (the update
    kernels' own, so that an optimizer's clipping shares their launch plans)."""
    if backend == "triton":
        from fastmup.kernels import grad_norm

        return grad_norm.BLOCK
    from fastmup import ext

    module = ext.load(backend)
    if backend == "cpu":
        return ext.host_block(int(module.BLOCK), total_elements, torch.get_num_threads())
    return int(module.BLOCK)


def launch(
    backend: str,
    plan: NormPlan,
    *,
    norm_type: float,
    acc: Tensor,
    has_acc: bool,
    result: Optional[Tensor] = None,
    max_norm: float = 0.0,
    norms: Optional[Tensor] = None,
) -> None:
    """One reduction of ``plan`` in ``backend``, added to ``acc`` (float64 [1];
    set when ``has_acc`` is False).  ``result`` (float32 [2]): this is the
    last launch; the norm and clip coefficient go there.  ``norms``: every
    tensor's norm goes to ``norms[plan.norms_index[i]]``."""
    if plan.nblocks == 0:  # nothing to read
        if not has_acc:
            acc.zero_()
        if result is not None:
            finish(acc, result, max_norm, norm_type)
        return
    if backend == "triton":
        from fastmup.kernels import grad_norm

        grad_norm.launch(plan, norm_type=norm_type, acc=acc, has_acc=has_acc, result=result, max_norm=max_norm, norms=norms)
        return
    from fastmup import ext

    module = ext.load(backend)
    fixed = plan.fixed_args
    if fixed is None:  # what every launch of this plan passes unchanged
        codes = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
        fixed = plan.fixed_args = dict(
            ntensors=plan.n_tensors,
            nblocks=plan.nblocks,
            block=plan.block,
            tensor_of_block=plan.tensor_of_block.data_ptr(),
            start_of_block=plan.start_of_block.data_ptr(),
            numels=plan.numels.data_ptr(),
            grad_ptrs=plan.grad_ptrs.data_ptr(),
            first_entry=plan.first_entry_host.ctypes.data if backend == "cpu" else plan.first_entry.data_ptr(),
            counted=plan.n_counted,
            grad_dtype=codes[plan.grad_dtype],
            partials=plan.partials.data_ptr(),
            sums=plan.sums.data_ptr(),
            tickets=plan.tickets.data_ptr(),
            counter=plan.counter.data_ptr(),
            norms_index=plan.norms_index.data_ptr(),
        )
    args = dict(
        fixed,
        norm=FUSED_NORM_TYPES[float(norm_type)],
        acc=acc.data_ptr(),
        has_acc=int(has_acc),
        result=0 if result is None else result.data_ptr(),
        max_norm=float(max_norm),
        norms=0 if norms is None else norms.data_ptr(),
    )
    if backend == "cpu":
        module.grad_norm(**args, nthreads=torch.get_num_threads())
    else:
        device = plan.device
        index = device.index if device.index is not None else torch.cuda.current_device()
        module.grad_norm(**args, device=index, stream=torch.cuda.current_stream(index).cuda_stream)


def eager_power_sum(grads: Sequence[Tensor], norm_type: float) -> Tensor:
    """Σ |g|^p (max |g| for inf) over ``grads`` in float64, on their device:
    what a fused launch adds to the running total, for tensors that run on
    the eager path (float64 gradients...)."""
    device = grads[0].device
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    if norm_type == math.inf:
        parts = [g.detach().abs().amax().double() if g.numel() else g.new_zeros((), dtype=torch.float64) for g in grads]
        return torch.stack(parts).amax() if len(parts) > 1 else parts[0]
    parts = [torch.linalg.vector_norm(g.detach().double(), norm_type) ** norm_type for g in grads]
    return torch.stack(parts).sum()


def finish(acc: Tensor, result: Tensor, max_norm: float, norm_type: float) -> None:
    """The epilogue of a final launch in torch ops: ``result = (norm, coef)``
    from the float64 total ``acc`` (for a total that did not come from one
    chain of launches: several devices, a sharded model, eager batches only)."""
    total = acc.reshape(())
    norm = (total.sqrt() if norm_type == 2.0 else total).to(torch.float32)
    coef = torch.clamp((norm + 1e-6).reciprocal() * float(max_norm), max=1.0)
    result[0] = norm
    result[1] = coef


def multiply_(grads: Sequence[Tensor], coef: Tensor) -> None:
    """``g ← round(float32(g) · coef)`` in place, for every gradient (``coef``:
    float32 0-d on their device).  What the update kernels compute when the
    coefficient is deferred into the step."""
    fp32 = [g for g in grads if g.dtype == torch.float32]
    if fp32:
        torch._foreach_mul_(fp32, coef)
    for g in grads:
        if g.dtype == torch.float32:
            continue
        if g.dtype == torch.float64:
            g.mul_(coef.to(torch.float64))
        else:
            g.copy_(g.float().mul_(coef))


# ----------------------------------------------------------------------
# fastmup.clip_grad_norm_
# ----------------------------------------------------------------------
def _fused_backend(requested: str, grads: Sequence[Tensor], norm_type: float, foreach: Optional[bool]) -> Optional[str]:
    """The fused backend for these grads, or None: torch's function."""
    if requested == "eager" or foreach is False or float(norm_type) not in FUSED_NORM_TYPES:
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()
    for g in grads:
        if isinstance(g, DTensor) or g.layout != torch.strided or not g.is_contiguous() or g.dtype not in backends.FUSED_DTYPES:
            if requested != "auto":
                raise RuntimeError(
                    f"fastmup.clip_grad_norm_: backend {requested!r} takes dense contiguous float32/bfloat16/float16 "
                    f"local gradients, got a {type(g).__name__} of {g.dtype} ({g.layout}, contiguous={g.is_contiguous()}); "
                    "use backend='auto' or 'eager'"
                )
            return None
    resolved = backends.resolve(requested, {g.device for g in grads})
    if resolved in ("cpu", "cuda") and requested == "auto":
        try:
            from fastmup import ext

            ext.load(resolved)
        except Exception:  # noqa: BLE001 - auto falls back to torch's function, as the optimizers do
            return None
    return None if resolved == "eager" else resolved


@torch.no_grad()
def clip_grad_norm_(
    parameters: _TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Clip the gradient norm of ``parameters`` in place, as
    ``torch.nn.utils.clip_grad_norm_``; return the total norm (a tensor on the
    first gradient's device, in the dtype torch returns).

    ``norm = (Σ |g|^p)^(1/p)`` over every element of every gradient (``max
    |g|`` for ``inf``), then ``g ← g · min(1, max_norm / (norm + 1e-6))``.
    ``error_if_nonfinite=True`` raises (torch's error) when the norm is nan or
    inf, before any gradient changes (one host sync; none otherwise).
    ``foreach=False`` runs torch's per-tensor loop.  ``backend`` ("auto",
    "eager", "triton", "cuda", "cpu"; see :mod:`fastmup.optim.backend`):
    "eager" is torch's function; the fused backends launch one reduction per
    device and gradient dtype (module docstring).
    """
    if backend not in backends.NAMES:
        raise ValueError(f"backend={backend!r} is not one of {backends.NAMES}")
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    params = list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    max_norm = float(max_norm)
    norm_type = float(norm_type)
    if not grads:
        return torch.tensor(0.0)
    fused = _fused_backend(backend, grads, norm_type, foreach)
    if fused is None:
        if norm_type == math.inf:  # torch has no inf norm of an empty tensor; it adds nothing to the max
            params = [p for p in params if p.grad is None or p.grad.numel()]
            if not params:
                return torch.tensor(0.0)
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
    # torch's groups: by device, then dtype, in order of first appearance
    groups: dict[torch.device, dict[torch.dtype, list[Tensor]]] = {}
    for g in grads:
        groups.setdefault(g.device, {}).setdefault(g.dtype, []).append(g)
    results = []
    for device, by_dtype in groups.items():
        acc = torch.empty(1, dtype=torch.float64, device=device)
        result = torch.empty(2, dtype=torch.float32, device=device)
        # each group's block as an optimizer batch of the same tensors would have it
        plans = [norm_plans.from_grads(gs, block_for(fused, sum(g.numel() for g in gs))) for gs in by_dtype.values()]
        for k, plan in enumerate(plans):
            last = k == len(plans) - 1 and len(groups) == 1
            launch(fused, plan, norm_type=norm_type, acc=acc, has_acc=k > 0, result=result if last else None, max_norm=max_norm)
        results.append((device, acc, result))
    first = grads[0].device
    if len(results) > 1:
        accs = torch.cat([acc.to(first) for _, acc, _ in results])
        acc = accs.amax(0, keepdim=True) if norm_type == math.inf else accs.sum(0, keepdim=True)
        result = torch.empty(2, dtype=torch.float32, device=first)
        finish(acc, result, max_norm, norm_type)
    else:
        result = results[0][2]
    out_dtype = functools.reduce(torch.promote_types, {g.dtype for g in grads})  # torch stacks per-tensor norms
    total_norm = result[0].to(out_dtype) if out_dtype != torch.float32 else result[0].clone()
    if error_if_nonfinite:
        check_nonfinite(result[0], norm_type)
    for device, by_dtype in groups.items():
        coef = result[1].to(device)
        for gs in by_dtype.values():
            multiply_(gs, coef)
    return total_norm


def clipped(g: Tensor, clip: Optional[Tensor]) -> Tensor:
    """``g · clip`` as :func:`multiply_` would store it (in ``g``'s dtype), or
    ``g`` without a coefficient: the eager updates' view of a gradient whose
    clip coefficient was deferred into the step."""
    if clip is None:
        return g
    math_type = torch.float64 if g.dtype == torch.float64 else torch.float32
    return (g.to(math_type) * clip.reshape(()).to(g.device, math_type)).to(g.dtype)


# ----------------------------------------------------------------------
# deferred clipping: MuOptimizer.clip_grad_norm_
# ----------------------------------------------------------------------
# One NormPlan per launch plan of a batch (weakly: a re-plan drops them).
_NORM_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# Per optimizer (weakly), its clip buffers on each device (_buffers).
_BUFFERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_GRAD = operator.attrgetter("grad")


@dataclass(eq=False)
class PendingClip:
    """A clip coefficient waiting for the next step, valid for the gradients
    it was computed from: those the optimizer's plan was bound to then.  The
    plan keeps its list of (weak) gradient references while the same
    gradient tensors come back, and makes a new one when any changes, so the
    list's identity says whether the gradients are still those."""

    coef: dict  # device -> float32 [1] coefficient on that device
    grad_refs: list  # the plan inputs' grad_refs when the norm was computed

    def still_current(self, key) -> bool:
        if key is None:
            return False
        if key.grad_refs is self.grad_refs:
            return True
        # a plan with members without a gradient rebinds through a new list: compare the tensors
        now, then = [r() for r in key.grad_refs], [r() for r in self.grad_refs]
        return len(now) == len(then) and all(map(operator.is_, now, then))


def _norm_plan(batch) -> NormPlan:
    """The reduction over a fused batch's gradients, on its step's launch plan
    (cached per batch; the cpu backend's block follows the thread count)."""
    key = torch.get_num_threads() if batch.backend == "cpu" else 0
    cached = _NORM_PLANS.get(batch)
    if cached is not None and cached[0] == key:
        return cached[1]
    counts = batch.numel_counts()
    lp = batch.launch_plan(block_for(batch.backend, int(counts.sum())))
    plan = norm_plans.from_launch_plan(lp, counts, batch.device, norms_index=batch.index)
    _NORM_PLANS[batch] = (key, plan)
    return plan


def _eager_part(batch, norm_type: float, norms: Optional[Tensor]) -> Optional[Tensor]:
    """An eager batch's Σ|g|^p (max for inf) in float64, and its per-tensor norms into ``norms``."""
    grads, where = [], []
    for i, g in enumerate(batch.grads):
        if g is None:
            continue
        if g.layout != torch.strided:  # sparse (SGD): its stored values
            g = g.coalesce()._values()
        grads.append(g)
        where.append(batch.index[i])
    if not grads:
        return None
    if norms is not None:
        for g, k in zip(grads, where):
            norms[k] = torch.linalg.vector_norm(g.detach().double(), norm_type).to(norms.device, torch.float32)
    return eager_power_sum(grads, norm_type)


def _mesh_reduce(acc: Tensor, owners: Sequence[Tensor], norm_type: float) -> None:
    """All-reduce a shard's total over the mesh dimensions its gradients are
    sharded (or partial) on, as torch's clip_grad_norm_ does for DTensors."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Replicate

    grads = [p.grad for p in owners if p.grad is not None]
    if not grads:
        return
    if not all(isinstance(g, DTensor) for g in grads):
        raise NotImplementedError(
            "MuOptimizer.clip_grad_norm_: some gradients are DTensors (FSDP2) and some are not; "
            "the norm needs every gradient sharded over one device mesh"
        )
    mesh, placements = grads[0].device_mesh, grads[0].placements
    if any(g.device_mesh != mesh for g in grads):
        raise NotImplementedError("MuOptimizer.clip_grad_norm_: the gradients live on different device meshes")
    op = dist.ReduceOp.MAX if norm_type == math.inf else dist.ReduceOp.SUM
    dims = sorted({d for g in grads for d, pl in enumerate(g.placements) if not isinstance(pl, Replicate)})
    del placements
    for d in dims:
        dist.all_reduce(acc, op=op, group=mesh.get_group(d))


def _loss_scale(opt, grad_scaler) -> Optional[Tensor]:
    """GradScaler's scale when the gradients are still scaled (no
    ``unscale_(opt)`` this iteration: the step will unscale them), else None."""
    if grad_scaler is None or not grad_scaler.is_enabled():
        return None
    from torch.amp.grad_scaler import OptState

    state = grad_scaler._per_optimizer_states[id(opt)]
    if state["stage"] is not OptState.READY or grad_scaler._scale is None:
        return None
    return grad_scaler._scale


def defer(
    opt,
    max_norm: float,
    norm_type: float,
    error_if_nonfinite: bool,
    foreach: Optional[bool],
    grad_scaler,
    per_tensor: bool,
) -> Tensor:
    """``MuOptimizer.clip_grad_norm_`` (see there: its signature holds the
    defaults, and it passes every argument)."""
    max_norm, norm_type = float(max_norm), float(norm_type)
    batches = opt._plan()  # binds this step's gradients to the batches
    try:
        params = opt._plan_inputs.params
        grads = [g for g in map(_GRAD, params) if g is not None]
        if not grads:
            opt._pending_clip = None
            opt.per_tensor_grad_norms = torch.zeros(len(params)) if per_tensor else None
            return torch.tensor(0.0)
        first = local(grads[0]).device
        sharded = opt._plan_inputs is not None and opt._plan_inputs.sharded
        scale = _loss_scale(opt, grad_scaler)
        norms = torch.zeros(len(params), dtype=torch.float32, device=first) if per_tensor else None
        if norm_type not in FUSED_NORM_TYPES or foreach is False or all(b.backend == "eager" for b in batches):
            # torch's function (the eager backend's clip), to the bit
            total_norm, result = _torch_norm(grads, params, norm_type, foreach, scale, max_norm, first, norms)
        else:
            result = _fused_norm(opt, batches, params, norm_type, sharded, scale, max_norm, first, norms)
            out_dtype = functools.reduce(torch.promote_types, {b.signature.grad_dtype for b in batches})
            total_norm = result[0].to(out_dtype) if out_dtype != torch.float32 else result[0].clone()
        if sharded and norms is not None:  # each shard's norms: reduced as powers, like the total
            powers = norms.double() if norm_type == math.inf else norms.double() ** norm_type
            _mesh_reduce(powers, params, norm_type)
            norms.copy_(powers if norm_type == math.inf else powers ** (1.0 / norm_type))
        if error_if_nonfinite:
            check_nonfinite(result[0], norm_type)  # raises before anything is deferred
        coef = result[1:2]
        devices = {b.device for b in batches}
        opt._pending_clip = PendingClip(
            coef={d: coef if d == first else coef.to(d) for d in devices}, grad_refs=opt._plan_inputs.grad_refs
        )
        opt.per_tensor_grad_norms = norms
        return total_norm
    finally:
        opt._release_grads()


def _torch_norm(grads, params, norm_type, foreach, scale, max_norm, first, norms) -> tuple[Tensor, Tensor]:
    """torch's norm and coefficient, with torch's operations in the norm's
    dtype (for the eager backend, other norm types and ``foreach=False``):
    ``(total_norm, float32 [norm, coef])``."""
    if norm_type == math.inf:  # as clip_grad_norm_: empty gradients add nothing to the max
        grads = [g for g in grads if g.numel()] or [grads[0].new_zeros(1)]
    total = torch.nn.utils.get_total_norm(grads, norm_type, False, foreach)
    if hasattr(total, "full_tensor"):  # DTensor gradients (FSDP2)
        total = total.full_tensor()
    if scale is not None:
        total = total / scale.to(total.device).reshape(()).to(total.dtype)
    if norms is not None:
        for k, p in enumerate(params):
            if p.grad is not None:
                n = torch.linalg.vector_norm(local(p.grad).detach().double(), norm_type).float()
                norms[k] = n if scale is None else n / scale.to(n.device).reshape(())
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch's _clip_grads_with_norm_
    result = torch.stack([total.reshape(()).float(), coef.reshape(()).float()]).to(first)
    return total, result


def _buffers(opt, device: torch.device) -> tuple[Tensor, Tensor]:
    """The optimizer's running total (float64 [1]) and result (float32 [2:
    norm, coefficient]) on ``device``: allocated once, so that every clip
    writes the same memory (a captured CUDA graph's step reads the
    coefficient where the clip wrote it)."""
    per_opt = _BUFFERS.get(opt)
    if per_opt is None:
        per_opt = _BUFFERS[opt] = {}
    bufs = per_opt.get(device)
    if bufs is None:
        bufs = per_opt[device] = (
            torch.zeros(1, dtype=torch.float64, device=device),
            torch.zeros(2, dtype=torch.float32, device=device),
        )
    return bufs


def _fused_norm(opt, batches, params, norm_type, sharded, scale, max_norm, first, norms) -> Tensor:
    """One reduction launch per fused batch, chained on a float64 total per
    device; eager batches (float64...) in torch ops, first."""
    by_device: dict[torch.device, list] = {}
    for batch in batches:
        by_device.setdefault(batch.device, []).append(batch)
    # the last launch writes the norm and coefficient unless something must
    # happen to the total first (other devices, other shards, a loss scale)
    in_kernel = len(by_device) == 1 and not sharded and scale is None
    totals, result = [], None
    for device, members in by_device.items():
        acc, result_buf = _buffers(opt, device)
        has_acc = False
        dev_norms = norms if norms is None or device == first else torch.zeros_like(norms, device=device)
        for b in members:
            if b.backend == "eager":
                part = _eager_part(b, norm_type, dev_norms)
                if part is None:
                    continue
                if not has_acc:
                    acc = part.reshape(1).clone()
                else:
                    acc = torch.maximum(acc, part.reshape(1)) if norm_type == math.inf else acc + part
                has_acc = True
        fused = [b for b in members if b.backend != "eager" and b.has_work]
        if in_kernel:
            result = result_buf
        for k, b in enumerate(fused):
            last = in_kernel and k == len(fused) - 1
            launch(b.backend, _norm_plan(b), norm_type=norm_type, acc=acc, has_acc=has_acc,
                   result=result if last else None, max_norm=max_norm, norms=dev_norms)
            has_acc = True
        if not has_acc and not fused:
            acc.zero_()  # nothing on this device has a gradient now
        if in_kernel and not fused:
            finish(acc, result, max_norm, norm_type)
        if dev_norms is not None and dev_norms is not norms:
            norms += dev_norms.to(first)
        totals.append(acc)
    if in_kernel:
        return result
    accs = torch.cat([a.to(first) for a in totals])
    acc = accs.amax(0, keepdim=True) if norm_type == math.inf else accs.sum(0, keepdim=True)
    if sharded:
        _mesh_reduce(acc, params, norm_type)
    if scale is not None:  # the norm of the unscaled gradients: Σ|g/s|^p = Σ|g|^p / s^p
        s = scale.to(first, torch.float64).reshape(1)
        acc = acc / (s if norm_type == math.inf else s**norm_type)
        if norms is not None:
            norms.div_(scale.to(first, torch.float32).reshape(()))
    result = _buffers(opt, first)[1]
    finish(acc, result, max_norm, norm_type)
    return result


def local(t: Tensor) -> Tensor:
    """A DTensor's local shard (FSDP2), else ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t
