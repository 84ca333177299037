"""Small pieces shared by the fused optimizer kernels.

* :func:`bias_correction` computes ``1 - β^t`` in float64 inside a kernel.
* :func:`upcast` / :func:`downcast` convert between storage dtypes and the
  fp32 math type, with round-to-nearest-even stores.
* :func:`tensor_ptr` turns an entry of a batch's pointer table into a typed
  pointer.
* :func:`build_plan` checks a batch once and gathers everything a launch
  needs besides the per-step values (:class:`Plan`); :func:`plan_for` caches
  it per batch.  ``LAUNCHES`` counts kernel launches per algorithm (tests
  assert "one step = one launch per dtype signature" with it).
* :func:`scalar_inputs` prepares the AMP tensors (``grad_scale``,
  ``found_inf``) so a launch never syncs with the host.
"""
from __future__ import annotations

import collections
import contextlib
import weakref
from typing import Callable, NamedTuple, Optional, Sequence, TypeVar

import torch
import triton
import triton.language as tl

__all__ = [
    "LAUNCHES",
    "Plan",
    "bias_correction",
    "build_plan",
    "check_device",
    "device_guard",
    "downcast",
    "plan_for",
    "scalar_inputs",
    "tensor_ptr",
    "tl_dtype",
    "upcast",
]

#: Number of fused kernel launches so far, per algorithm ("adam", "sgd").
LAUNCHES: collections.Counter = collections.Counter()

# Alignment, in bytes, that lets full tiles use 16-byte vector accesses.
ALIGNMENT = 16


# ----------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------
@triton.jit
def bias_correction(beta, t):
    """``1 - beta**t`` in float64 (``beta``: float64 scalar, ``t``: step count).

    ``beta**t = exp(t·log β)``; computed in float64 so that the later rounding
    to float32 is the only one that matters (as in the eager path, where
    Python computes it in double).  ``β = 0`` is legal (no averaging):
    ``log 0`` is avoided and ``0**t = 0`` for ``t >= 1``.
    """
    t = t.to(tl.float64)
    positive = beta > 0.0
    safe = tl.where(positive, beta, 1.0)
    power = tl.where(positive, tl.exp(t * tl.log(safe)), 0.0)
    return 1.0 - power


@triton.jit
def upcast(x, DTYPE: tl.constexpr):
    """Storage dtype -> fp32 (exact).

    bfloat16 is the top half of a float32, so the conversion is a 16-bit
    shift; written out because Triton's interpreter (the CPU test path)
    mis-converts bf16 subnormals.  On a GPU it compiles to the same shift.
    """
    if DTYPE == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def downcast(x, DTYPE: tl.constexpr):
    """fp32 -> storage dtype, rounding to nearest even (torch's ``copy_``).

    For bfloat16 the rounding is written out on the bits (add 0x7FFF plus the
    lowest kept bit, keep the top half; nan -> 0x7FC0 like torch): Triton's
    interpreter truncates fp32 -> bf16 instead of rounding, so ``.to()`` would
    make the CPU tests disagree with the GPU.  The bit form is exact on both
    and costs a few integer ops in a memory-bound kernel.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def tensor_ptr(ptrs_ptr, role, n_tensors, i, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Row ``role`` of the int64 pointer table, entry ``i``, as a ``DTYPE*``.

    ``ALIGNED`` (every address of the batch is a multiple of 16 bytes, checked
    when the plan is built) lets the compiler use 16-byte vector accesses.
    """
    ptr = tl.load(ptrs_ptr + role * n_tensors + i).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


# ----------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------
_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


def tl_dtype(dtype: torch.dtype):
    """The Triton element type for a torch storage dtype."""
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(
            f"backend='triton' supports float32, bfloat16 and float16 tensors, got {dtype} "
            "(use backend='eager' for other dtypes)"
        ) from None


class Plan(NamedTuple):
    """Everything a step's launch needs besides the rows, steps and AMP scalars."""

    pointers: torch.Tensor  # int64 [roles, n]
    numels: torch.Tensor  # int64 [n]
    tensor_of_block: torch.Tensor  # int32 [nblocks]
    start_of_block: torch.Tensor  # int64 [nblocks]
    nblocks: int
    n_tensors: int
    param: tl.dtype
    grad: tl.dtype
    state: tl.dtype
    has_optional: bool  # the optional state buffer exists for some tensor
    aligned: bool  # every address is a multiple of ALIGNMENT bytes


