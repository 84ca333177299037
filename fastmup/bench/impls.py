"""The implementations compared: fastmup backends, torch's three (under mup's
group splitting, as a mup user runs them today) and mup itself.

Availability is decided at run time; :meth:`Impl.unavailable` returns the
reason an implementation cannot run here (shown in the output's notes).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from fastmup.bench.optimizers import OptimizerSpec, fastmup_class

__all__ = ["Impl", "IMPLS", "REFERENCE", "BASELINE", "get", "mup_module"]

REFERENCE = "fastmup-eager"  # correctness reference
BASELINE = "torch-fused"  # speed-up baseline


def mup_module():
    try:
        return importlib.import_module("mup")
    except Exception:
        return None


_LOAD_ERRORS: dict[str, str] = {}  # device type -> why fastmup.ext failed to load in this process


def _extension_reason(device_type: str) -> Optional[str]:
    if device_type in _LOAD_ERRORS:
        return _LOAD_ERRORS[device_type]
    try:
        from fastmup.optim.backend import extension_available

        if extension_available(device_type):
            return None
        return f"fastmup.ext ({device_type}) is not available"
    except Exception as e:  # a failed build must not end the benchmark
        return f"fastmup.ext ({device_type}) failed to load: {type(e).__name__}: {e}"


@dataclass(frozen=True)
class Impl:
    name: str
    kind: str  # "fastmup", "torch" or "mup"
    backend: Optional[str] = None  # fastmup backend
    flags: tuple[tuple[str, bool], ...] = ()  # torch.optim implementation flags

    @property
    def is_reference(self) -> bool:
        return self.name == REFERENCE

    def prepare(self, device: torch.device) -> Optional[str]:
        """Load (building on first use) what this implementation needs, outside
        any timing; returns a note for the output, or None."""
        if self.kind != "fastmup" or self.backend not in ("cuda", "cpu") or device.type != self.backend:
            return None
        if _extension_reason(self.backend) is not None:
            return None  # reported per case as unavailable
        import time

        began = time.perf_counter()
        try:
            from fastmup import ext

            ext.load(self.backend)
        except Exception as e:  # noqa: BLE001 - the run goes on without this backend
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _LOAD_ERRORS[self.backend] = f"fastmup.ext ({self.backend}) failed to build/load: {type(e).__name__}: {first}"
            return f"{self.name}: {_LOAD_ERRORS[self.backend]}"
        return f"{self.name}: fastmup.ext ({self.backend}) loaded in {time.perf_counter() - began:.1f} s (includes a build if it was not cached)"

    def unavailable(self, opt: OptimizerSpec, device: torch.device) -> Optional[str]:
        """Why this implementation cannot run ``opt`` on ``device`` (None: it can)."""
        if self.kind == "fastmup":
            if fastmup_class(opt) is None:
                return f"fastmup has no {opt.fastmup_name} yet"
            if self.backend == "triton":
                if device.type != "cuda":
                    return "Triton backend runs on GPU only"
                from fastmup.optim.backend import triton_available

                return None if triton_available() else "triton is not importable"
            if self.backend in ("cuda", "cpu"):
                if device.type != self.backend:
                    return f"backend {self.backend!r} needs {self.backend} tensors"
                return _extension_reason(self.backend)
            return None
        mup = mup_module()
        if self.kind == "torch":
            if opt.torch_name is None or opt.mup_splitter is None:
                return f"torch has no equivalent of {opt.label}"
            if mup is None:
                return "mup is not importable (needed for its μP param-group splitting)"
            return None
        if self.kind == "mup":
            if mup is None:
                return "mup is not importable"
            if opt.mup_name is None or not hasattr(mup, opt.mup_name):
                return f"mup has no equivalent of {opt.label}"
            return None
        return f"unknown implementation kind {self.kind!r}"

    def make(self, params: Sequence[torch.Tensor], opt: OptimizerSpec) -> torch.optim.Optimizer:
        params = list(params)
        if self.kind == "fastmup":
            optimizer = fastmup_class(opt)(params, backend=self.backend, **opt.hparams)
            used = getattr(optimizer, "backend", self.backend)
            if used != self.backend:
                raise RuntimeError(f"asked for backend {self.backend!r}, got {used!r}")
            return optimizer
        mup = mup_module()
        if self.kind == "torch":
            torch_cls = getattr(torch.optim, opt.torch_name)
            flags = dict(self.flags)
            split = getattr(mup, opt.mup_splitter)
            return split(params, impl=lambda groups, **kw: torch_cls(groups, **flags, **kw), **opt.hparams)
        return getattr(mup, opt.mup_name)(params, **opt.hparams)


IMPLS: dict[str, Impl] = {
    i.name: i
    for i in (
        Impl("fastmup-eager", "fastmup", backend="eager"),
        Impl("fastmup-triton", "fastmup", backend="triton"),
        Impl("fastmup-cuda", "fastmup", backend="cuda"),
        Impl("fastmup-cpu", "fastmup", backend="cpu"),
        Impl("torch-forloop", "torch", flags=(("foreach", False), ("fused", False))),
        Impl("torch-foreach", "torch", flags=(("foreach", True),)),
        Impl("torch-fused", "torch", flags=(("fused", True),)),
        Impl("mup", "mup"),
    )
}


def get(name: str) -> Impl:
    try:
        return IMPLS[name]
    except KeyError:
        raise KeyError(f"unknown implementation {name!r}; known: {', '.join(IMPLS)}") from None
