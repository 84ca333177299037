"""The compiled backends of fastmup: ``cpu`` (C++ on the host) and ``cuda``.

The update math lives once in ``csrc/adam_math.h`` / ``csrc/sgd_math.h`` /
``csrc/esgd_math.h``
(``__host__ __device__`` functors); ``csrc/multi_tensor.cuh`` runs it in one
CUDA launch per batch and ``csrc/host/`` on a pool of CPU threads.  The
modules are built on first use (:mod:`fastmup.ext.build`) and take raw
addresses from a :class:`~fastmup.plan.batch.TensorBatch`, so they do not
depend on PyTorch's C++ ABI.  The one module that does, ``plan``
(``csrc/plan/checks.cpp``), reads tensors: the optimizer plan's per-step
checks, an optional speed-up of every backend (:func:`plan_checks`).

* :func:`available` -- cheap, never raises: can this backend be used here?
* :func:`load` -- build if needed and import the module, or raise a clear error.
* :func:`launch` -- one step of an algorithm over a batch (what
  ``fastmup.optim.backend.launcher("cpu"|"cuda", algorithm)`` calls).
* :func:`plan_checks` -- the ``plan`` module, or None (never raises).

``python -m fastmup.ext build [cpu|cuda|plan]`` builds ahead of time.
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Optional

import numpy as np

from fastmup.ext import build as _build  # noqa: F401  (the submodule fastmup.ext.build)
from fastmup.ext.build import (  # noqa: F401  (re-exported)
    BuildError,
    build_extension,
    built_path,
    cache_root,
    compile_cuda_sources,
    csrc_dir,
    find_cxx,
    find_nvcc,
    missing_requirements,
    pybind11_available,
)

__all__ = [
    "BuildError",
    "available",
    "build_extension",
    "compile_cuda_sources",
    "launch",
    "load",
    "plan_checks",
]

_modules: dict[str, Any] = {}
_failed: dict[str, BaseException] = {}
_lock = threading.Lock()


def _cuda_runtime_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


def available(device_type: str) -> bool:
    """Whether backend ``device_type`` ("cpu" or "cuda") can run here.

    "cpu": the module is loaded or built already, or a C++ compiler and
    pybind11 are present (it will be built on first use).  "cuda": the same
    with nvcc, and ``torch.cuda.is_available()``.  False after a failed build
    in this process.  Never raises, never builds.
    """
    try:
        if device_type not in ("cpu", "cuda"):
            return False
        if device_type in _failed:
            return False
        if device_type == "cuda" and not _cuda_runtime_available():
            return False
        if device_type in _modules:
            return True
        if not missing_requirements(device_type):
            return True
        return built_path(device_type) is not None
    except Exception:  # noqa: BLE001
        return False


def load(device_type: str):
    """The extension module of backend ``device_type``, built on first use.

    Raises :class:`BuildError` naming what is missing (compiler, pybind11,
    nvcc) or carrying the build log when the compile fails.
    """
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"fastmup.ext has no backend for device type {device_type!r} (expected 'cpu' or 'cuda')")
    module = _modules.get(device_type)
    if module is not None:
        return module
    with _lock:
        module = _modules.get(device_type)
        if module is not None:
            return module
        try:
            path = build_extension(device_type)
            module = _build.import_module(device_type, path)
        except Exception as e:
            _failed[device_type] = e
            raise
        _failed.pop(device_type, None)
        _modules[device_type] = module
        return module


# ---------------------------------------------------------------------------
# the plan's per-step checks
# ---------------------------------------------------------------------------
def plan_checks():
    """The ``plan`` module (``csrc/plan/checks.cpp``: the optimizer plan's
    per-step checks in one pass over the tensors), or None: the optimizer
    then checks in Python, with the same results.

    Used when it is built already, or built here when this process has
    loaded a compiled backend (which needs the same compiler) or when
    ``$FASTMUP_PLAN_CHECKS`` is ``compiled``; never when it is ``python``.
    A failed build is not retried in this process.  Never raises."""
    mode = os.environ.get("FASTMUP_PLAN_CHECKS", "").strip().lower()
    if mode == "python":
        return None
    module = _modules.get("plan")
    if module is not None:
        return module
    if "plan" in _failed:
        return None
    try:
        if mode != "compiled" and not ("cpu" in _modules or "cuda" in _modules) and built_path("plan") is None:
            return None
        with _lock:
            module = _modules.get("plan")
            if module is None:
                module = _modules["plan"] = _build.import_module("plan", build_extension("plan"))
        return module
    except Exception as e:  # noqa: BLE001 - a speed-up only: the Python checks stand in
        _failed["plan"] = e
        return None


# ---------------------------------------------------------------------------
# launching a batch
# ---------------------------------------------------------------------------
#: storage dtype codes of csrc/common.h (enum DType)
def _dtype_codes():
    import torch

    return {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


#: parameter storage modes (fastmup.plan.spec.ParamStorage) -> csrc/rounding.h's enum Storage
STORAGE_CODES = {"nearest": 0, "stochastic": 1, "master": 2, "remainder": 3}

#: the algorithms with a C++ functor (the batch's spec names which)
_FUNCTORS = {"AdamOp": "adam", "SgdOp": "sgd", "EsgdOp": "esgd"}


def _dtype_code(dtype, what: str, device) -> int:
    code = _dtype_codes().get(dtype)
    if code is None:
        raise TypeError(
            f"fastmup backend {device.type!r} supports float32, bfloat16 and float16 {what}s, got {dtype}; "
            "use backend='eager' for other dtypes"
        )
    return code


def host_block(largest: int, total: int, threads: int) -> int:
    """Elements per block-map entry of the host backend: the extension's
    largest, halved while that would leave fewer than 32 entries per thread
    to balance.  Each thread walks a contiguous share of the entries and then
    takes single entries from the others' (csrc/host/multi_tensor_host.h), so
    small entries cost no streaming, and the step ends at most one entry
    after the first thread runs out of work."""
    block = largest
    while block > 4096 and total < 32 * max(threads, 1) * block:
        block //= 2
    return block


class _Fixed:
    """What every launch of one launch plan passes unchanged, kept with the
    plan (:meth:`~fastmup.plan.launch.LaunchPlan.memo`): the module's
    ``MultiTensorArgs`` with the plan's tables, sizes and dtype codes, the
    spec's state slots, and whether the optional buffer's gate needs a check
    each step."""

    def __init__(self, module, plan, batch) -> None:
        sig, spec, device = batch.signature, batch.spec, batch.device
        args = module.MultiTensorArgs()
        args.ntensors = plan.n_tensors
        args.nblocks = plan.nblocks
        args.block = plan.block
        args.tensor_of_block = plan.tensor_of_block.data_ptr()
        args.start_of_block = plan.start_of_block.data_ptr()
        args.numels = plan.numels.data_ptr()
        args.param_ptrs = plan.row_address("param")
        args.grad_ptrs = plan.row_address("grad")
        self.state_ptrs = [plan.row_address(name) for name in spec.buffers]
        args.state_ptrs = self.state_ptrs
        args.ncols = len(spec.columns)
        args.param_dtype = _dtype_code(sig.param_dtype, "param", device)
        args.grad_dtype = _dtype_code(sig.grad_dtype, "grad", device)
        args.state_dtype = _dtype_code(sig.state_dtype, "state", device)
        # how the parameters are stored (csrc/rounding.h, enum Storage)
        args.storage = STORAGE_CODES[plan.storage]
        if plan.storage_role is not None:
            args.storage_ptrs = plan.row_address(plan.storage_role)
        if plan.tensor_ids is not None:
            args.tensor_ids = plan.tensor_ids.data_ptr()
        args.rounding_prefix = batch.rounding_prefix & 0xFFFFFFFF
        if spec.advances_scalars:
            args.scalar_state = [batch.scalars[s.name].data_ptr() for s in spec.scalars[1:]]
            if plan.tickets is not None and device.type != "cpu":
                args.tickets = plan.tickets.data_ptr()
        self.args = args
        optional = spec.optional
        # only where some tensor lacks the optional buffer is there a gate to check each step
        self.lacking = optional is not None and (optional.name not in plan.present or not plan.present[optional.name].all())
        self.steps_checked = None


class _HostStep:
    """The per-step launch of one batch on the ``cpu`` backend, once a first
    launch through the general path has built and checked its plan: what
    that path looks up and re-derives every step (the block size, the launch
    plan, the module's arguments, the table addresses) kept, so that a step
    is a few identity checks and one call into the module.

    On a CPU the interpreter's and the libraries' caches are cold when
    ``step()`` runs (a forward and backward, or other tensors' updates,
    streamed through them since the last one), and each distinct operation
    costs tens of microseconds then: the general path's host work took
    longer than torch's fused SGD host work on sets of a few million
    parameters.  The checks it skips hold for the batch's lifetime (its
    device, spec and tensors are fixed; a changed tensor makes a new
    batch); what can change between steps (the rows array, the steps
    column, the thread count, the gates, the scalar inputs) is checked
    here."""

    __slots__ = ("algorithm", "threads", "fixed", "plan", "run", "rows", "rows_ptr", "steps", "steps_ptr")

    def __init__(self, algorithm: str, threads: int, module, plan, fixed: "_Fixed", rows, steps) -> None:
        self.algorithm, self.threads = algorithm, threads
        self.plan, self.fixed = plan, fixed
        self.run = getattr(module, algorithm + "_step")
        self.rows, self.rows_ptr = rows, rows.ctypes.data
        self.steps, self.steps_ptr = steps, steps.data_ptr()

    def __call__(self, batch, grad_scale, found_inf) -> bool:
        """Launch; False (nothing done) where the general path must run instead."""
        rows, steps = batch.rows, batch.steps
        if rows is not self.rows or steps is not self.steps:
            return False  # rebuilt by the general path, which checks them
        fixed = self.fixed
        if fixed.lacking:  # some tensor lacks the optional buffer: its gate must be 0
            from fastmup.plan.launch import check_gates

            check_gates(self.plan, batch.spec, rows)
        if grad_scale is None and found_inf is None and batch.grad_clip is None:
            self.run(fixed.args, self.rows_ptr, self.steps_ptr, 0, 0, 0, self.threads)
            return True
        device = batch.device
        scale_ptr, scale_keep = _scalar_arg(grad_scale, device, "grad_scale")
        inf_ptr, inf_keep = _scalar_arg(found_inf, device, "found_inf")
        clip_ptr, clip_keep = _scalar_arg(batch.grad_clip, device, "grad_clip")
        self.run(fixed.args, self.rows_ptr, self.steps_ptr, scale_ptr, inf_ptr, clip_ptr, self.threads)
        del scale_keep, inf_keep, clip_keep
        return True


#: batch -> its _HostStep (cpu backend; dropped with the batch)
_host_steps: "weakref.WeakKeyDictionary[Any, _HostStep]" = weakref.WeakKeyDictionary()


def _scalar_arg(t: Optional[Any], device, name: str):
    """(address, keep-alive tensor) of a one-element float32 tensor on ``device``."""
    import torch

    if t is None:
        return 0, None
    if not isinstance(t, torch.Tensor):
        t = torch.tensor([float(t)], dtype=torch.float32, device=device)
    if t.numel() != 1:
        raise ValueError(f"fastmup: {name} must have one element, got shape {tuple(t.shape)}")
    if t.device != device or t.dtype != torch.float32 or not t.is_contiguous():
        t = t.to(device=device, dtype=torch.float32).contiguous()
    return t.data_ptr(), t


def launch(algorithm: str, batch, *, grad_scale=None, found_inf=None, **kwargs) -> None:
    """One step of ``algorithm`` ("adam", "sgd" or "esgd") over every tensor of ``batch``.

    Reads the hyperparameter table, step counts and addresses from the batch
    (Adam, SGD: steps already advanced).  ``grad_scale`` divides the
    gradients; ``found_inf`` nonzero skips the step (nothing is written).  On
    CUDA the launch is asynchronous on the current stream and neither value is
    read on the host.

    "esgd" takes ``hvps=`` (one contiguous tensor per param in the grads'
    dtype on an HVP step, else None) and advances the batch's scalar state (``step``,
    ``exp_avg_bias_corr``, ``exp_avg_d_bias_corr``, ``lr_warmup_cumprod``)
    itself, in the same call (see csrc/esgd_math.h).
    """
    import torch

    if not kwargs and batch.device.type == "cpu":
        fast = _host_steps.get(batch)
        if (
            fast is not None
            and fast.algorithm == algorithm
            and fast.threads == torch.get_num_threads()
            and fast(batch, grad_scale, found_inf)
        ):
            return
    from fastmup.plan.launch import check_gates

    hvps = kwargs.pop("hvps", None) if algorithm == "esgd" else None
    device = batch.device
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"fastmup.ext has no backend for tensors on {device}")
    spec = batch.spec
    if spec is None or _FUNCTORS.get(spec.functor) != algorithm:
        raise NotImplementedError(
            f"fastmup backend {device.type!r} has no {algorithm!r} kernel (it has {sorted(_FUNCTORS.values())}); "
            "use backend='eager'"
        )
    if kwargs:
        raise TypeError(f"fastmup.ext.launch({algorithm!r}) got unexpected arguments {sorted(kwargs)}")
    if len(batch) == 0:
        return
    module = load(device.type)
    block = int(module.BLOCK)
    if device.type == "cpu":
        block = host_block(block, int(batch.numel_counts().sum()), torch.get_num_threads())
    plan = batch.launch_plan(block)
    if plan.nblocks == 0:
        return  # only empty tensors
    fixed = plan.memo(("ext", device.type), lambda: _Fixed(module, plan, batch))
    # The per-step work here is a few attribute writes: on a CPU a step of a
    # few million parameters takes about a millisecond.
    host_rows = batch.rows
    if host_rows.dtype != np.float64 or not host_rows.flags.c_contiguous:
        host_rows = np.ascontiguousarray(host_rows, dtype=np.float64)
    if fixed.lacking:  # some tensor lacks the optional buffer: its gate must be 0
        check_gates(plan, spec, host_rows)
    scale_ptr, scale_keep = _scalar_arg(grad_scale, device, "grad_scale")
    inf_ptr, inf_keep = _scalar_arg(found_inf, device, "found_inf")
    clip_ptr, clip_keep = _scalar_arg(batch.grad_clip, device, "grad_clip")  # a deferred clip coefficient
    steps = batch.scalars["step"] if spec.advances_scalars else batch.steps
    if steps is not fixed.steps_checked:
        if steps.dtype != torch.float32 or steps.device != device or not steps.is_contiguous():
            raise RuntimeError(f"fastmup: batch.steps must be a contiguous float32 tensor on {device}")
        fixed.steps_checked = steps
    if device.type == "cpu":
        rows_ptr, rows_keep = host_rows.ctypes.data, host_rows
    else:
        rows_keep = batch.device_rows()
        rows_ptr = rows_keep.data_ptr()
    args = module.MultiTensorArgs(fixed.args)
    args.rows = rows_ptr
    args.steps = steps.data_ptr()
    args.grad_scale = scale_ptr
    args.found_inf = inf_ptr
    args.grad_clip = clip_ptr
    hvp_keep = None
    if spec.inputs:  # ESGD-M: the HVP slot follows the state buffers
        if hvps is not None:
            # read in the dtype the spec declares (the grads'): csrc/common.h, Slot2
            hvp_keep, _ = batch.input_table("hvp", hvps)
            args.state_ptrs = [*fixed.state_ptrs, hvp_keep.data_ptr()]
        args.hvp_step = int(hvps is not None)
    run = getattr(module, algorithm)
    if device.type == "cpu":
        threads = torch.get_num_threads()
        run(args, nthreads=threads)
        if algorithm in ("adam", "sgd") and host_rows is batch.rows:
            # launched and checked: later steps of this batch take the short path
            _host_steps[batch] = _HostStep(algorithm, threads, module, plan, fixed, host_rows, steps)
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = torch.cuda.current_stream(index).cuda_stream
        run(args, device=index, stream=stream)
    del scale_keep, inf_keep, clip_keep, rows_keep, hvp_keep