def check_device(kernel, device: torch.device) -> None:
    """The kernels follow raw ``data_ptr()`` values: under ``TRITON_INTERPRET=1``
    they run on the host and can only follow CPU addresses; compiled, they
    need CUDA tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = isinstance(kernel, InterpretedFunction)
    if interpreted and device.type != "cpu":
        raise RuntimeError(
            f"fastmup.kernels were imported with TRITON_INTERPRET=1 (Triton's CPU interpreter), which cannot "
            f"step tensors on {device}; unset TRITON_INTERPRET before importing fastmup.kernels"
        )
    if not interpreted and device.type != "cuda":
        raise RuntimeError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests), got {device}")


def build_plan(batch, algorithm: str, kernel, *, columns: Sequence[str], block: int, state: Sequence[str], optional: str, flag: str) -> Plan:
    """Check ``batch`` once and gather its launch arguments.

    ``state`` names the buffers every tensor has; ``optional`` the one that
    only tensors whose row has ``flag != 0`` have (amsgrad's
    ``max_exp_avg_sq``, SGD's ``momentum_buffer``): address 0 elsewhere, and
    no pointer row at all when no tensor of the batch has it.
    """
    if tuple(batch.columns) != tuple(columns):
        raise ValueError(f"{algorithm} kernel expects columns {tuple(columns)}, the batch has {tuple(batch.columns)}")
    sig = batch.signature
    check_device(kernel, sig.device)
    has_optional = optional in batch.state
    names = ("param", "grad", *state) + ((optional,) if has_optional else ())
    flags = batch.rows[:, list(columns).index(flag)]
    tensors = []
    for name in names:
        listed = batch.params if name == "param" else batch.grads if name == "grad" else batch.state[name]
        for i, t in enumerate(listed):
            if t is None:
                if (name == optional and flags[i] == 0) or (name == "grad" and not batch.is_active(i)):
                    continue  # no such buffer, or no gradient this step (address 0, nothing read)
                raise ValueError(f"{algorithm} kernel: tensor {i} of the batch has no {name!r} buffer")
            want = {"param": sig.param_dtype, "grad": sig.grad_dtype}.get(name, sig.state_dtype)
            if t.dtype != want or t.shape != batch.params[i].shape or not t.is_contiguous() or t.device != sig.device:
                raise ValueError(
                    f"{algorithm} kernel: {name} of tensor {i} must be a contiguous {want} tensor on {sig.device} "
                    f"shaped like its param, got {t.dtype} {tuple(t.shape)} on {t.device}"
                )
            tensors.append(t)
    tensor_of_block, start_of_block, nblocks = batch.block_map(block)
    return Plan(
        pointers=batch.pointers(names),
        numels=batch.numels(),
        tensor_of_block=tensor_of_block,
        start_of_block=start_of_block,
        nblocks=nblocks,
        n_tensors=len(batch),
        param=tl_dtype(sig.param_dtype),
        grad=tl_dtype(sig.grad_dtype),
        state=tl_dtype(sig.state_dtype),
        has_optional=has_optional,
        aligned=all(t.data_ptr() % ALIGNMENT == 0 for t in tensors),
    )


T = TypeVar("T")

# One cached plan per (batch, algorithm).  Keyed weakly on the batch: a
# re-plan by the optimizer makes new batches and the old plans go away.
_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def plan_for(batch, algorithm: str, build: Callable[[], T]) -> T:
    """The launch plan of ``batch`` for ``algorithm``, built once by ``build()``
    (usually :func:`build_plan`) and reused by every later step."""
    plans = _PLANS.get(batch)
    if plans is None:
        plans = _PLANS[batch] = {}
    plan = plans.get(algorithm)
    if plan is None:
        plan = plans[algorithm] = build()
    return plan


def scalar_inputs(batch, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]):
    """``(grad_scale, found_inf)`` as float32 tensors on the batch's device.

    ``None`` becomes a placeholder (the batch's ``steps``, never read: the
    kernel's HAS_SCALE / HAS_FOUND_INF constexprs are then False).  Tensors
    already on the right device and dtype are passed as they are, so the
    usual GradScaler case costs no copy and no host sync.
    """

    def prepare(x: Optional[torch.Tensor]) -> torch.Tensor:
        if x is None:
            return batch.steps
        if x.device != batch.device or x.dtype != torch.float32:
            x = x.to(batch.device, torch.float32, non_blocking=True)
        return x

    return prepare(grad_scale), prepare(found_inf)


def device_guard(device: torch.device):
    """Make ``device`` current for the launch: Triton launches on the current CUDA device."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch_elementwise(
    kernel,
    algorithm: str,
    batch,
    grad_scale: Optional[torch.Tensor],
    found_inf: Optional[torch.Tensor],
    *,
    columns: Sequence[str],
    block: int,
    tile: int,
    num_warps: int,
    state: Sequence[str],
    optional: str,
    flag: str,
    has_optional: str,
) -> None:
    """Launch a per-element update kernel (Adam, SGD) over ``batch``: one
    program per block-map entry, the plan (:func:`build_plan`) built on the
    first call and reused.  The kernels share one signature; ``has_optional``
    names the constexpr that says whether the ``optional`` buffer exists."""
    plan = plan_for(batch, algorithm, lambda: build_plan(
        batch, algorithm, kernel, columns=columns, block=block, state=state, optional=optional, flag=flag,
    ))
    if plan.nblocks == 0:
        return
    scale, inf = scalar_inputs(batch, grad_scale, found_inf)
    with device_guard(batch.device):
        kernel[(plan.nblocks,)](
            batch.device_rows(),
            plan.pointers,
            batch.steps,
            plan.numels,
            plan.tensor_of_block,
            plan.start_of_block,
            scale,
            inf,
            plan.n_tensors,
            NCOLS=len(columns),
            PARAM=plan.param,
            GRAD=plan.grad,
            STATE=plan.state,
            HAS_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            ALIGNED=plan.aligned,
            BLOCK=block,
            TILE=tile,
            num_warps=num_warps,
            **{has_optional: plan.has_optional},
        )
    LAUNCHES[algorithm] += 1
