"""The implementations compared: fastmup backends, torch's three (under mup's
group splitting, as a mup user runs them today) and mup itself; on bf16
parameter sets also fastmup's parameter storage modes and, where installed,
torchao's AdamW with ``bf16_stochastic_round=True`` and torch-optimi's AdamW
with Kahan summation (``pip install --no-deps torchao torch-optimi``: neither
pulls a torch build then), under mup's group splitting like torch's.

Availability is decided at run time; :meth:`Impl.unavailable` returns the
reason an implementation cannot run here (shown in the output's notes).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from fastmup.bench.optimizers import OptimizerSpec, fastmup_class

__all__ = ["Impl", "IMPLS", "REFERENCE", "BASELINE", "get", "mup_module", "mup_param_groups"]

REFERENCE = "fastmup-eager"  # correctness reference
BASELINE = "torch-fused"  # speed-up baseline


def mup_module():
    try:
        return importlib.import_module("mup")
    except Exception:
        return None


def mup_param_groups(params: Sequence[torch.Tensor], rule: str, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """The param groups mup 1.0's ``MuAdam`` (``rule="adam"``) or ``MuSGD``
    (``"sgd"``) hands to the torch optimizer, for a machine without mup (a
    GPU image, say): the same partition, order and per-group lr / weight
    decay, so the torch baselines run as a mup user runs them.

    adam: hidden matrices (two infinite dims) grouped by width multiplier m,
    lr/m and wd·m; everything else one group.  sgd: matrices grouped by
    fan-in/fan-out multiplier ratio r (lr/r, wd·r), vectors (one infinite
    dim) by m (lr·m, wd/m), finite tensors one group.  Matrix groups come
    first, in order of appearance, as mup orders them.
    """
    if rule not in ("adam", "sgd"):
        raise ValueError(f"no mup splitting rule {rule!r}")
    matrices: dict[float, list] = {}
    vectors: dict[float, list] = {}
    rest: list = []
    for p in params:
        inf = p.infshape
        if inf.ninf() > 2:
            raise NotImplementedError("more than 2 inf dimensions")
        if inf.ninf() == 2:
            key = inf.width_mult() if rule == "adam" else inf.fanin_fanout_mult_ratio()
            matrices.setdefault(key, []).append(p)
        elif inf.ninf() == 1 and rule == "sgd":
            vectors.setdefault(inf.width_mult(), []).append(p)
        else:
            rest.append(p)
    groups = [dict(params=ps, lr=lr / k, weight_decay=weight_decay * k) for k, ps in matrices.items()]
    groups += [dict(params=ps, lr=lr * m, weight_decay=weight_decay / m) for m, ps in vectors.items()]
    return groups + [dict(params=rest, lr=lr, weight_decay=weight_decay)]


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
    # fastmup parameter storage options (stochastic_rounding, master_weights): bf16/fp16 sets only;
    # for an "external" optimizer, those of the fastmup eager run it is checked against
    options: tuple[tuple[str, Any], ...] = ()
    # "external": (module, class, extra keyword arguments, what to pip install)
    external: Optional[tuple[str, str, tuple[tuple[str, Any], ...], str]] = None

    @property
    def is_reference(self) -> bool:
        return self.name == REFERENCE

    def tolerance(self, base: float, check_steps: int) -> float:
        """The max relative error allowed against the eager reference:
        ``base`` (the dtype's), or, for stochastic rounding with random bits
        of another generator (torchao), one bf16 ulp (2^-7 relative) per
        checked step: each element may round the other way at every step."""
        if self.kind == "external" and dict(self.options).get("stochastic_rounding"):
            return max(base, check_steps * 2.0**-7)
        return base

    def prepare(self, device: torch.device) -> Optional[str]:
        """Load (building on first use) what this implementation needs, outside
        any timing; returns a note for the output, or None."""
        if self.kind == "torch" and mup_module() is None:
            return f"{self.name}: mup is not installed; its μP param groups are rebuilt by fastmup.bench.impls.mup_param_groups"
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

    def unavailable(self, opt: OptimizerSpec, device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
        """Why this implementation cannot run ``opt`` on ``device`` with
        parameters of ``dtype`` (None: it can)."""
        if self.kind == "fastmup":
            if fastmup_class(opt) is None:
                return f"fastmup has no {opt.fastmup_name} yet"
            if self.options:
                options = dict(self.options)
                if not getattr(fastmup_class(opt), "_storage_modes", False):
                    return f"{opt.label} takes no parameter storage options"
                wanted = (torch.bfloat16,) if options.get("master_weights") == "remainder" else (torch.bfloat16, torch.float16)
                if dtype is not None and dtype not in wanted:
                    return f"{', '.join(f'{k}={v!r}' for k, v in self.options)} applies to {'/'.join(str(d).replace('torch.', '') for d in wanted)} parameters"
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
        if self.kind == "per-tensor":
            return None if opt.name == "esgd" else f"the per-tensor torch loop exists for ESGD-M only, not {opt.label}"
        if self.kind == "external":
            module, cls, _, package = self.external
            if opt.name != "adamw":
                return f"{module}.{cls} is benchmarked as μAdamW only"
            if dtype is not None and dtype != torch.bfloat16:
                return f"{module}.{cls} is benchmarked on bf16 parameters only"
            try:
                getattr(importlib.import_module(module), cls)
            except Exception as e:  # noqa: BLE001 - not installed, or broken: skipped with the reason
                return f"{module}.{cls} is not importable ({type(e).__name__}; pip install --no-deps {package})"
            return None
        mup = mup_module()
        if self.kind == "torch":
            if opt.torch_name is None or opt.mup_splitter is None:
                return f"torch has no equivalent of {opt.label}"
            return None
        if self.kind == "mup":
            if mup is None:
                return "mup is not importable"
            if opt.mup_name is None or not hasattr(mup, opt.mup_name):
                return f"mup has no equivalent of {opt.label}"
            return None
        return f"unknown implementation kind {self.kind!r}"

    def make(self, params: Sequence[torch.Tensor], opt: OptimizerSpec) -> torch.optim.Optimizer:
        optimizer = self._make(params, opt)
        if opt.clip_max_norm is None:
            return optimizer
        from fastmup.bench.clipping import ClipThenStep

        return ClipThenStep(optimizer, params, opt.clip_max_norm, deferred=self.kind == "fastmup")

    def _make(self, params: Sequence[torch.Tensor], opt: OptimizerSpec) -> torch.optim.Optimizer:
        params = list(params)
        if self.kind == "per-tensor":
            return PerTensorESGD(params, **opt.hparams)
        if self.kind == "external":
            module, cls, extra, _ = self.external
            ext_cls = getattr(importlib.import_module(module), cls)
            hparams = dict(opt.hparams)
            lr, wd = hparams.pop("lr"), hparams.pop("weight_decay", 0.0)
            groups = mup_param_groups(params, "adam", lr, wd)
            return ext_cls(groups, lr=lr, weight_decay=wd, **hparams, **dict(extra))
        if self.kind == "fastmup":
            optimizer = fastmup_class(opt)(params, backend=self.backend, **opt.hparams, **dict(self.options))
            used = getattr(optimizer, "backend", self.backend)
            if used != self.backend:
                raise RuntimeError(f"asked for backend {self.backend!r}, got {used!r}")
            return optimizer
        mup = mup_module()
        if self.kind == "torch":
            torch_cls = getattr(torch.optim, opt.torch_name)
            flags = dict(self.flags)
            if mup is None:
                rule = {"MuAdam": "adam", "MuSGD": "sgd"}[opt.mup_splitter]
                hparams = dict(opt.hparams)
                groups = mup_param_groups(params, rule, hparams.pop("lr"), hparams.pop("weight_decay", 0.0))
                return torch_cls(groups, **flags, **hparams)
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
        # parameter storage modes (bf16 / fp16 sets), each checked against the eager reference in that mode
        Impl("fastmup-triton-sr", "fastmup", backend="triton", options=(("stochastic_rounding", True),)),
        Impl("fastmup-triton-remainder", "fastmup", backend="triton", options=(("master_weights", "remainder"),)),
        Impl("fastmup-triton-fp32master", "fastmup", backend="triton", options=(("master_weights", "fp32"),)),
        Impl("fastmup-cpu-sr", "fastmup", backend="cpu", options=(("stochastic_rounding", True),)),
        Impl("fastmup-cpu-remainder", "fastmup", backend="cpu", options=(("master_weights", "remainder"),)),
        Impl("fastmup-cpu-fp32master", "fastmup", backend="cpu", options=(("master_weights", "fp32"),)),
        # other projects' low-precision AdamWs (bf16 sets), checked against fastmup's eager run of the same remedy
        Impl("torchao-adamw-sr", "external", options=(("stochastic_rounding", True),),
             external=("torchao.optim", "_AdamW", (("bf16_stochastic_round", True),), "torchao")),  # torchao 0.18's name
        Impl("optimi-adamw-kahan", "external", options=(("master_weights", "fp32"),),
             external=("optimi", "AdamW", (("kahan_sum", True),), "torch-optimi")),
        Impl("torch-forloop", "torch", flags=(("foreach", False), ("fused", False))),
        Impl("torch-foreach", "torch", flags=(("foreach", True),)),
        Impl("torch-fused", "torch", flags=(("fused", True),)),
        Impl("mup", "mup"),
        # the seed's ESGD-M step as plain per-tensor torch ops (the unfused
        # baseline the fused backends are measured against)
        Impl("esgd-per-tensor-torch", "per-tensor"),
    )
}


class PerTensorESGD(torch.optim.Optimizer):
    """μESGD-M stepped by :func:`fastmup.optim.esgd.esgd_per_tensor_torch`:
    a Python loop over tensors, torch ops in the storage dtype.

    The per-tensor μP learning rates and weight decays come from a
    :class:`~fastmup.optim.MuESGD` built on the same params (its table, read
    once); tensors sharing (lr, wd) are stepped by one call.  HVP steps
    (``should_create_graph()``, same schedule) draw Rademacher probes from
    torch's RNG and take one ``autograd.grad`` over all params.
    """

    def __init__(self, params, **hparams) -> None:
        from fastmup.optim import MuESGD

        params = list(params)
        table = MuESGD(params, backend="eager", **hparams)
        self._table = table
        per_tensor = {id(p): (h["lr"], h["weight_decay"]) for p, h in table.tensor_hyperparameters().items()}
        group = table.param_groups[0]
        self._kw = dict(betas=tuple(group["betas"]), v=group["v"], lr_warmup=group["lr_warmup"], eps=group["eps"],
                        variant=group["variant"])
        super().__init__(params, dict(lr=group["lr"]))
        buckets: dict[tuple[float, float], list] = {}
        for p in params:
            buckets.setdefault(per_tensor[id(p)], []).append(p)
        self._buckets = list(buckets.items())
        for p in params:
            self.state[p] = dict(
                exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                exp_avg_d=torch.zeros_like(p, memory_format=torch.preserve_format),
                scalars=dict(exp_avg_bias_corr=1.0, exp_avg_d_bias_corr=1.0, lr_warmup_cumprod=1.0),
            )

    def should_create_graph(self) -> bool:
        return self._table.should_create_graph()

    @torch.no_grad()
    def step(self, closure=None):
        from fastmup.optim.esgd import esgd_per_tensor_torch

        hvp_step = self._table.should_create_graph()
        hvp_of = {}
        if hvp_step:
            params = [p for _, ps in self._buckets for p in ps if p.grad is not None]
            probes = [torch.randint(0, 2, p.shape, device=p.device).to(p.dtype).mul_(2).sub_(1) for p in params]
            with torch.enable_grad():
                hvps = torch.autograd.grad([p.grad for p in params], params, grad_outputs=probes, allow_unused=True)
            hvp_of = {id(p): torch.zeros_like(p) if h is None else h for p, h in zip(params, hvps)}
        for (lr, wd), ps in self._buckets:
            ps = [p for p in ps if p.grad is not None]
            if not ps:
                continue
            st = [self.state[p] for p in ps]
            esgd_per_tensor_torch(
                ps, [p.grad for p in ps], [s["exp_avg"] for s in st], [s["exp_avg_d"] for s in st],
                [s["scalars"] for s in st], [hvp_of[id(p)] for p in ps] if hvp_step else None,
                lr=lr, weight_decay=wd, **self._kw,
            )
        # the schedule's counters (the table optimizer never steps params)
        t = self._table
        if hvp_step:
            t.steps_since_d = 0
        t.steps += 1
        t.steps_since_d += 1



def get(name: str) -> Impl:
    try:
        return IMPLS[name]
    except KeyError:
        raise KeyError(f"unknown implementation {name!r}; known: {', '.join(IMPLS)}") from None
