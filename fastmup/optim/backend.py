"""Which implementation runs a step: backend names and the ``auto`` choice.

=========  ==========================================================
``eager``  the single-tensor reference in plain torch ops (any device)
``triton`` fused multi-tensor Triton kernels (``fastmup.kernels``)
``cuda``   the hand-written CUDA C++ kernels of ``csrc/``
``cpu``    the same C++ functors compiled for the host
=========  ==========================================================

``auto`` picks ``triton`` for CUDA tensors when Triton imports, else
``eager`` with a one-time warning; for CPU tensors it picks ``cpu`` when the
C++ extension can be built (a compiler and pybind11 are present; the first
step then compiles it once into a cache directory, see ``fastmup.ext``) and
``eager`` otherwise.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import TYPE_CHECKING, Callable, Iterable, NamedTuple, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:
    from fastmup.plan.batch import TensorBatch

NAMES = ("auto", "eager", "triton", "cuda", "cpu")

#: the storage dtypes every fused kernel takes (for params, grads and state)
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: backends whose kernels read the hyperparameter table on the device (a
#: Tensor lr is then computed there, without a host sync)
DEVICE_TABLE_BACKENDS = ("triton", "cuda")


class Refusal(NamedTuple):
    """Why a fused backend cannot step a tensor, and the error a requested
    fused backend raises for it."""

    reason: str
    error: type


#: the parameter storage modes (``fastmup.plan.spec.ParamStorage``) each fused backend implements
STORAGE_MODES: dict[str, tuple[str, ...]] = {
    "triton": ("nearest", "stochastic", "master", "remainder"),
    "cpu": ("nearest", "stochastic", "master", "remainder"),
    "cuda": ("nearest", "stochastic", "master", "remainder"),
}


def fused_refusal(
    param: torch.Tensor,
    grad: torch.Tensor,
    state_dtype: torch.dtype,
    storage: str = "nearest",
    backend: Optional[str] = None,
) -> Optional[Refusal]:
    """None when every fused backend (or ``backend``) can step ``param`` with
    ``grad`` (local tensors), state of ``state_dtype`` and the parameter
    storage mode ``storage``; else why not.

    Under ``backend="auto"`` such a tensor runs on the eager reference in the
    same step; a requested fused backend raises ``Refusal.error``."""
    if storage != "nearest":
        names = (backend,) if backend in STORAGE_MODES else tuple(STORAGE_MODES)
        if any(storage not in STORAGE_MODES[n] for n in names):
            return Refusal(f"parameter storage {storage!r} (not in the {'/'.join(names)} kernels)", NotImplementedError)
        # the cuda storage-mode kernels are built for gradients in the parameter's dtype (autograd's)
        if backend == "cuda" and grad.dtype != param.dtype:
            return Refusal(f"parameter storage {storage!r} with {grad.dtype} gradients of {param.dtype} params "
                           "(the cuda kernels take gradients in the parameter's dtype)", TypeError)
    for what, dtype in (("param", param.dtype), ("gradient", grad.dtype), ("state", state_dtype)):
        if dtype not in FUSED_DTYPES:
            return Refusal(f"{dtype} {what}s: fused kernels take float32, bfloat16 and float16", TypeError)
    if grad.layout != torch.strided:
        return Refusal("sparse gradients", RuntimeError)
    if not param.is_contiguous():
        return Refusal("non-contiguous params", RuntimeError)
    if not grad.is_contiguous():
        return Refusal("non-contiguous gradients", RuntimeError)
    return None

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Triton kernels can run on CPU tensors only under its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def extension_available(device_type: str) -> bool:
    """Whether the compiled csrc backend for ``device_type`` can be loaded."""
    try:
        from fastmup import ext
    except ImportError:
        return False
    return ext.available(device_type)


def resolve(requested: str, devices: Iterable[torch.device]) -> str:
    """The backend that will run for params on ``devices``."""
    types = {d.type for d in devices}
    if requested == "auto":
        if types and types <= {"cuda"}:
            if triton_available():
                return "triton"
            _warn_once("fastmup: Triton is not importable; backend='auto' falls back to the eager reference on CUDA")
            return "eager"
        if types and types <= {"cpu"} and extension_available("cpu"):
            return "cpu"
        return "eager"
    if requested == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package, which is not importable")
        if "cpu" in types and not triton_interpreted():
            raise RuntimeError(
                "backend='triton' got CPU tensors; Triton runs on CPU tensors only under TRITON_INTERPRET=1 "
                "(use backend='eager' or 'cpu' for CPU training)"
            )
        if types - {"cpu", "cuda"}:
            raise RuntimeError(f"backend='triton' does not support devices {sorted(types - {'cpu', 'cuda'})}")
    if requested in ("cuda", "cpu"):
        wrong = types - {requested}
        if wrong:
            raise RuntimeError(f"backend={requested!r} got tensors on {sorted(wrong)}")
        if not extension_available(requested):
            from fastmup import ext  # raises a clear message when the build is impossible

            ext.load(requested)
    return requested


def launcher(name: str, algorithm: str):
    """The fused launcher of ``algorithm`` ("adam", "sgd", "esgd") in backend ``name``.

    Every launcher has the signature ``launch(batch, *, grad_scale, found_inf, **kw)``
    and reads all per-tensor values from the batch's table.
    """
    if name == "triton":
        module = importlib.import_module(f"fastmup.kernels.{algorithm}")
        return module.launch
    if name in ("cuda", "cpu"):
        from fastmup import ext

        return functools.partial(ext.launch, algorithm)
    raise ValueError(f"backend {name!r} has no fused launcher")


def entry_point(algorithm: str, reference: Callable[..., None], doc: str) -> Callable[..., None]:
    """The functional entry point of an element-wise ``algorithm``:
    ``f(batch, *, backend="eager", grad_scale=None, found_inf=None)`` runs
    ``reference`` (the single-tensor update) on the eager backend and
    :func:`launcher` of ``algorithm`` on the others.  ``doc`` is its docstring."""

    def step(
        batch: TensorBatch,
        *,
        backend: str = "eager",
        grad_scale: Optional[Tensor] = None,
        found_inf: Optional[Tensor] = None,
    ) -> None:
        update = reference if backend == "eager" else launcher(backend, algorithm)
        update(batch, grad_scale=grad_scale, found_inf=found_inf)

    step.__name__ = step.__qualname__ = algorithm
    step.__module__ = reference.__module__
    step.__doc__ = doc
    return step
