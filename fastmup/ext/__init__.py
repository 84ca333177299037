"""The compiled backends of fastmup: ``cpu`` (C++ on the host) and ``cuda``.

The update math lives once in ``csrc/adam_math.h`` / ``csrc/sgd_math.h`` /
``csrc/esgd_math.h``
(``__host__ __device__`` functors); ``csrc/multi_tensor.cuh`` runs it in one
CUDA launch per batch and ``csrc/host/`` on a pool of CPU threads.  The
modules are built on first use (:mod:`fastmup.ext.build`) and take raw
addresses from a :class:`~fastmup.optim.table.TensorBatch`, so they do not
depend on PyTorch's C++ ABI.

* :func:`available` -- cheap, never raises: can this backend be used here?
* :func:`load` -- build if needed and import the module, or raise a clear error.
* :func:`launch` -- one step of an algorithm over a batch (what
  ``fastmup.optim.backend.launcher("cpu"|"cuda", algorithm)`` calls).

``python -m fastmup.ext build [cpu|cuda]`` builds ahead of time.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any, Optional

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
# launching a batch
# ---------------------------------------------------------------------------
#: storage dtype codes of csrc/common.h (enum DType)
def _dtype_codes():
    import torch

    return {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@dataclass(frozen=True)
class _Algorithm:
    columns: tuple[str, ...]
    states: tuple[str, ...]  # in the order of the C++ functor's state slots
    flag_state: tuple[tuple[str, str], ...]  # (column, state): a nonzero column value needs that buffer


@functools.lru_cache(maxsize=None)
def _algorithms() -> dict[str, _Algorithm]:
    from fastmup.optim import adam, esgd, sgd

    return {
        "adam": _Algorithm(adam.COLUMNS, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), (("amsgrad", "max_exp_avg_sq"),)),
        "sgd": _Algorithm(sgd.COLUMNS, ("momentum_buffer",), (("momentum", "momentum_buffer"),)),
        # the third functor slot of EsgdOp is the step's HVP (read only), passed per launch
        "esgd": _Algorithm(esgd.COLUMNS, ("exp_avg", "exp_avg_d"), ()),
    }


class _Plan:
    """Everything about a batch that does not change between steps (cached on it)."""

    def __init__(self, algorithm: str, spec: _Algorithm, batch, module) -> None:
        import numpy as np
        import torch

        device = batch.device
        sig = batch.signature
        codes = _dtype_codes()
        for what, dtype in (("param", sig.param_dtype), ("grad", sig.grad_dtype), ("state", sig.state_dtype)):
            if dtype not in codes:
                raise TypeError(
                    f"fastmup backend {device.type!r} supports float32, bfloat16 and float16 {what}s, got {dtype}; "
                    "use backend='eager' for other dtypes"
                )
        if tuple(batch.columns) != spec.columns:
            raise ValueError(f"fastmup.ext {algorithm!r}: batch columns {batch.columns} != expected {spec.columns}")
        n = len(batch)
        for name in spec.states:
            if name in batch.state and len(batch.state[name]) != n:
                raise ValueError(f"fastmup.ext: state {name!r} has {len(batch.state[name])} entries for {n} tensors")
        for i, (p, g) in enumerate(zip(batch.params, batch.grads)):
            tensors = [("param", p, sig.param_dtype), ("grad", g, sig.grad_dtype)]
            tensors += [
                (name, batch.state[name][i], sig.state_dtype)
                for name in spec.states
                if name in batch.state and batch.state[name][i] is not None
            ]
            for what, t, dtype in tensors:
                if t.device != device or t.dtype != dtype or t.numel() != p.numel() or not t.is_contiguous():
                    raise RuntimeError(
                        f"fastmup backend {device.type!r}: tensor #{i} of the batch: its {what} must be a contiguous "
                        f"{dtype} tensor of {p.numel()} elements on {device}, got {t.dtype} {tuple(t.shape)} on "
                        f"{t.device} (contiguous={t.is_contiguous()})"
                    )
        self.algorithm = algorithm
        self.run = getattr(module, algorithm)
        self.n = n
        self.block = int(module.BLOCK)
        if device.type == "cpu":
            self.block = host_block(self.block, sum(p.numel() for p in batch.params), torch.get_num_threads())
        if algorithm == "esgd":
            # every tensor gets at least one entry: on CUDA the entries of a
            # tensor advance its scalar state (the last ticket stores it)
            self.tensor_of_block, self.start_of_block, self.nblocks = _block_map_at_least_one(batch, self.block)
            for key, dtype in _ESGD_SCALARS:
                col = batch.scalars.get(key)
                if col is None or col.dtype != dtype or tuple(col.shape) != (n,) or not col.is_contiguous() or col.device != device:
                    raise RuntimeError(
                        f"fastmup backend {device.type!r} esgd: scalar state {key!r} must be a contiguous {dtype} "
                        f"column of {n} entries on {device}"
                    )
            self.tickets = torch.zeros(n, dtype=torch.int32, device=device)
        else:
            self.tensor_of_block, self.start_of_block, self.nblocks = batch.block_map(self.block)
        self.numels = batch.numels()
        present = [name for name in spec.states if name in batch.state]
        names = ("param", "grad", *present)
        self.pointers = batch.pointers(names)
        if self.pointers.dtype != torch.int64 or not self.pointers.is_contiguous():
            self.pointers = self.pointers.to(torch.int64).contiguous()
        base, row_bytes = self.pointers.data_ptr(), n * 8
        self.param_ptrs, self.grad_ptrs = base, base + row_bytes
        self.state_ptrs = [base + (2 + present.index(name)) * row_bytes if name in present else 0 for name in spec.states]
        # host copies of the address rows, to check the flag -> buffer rule each step
        host_ptrs = self.pointers.cpu().numpy()
        empty = np.array([p.numel() == 0 for p in batch.params], dtype=bool)  # data_ptr() 0, and no block
        # (column, state, column index, tensors without the buffer): only
        # where some tensor lacks it is there anything to check each step
        self.flag_checks = []
        for column, state in spec.flag_state:
            col = batch.col(column)
            have = (host_ptrs[2 + present.index(state)] != 0) | empty if state in present else empty
            if not have.all():
                self.flag_checks.append((column, state, col, ~have))
        self.codes = (codes[sig.param_dtype], codes[sig.grad_dtype], codes[sig.state_dtype])
        self.ncols = len(spec.columns)
        self.device = device
        # keep the tables alive as long as the plan
        self.keep = (self.tensor_of_block, self.start_of_block, self.numels, self.pointers)
        # what every launch passes unchanged (a step adds rows, steps, grad_scale, found_inf)
        self.static_args = dict(
            ntensors=self.n,
            nblocks=self.nblocks,
            block=self.block,
            tensor_of_block=self.tensor_of_block.data_ptr(),
            start_of_block=self.start_of_block.data_ptr(),
            numels=self.numels.data_ptr(),
            param_ptrs=self.param_ptrs,
            grad_ptrs=self.grad_ptrs,
            state_ptrs=self.state_ptrs,
            ncols=self.ncols,
            param_dtype=self.codes[0],
            grad_dtype=self.codes[1],
            state_dtype=self.codes[2],
        )
        self.checked_steps = None  # the steps tensor last checked, and its address
        self.rows_seen = (None, 0)  # the host rows array last passed, and its address

    def check_flags(self, rows) -> None:
        import numpy as np

        for column, state, col, lacking in self.flag_checks:
            missing = (rows[:, col] != 0) & lacking
            if missing.any():
                i = int(np.flatnonzero(missing)[0])
                raise RuntimeError(
                    f"fastmup: tensor #{i} of the batch has {column}={rows[i, col]} but no {state!r} buffer"
                )


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


_ESGD_SCALARS = None  # set lazily (needs torch): ((key, dtype), ...) of ESGD-M's per-tensor scalar state


def _block_map_at_least_one(batch, block: int):
    """Like ``TensorBatch.block_map`` but with one entry even for an empty tensor."""
    import numpy as np
    import torch

    numel = np.asarray([p.numel() for p in batch.params], dtype=np.int64)
    nblocks = np.maximum((numel + block - 1) // block, 1)
    tensor_of_block = np.repeat(np.arange(len(numel), dtype=np.int32), nblocks)
    first = np.cumsum(nblocks) - nblocks
    start = (np.arange(int(nblocks.sum()), dtype=np.int64) - np.repeat(first, nblocks)) * block
    device = batch.device
    return torch.from_numpy(tensor_of_block).to(device), torch.from_numpy(start).to(device), int(nblocks.sum())


def _esgd_hvp_pointers(plan: "_Plan", batch, hvps):
    """(address of an int64 [n] table of HVP addresses, keep-alive objects).

    The functor reads the HVP in the gradient's dtype (csrc/common.h,
    ``Slot2``): an HVP of another dtype is converted when that is exact (to
    float32); a lossy conversion is refused."""
    import torch

    sig = batch.signature
    if len(hvps) != plan.n:
        raise ValueError(f"fastmup esgd: {len(hvps)} HVPs for a batch of {plan.n} tensors")
    out = []
    for i, (h, p) in enumerate(zip(hvps, batch.params)):
        if h is None:
            h = torch.zeros(p.shape, dtype=sig.grad_dtype, device=p.device)
        if h.dtype != sig.grad_dtype:
            if sig.grad_dtype != torch.float32:
                raise NotImplementedError(
                    f"fastmup esgd backend {batch.device.type!r}: the HVP of tensor #{i} is {h.dtype} and the "
                    f"gradient {sig.grad_dtype}: converting it would round; use backend='eager'"
                )
            h = h.to(sig.grad_dtype)
        if h.device != p.device or h.numel() != p.numel():
            raise ValueError(f"fastmup esgd: the HVP of tensor #{i} must have the shape of its param, on {p.device}")
        out.append(h.contiguous())
    table = torch.tensor([h.data_ptr() for h in out], dtype=torch.int64)
    if batch.device.type != "cpu":
        table = table.to(batch.device, non_blocking=True)
    return table.data_ptr(), (out, table)


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

    "esgd" takes ``hvps=`` (one tensor or None per param on an HVP step, else
    None) and advances the batch's scalar state (``step``,
    ``exp_avg_bias_corr``, ``exp_avg_d_bias_corr``, ``lr_warmup_cumprod``)
    itself, in the same call (see csrc/esgd_math.h).
    """
    import numpy as np
    import torch

    global _ESGD_SCALARS
    if _ESGD_SCALARS is None:
        _ESGD_SCALARS = (
            ("step", torch.float32),
            ("exp_avg_bias_corr", torch.float64),
            ("exp_avg_d_bias_corr", torch.float64),
            ("lr_warmup_cumprod", torch.float64),
        )
    hvps = kwargs.pop("hvps", None) if algorithm == "esgd" else None

    device = batch.device
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"fastmup.ext has no backend for tensors on {device}")
    specs = _algorithms()
    spec = specs.get(algorithm)
    if spec is None:
        raise NotImplementedError(
            f"fastmup backend {device.type!r} has no {algorithm!r} kernel (it has {sorted(specs)}); use backend='eager'"
        )
    if kwargs:
        raise TypeError(f"fastmup.ext.launch({algorithm!r}) got unexpected arguments {sorted(kwargs)}")
    if len(batch) == 0:
        return
    cache = batch.__dict__.setdefault("_fastmup_ext_plans", {})
    plan = cache.get(algorithm)
    if plan is None:
        plan = _Plan(algorithm, spec, batch, load(device.type))
        cache[algorithm] = plan
    if plan.nblocks == 0:
        return  # only empty tensors
    # The per-step work here is a few attribute reads: on a CPU a step of a
    # few million parameters takes about a millisecond.
    host_rows = batch.rows
    if host_rows.dtype != np.float64 or not host_rows.flags.c_contiguous:
        host_rows = np.ascontiguousarray(host_rows, dtype=np.float64)
    if plan.flag_checks:
        plan.check_flags(host_rows)
    scale_ptr, scale_keep = _scalar_arg(grad_scale, device, "grad_scale")
    inf_ptr, inf_keep = _scalar_arg(found_inf, device, "found_inf")
    steps = batch.scalars["step"] if algorithm == "esgd" else batch.steps
    steps_ptr = steps.data_ptr()
    if plan.checked_steps is None or plan.checked_steps[0] is not steps or plan.checked_steps[1] != steps_ptr:
        if steps.dtype != torch.float32 or steps.device != device or not steps.is_contiguous():
            raise RuntimeError(f"fastmup: batch.steps must be a contiguous float32 tensor on {device}")
        plan.checked_steps = (steps, steps_ptr)
    if device.type == "cpu":
        if plan.rows_seen[0] is not host_rows:
            plan.rows_seen = (host_rows, host_rows.ctypes.data)
        rows_ptr, rows_keep = plan.rows_seen[1], host_rows
    else:
        rows_keep = batch.device_rows()
        rows_ptr = rows_keep.data_ptr()
    args = dict(plan.static_args, rows=rows_ptr, steps=steps_ptr, grad_scale=scale_ptr, found_inf=inf_ptr)
    hvp_keep = None
    if algorithm == "esgd":
        hvp_table = 0
        if hvps is not None:
            hvp_table, hvp_keep = _esgd_hvp_pointers(plan, batch, hvps)
        args["state_ptrs"] = [*plan.state_ptrs, hvp_table]
        args["scalar_state"] = [batch.scalars[k].data_ptr() for k, _ in _ESGD_SCALARS[1:]]
        args["hvp_step"] = int(hvps is not None)
        if device.type != "cpu":
            args["tickets"] = plan.tickets.data_ptr()
    if device.type == "cpu":
        plan.run(**args, nthreads=torch.get_num_threads())
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = torch.cuda.current_stream(index).cuda_stream
        plan.run(**args, device=index, stream=stream)
    del scale_keep, inf_keep, rows_keep, hvp_keep
