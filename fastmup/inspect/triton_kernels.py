"""The Triton kernels of ``fastmup.kernels``, compiled as a GPU would compile them.

Which variants exist is not written down here: the optimizers are run, for
real, on small CPU tensors of every dtype signature and setting, through
their ``backend="triton"`` launchers; only the kernel launch itself is
intercepted (:func:`record`).  Each intercepted launch goes through Triton's
own argument specialisation (the JIT's binder: pointer types, 16-byte
divisibility, integer specialisation) and is compiled ahead of time with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` under
the options the launcher passed (``num_warps``, ``enable_fp_fusion``): the
very code a first launch on that GPU would build.  Compiled kernels land in
Triton's cache (``TRITON_CACHE_DIR``); the analyses in
:func:`fastmup.inspect.toolchain.cache_dir`.

The kernel modules must be imported compiled, not under ``TRITON_INTERPRET=1``:
:func:`kernel_modules` imports them so, and refuses if they were already
imported interpreted (run the inspection in its own process).
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import itertools
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from . import records, sass, targets, toolchain

__all__ = ["Launch", "Settings", "Variant", "all_settings", "representative_settings", "record", "variants", "inspect", "inspect_all"]

DTYPES = ("fp32", "bf16", "fp16")
AMP_MODES = ("none", "found_inf", "scale", "scale+found_inf")
ALGORITHMS = ("adam", "sgd", "esgd")
#: the modules of fastmup.kernels holding kernels
KERNEL_MODULES = ("adam", "sgd", "esgd", "rademacher")


@dataclass(frozen=True)
class Settings:
    """One way to drive an optimizer.

    ``option``: amsgrad on one group (adam), momentum (sgd), an HVP step
    (esgd, which also draws the probes).  ``amp``: which of GradScaler's
    ``grad_scale`` / ``found_inf`` the step gets (``found_inf`` alone: after
    ``scaler.unscale_``).  ``aligned=False``: the params are views one element
    into a buffer, so no address of the batch is 16-byte aligned.
    ``storage``: how the parameters are stored (``fastmup.plan.spec.ParamStorage``:
    "nearest", "stochastic", "master", "remainder"; bf16/fp16 params, Adam and SGD).
    """

    algorithm: str
    param: str = "fp32"
    state: str = "fp32"
    option: bool = False
    amp: str = "none"
    aligned: bool = True
    storage: str = "nearest"


def all_settings(algorithms: Sequence[str] = ALGORITHMS) -> list[Settings]:
    """Every dtype signature (param, state) with every option, AMP mode and alignment."""
    return [
        Settings(a, p, s, o, amp, al)
        for a in algorithms
        for p, s, o, amp, al in itertools.product(DTYPES, DTYPES, (False, True), AMP_MODES, (True, False))
    ]


def representative_settings(algorithms: Sequence[str] = ALGORITHMS) -> list[Settings]:
    """Per dtype signature: the defaults (with and without the option, except
    amsgrad), and everything on (option, grad_scale and found_inf) with
    aligned and with misaligned buffers: the lightest and the heaviest code."""
    out = []
    for a, p, s in itertools.product(algorithms, DTYPES, DTYPES):
        out.append(Settings(a, p, s))
        if a != "adam":
            out.append(Settings(a, p, s, option=True))
        out.append(Settings(a, p, s, option=True, amp="scale+found_inf"))
        out.append(Settings(a, p, s, option=True, amp="scale+found_inf", aligned=False))
    return out


# ----------------------------------------------------------------------
# the kernels, imported compiled
# ----------------------------------------------------------------------
def kernel_modules() -> dict[str, Any]:
    """``name -> module`` of fastmup.kernels, imported for compilation."""
    if os.environ.get("TRITON_INTERPRET") == "1" and not any(f"fastmup.kernels.{m}" in sys.modules for m in KERNEL_MODULES):
        os.environ["TRITON_INTERPRET"] = "0"  # this process never runs a kernel
    import fastmup  # noqa: F401  (registers fastmup.kernels in a source checkout)
    from triton.runtime.jit import JITFunction

    modules = {name: importlib.import_module(f"fastmup.kernels.{name}") for name in KERNEL_MODULES}
    for name, module in modules.items():
        if not any(isinstance(v, JITFunction) for v in vars(module).values()):
            raise toolchain.ToolError(
                f"fastmup.kernels.{name} was imported under TRITON_INTERPRET=1: inspect the kernels in a "
                "separate process (python -m fastmup.inspect)"
            )
    return modules


@dataclass
class Launch:
    """One intercepted kernel launch."""

    module: str
    kernel: Any  # the JITFunction
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.__name__


class _Recorder:
    def __init__(self, module: str, kernel, into: list):
        self.module, self.kernel, self.into = module, kernel, into
        self.__name__ = kernel.__name__

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.into.append(Launch(self.module, self.kernel, args, kwargs))

        return launch


@contextlib.contextmanager
def _intercepted(into: list) -> Iterator[None]:
    """Kernels replaced by recorders; the launchers accept CPU tensors."""
    from triton.runtime.jit import JITFunction

    modules = kernel_modules()
    common = importlib.import_module("fastmup.kernels._common")
    saved = []
    for name, module in modules.items():
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction) and attr.endswith("_kernel"):
                saved.append((module, attr, value))
                setattr(module, attr, _Recorder(name, value, into))
    saved.append((common, "check_device", common.check_device))
    common.check_device = lambda kernel, device: None
    env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # backend="triton" then takes CPU tensors
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)
        if env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = env


_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_SHAPES = ((64,), (17, 33), (300,))


def _params(settings: Settings):
    import torch

    from fastmup.infshape import InfDim, InfShape

    dtype = getattr(torch, _TORCH_DTYPES[settings.param])
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in _SHAPES:
        n = 1
        for d in shape:
            n *= d
        offset = 0 if settings.aligned else 1
        flat = torch.randn(n + offset, generator=gen).to(dtype)
        p = torch.nn.Parameter(flat[offset:].view(shape))
        p.infshape = InfShape([InfDim(None, d) for d in shape])
        params.append(p)
    return params


def _run_steps(settings: Settings) -> None:
    import torch

    # ESGD's HVP steps run backward(create_graph=True), which warns about
    # the cycle it makes; these throwaway params do not care.
    warnings.filterwarnings("ignore", message=".*create_graph=True.*")

    from fastmup.optim import ESGD, MuAdam, MuSGD

    params = _params(settings)
    state_dtype = getattr(torch, _TORCH_DTYPES[settings.state])
    storage = {
        "nearest": {},
        "stochastic": {"stochastic_rounding": True},
        "master": {"master_weights": "fp32"},
        "remainder": {"master_weights": "remainder"},
    }[settings.storage]
    if settings.algorithm == "adam":
        groups = [dict(params=params[:2]), dict(params=params[2:], amsgrad=settings.option)]
        opt = MuAdam(groups, lr=1e-3, weight_decay=0.01, backend="triton", state_dtype=state_dtype, **storage)
    elif settings.algorithm == "sgd":
        opt = MuSGD(params, lr=1e-2, momentum=0.9 if settings.option else 0.0, backend="triton", state_dtype=state_dtype,
                    **storage)
    elif settings.algorithm == "esgd":
        # ESGD's first step computes an HVP (probes, then the update with
        # d); with d_warmup=1 the second one does not.
        opt = ESGD(params, lr=0.1, d_warmup=1, update_d_every=100, backend="triton", state_dtype=state_dtype)
    else:
        raise ValueError(f"unknown algorithm {settings.algorithm!r}")
    if settings.amp in ("scale", "scale+found_inf"):
        opt.grad_scale = torch.tensor([1024.0])
    if settings.amp in ("found_inf", "scale+found_inf"):
        opt.found_inf = torch.tensor([0.0])
    steps = 1
    if settings.algorithm == "esgd" and not settings.option:
        steps = 2  # the first (HVP) step is recorded too, and dropped below
    for _ in range(steps):
        if settings.algorithm == "esgd" and opt.should_create_graph():
            with torch.enable_grad():
                loss = sum((p.float() ** 2 * (k + 1)).sum() for k, p in enumerate(params))
                loss.backward(create_graph=True)
        else:
            for p in params:
                p.grad = torch.ones_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


def record(settings: Settings) -> list[Launch]:
    """The kernel launches one optimizer step with ``settings`` makes."""
    launches: list[Launch] = []
    with _intercepted(launches):
        _run_steps(settings)
    if settings.algorithm == "esgd" and not settings.option:
        launches = [launch for launch in launches if launch.kwargs.get("HVP") is False]
    return launches


# ----------------------------------------------------------------------
# compilation
# ----------------------------------------------------------------------
@dataclass
class Variant:
    """A distinct compilation: kernel, constexprs and options, and where it
    was first seen (``record(settings)[index]``)."""

    launch: Launch
    constexprs: dict
    options: dict
    settings: Settings
    index: int

    @property
    def key(self) -> tuple:
        return (self.launch.name, tuple(sorted((k, str(v)) for k, v in self.constexprs.items())), tuple(sorted(self.options.items())))


def _specialise(launch: Launch, arch: int, **overrides):
    """(ASTSource, options, target) exactly as the JIT builds them for ``launch`` on ``arch``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**launch.kwargs, **overrides}
    bound, specialization, options = binder(*launch.args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), dict(options), target


def _variant(launch: Launch, settings: Settings, index: int) -> Variant:
    src, options, _ = _specialise(launch, 90)
    names = launch.kernel.arg_names
    constexprs = {names[k[0]]: v for k, v in src.constants.items() if len(k) == 1}
    return Variant(launch, constexprs, options, settings, index)


def variants(settings: Sequence[Settings]) -> list[Variant]:
    """The distinct compilations the launchers request for ``settings``."""
    found: dict[tuple, Variant] = {}
    for s in settings:
        for index, launch in enumerate(record(s)):
            v = _variant(launch, s, index)
            found.setdefault(v.key, v)
    return list(found.values())


def _compile(launch: Launch, arch: int, **overrides):
    import triton

    src, options, target = _specialise(launch, arch, **overrides)
    return triton.compile(src, target=target, options={**options, **overrides})


_NARROWING = re.compile(r"\bcvt(?:\.\w+)*\.(?:bf16|f16)(?:x2)?\.f32\b")


def _analyse_binary(kernel) -> dict:
    """SASS-side facts of a compiled kernel (cached by its cubin)."""
    cubin = kernel.asm["cubin"]

    def compute() -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "kernel.cubin"
            path.write_bytes(cubin)
            listing = toolchain.sass_listing(path)
            usage = toolchain.resource_usage(path)
        (fn,) = sass.parse_sass(listing)
        return records.binary_facts(fn, usage.get(fn.name, {}))

    return toolchain.cached("triton-sass", [records.analysis_key(), cubin], compute)


def compiler(arch: int) -> str:
    """Triton's version and that of the ptxas it runs for ``arch``."""
    import triton
    from triton.backends.nvidia import compiler as nvidia

    return f"triton {triton.__version__} (ptxas {nvidia.get_ptxas(arch).version})"


def inspect(variant: Variant, arch: int, **overrides) -> dict:
    """The record (:mod:`fastmup.inspect.records`) of ``variant`` compiled for
    ``arch``; ``overrides``: launch options to change (e.g. ``enable_fp_fusion=True``)."""
    kernel = _compile(variant.launch, arch, **overrides)
    options = {**variant.options, **overrides}
    facts = _analyse_binary(kernel)
    ptx = kernel.asm["ptx"]
    baseline_facts, baseline_ptx = facts, ptx
    if options.get("enable_fp_fusion", True):  # Triton's default is on
        baseline = _compile(variant.launch, arch, **{**overrides, "enable_fp_fusion": False})
        baseline_facts, baseline_ptx = _analyse_binary(baseline), baseline.asm["ptx"]
    c = variant.constexprs
    threads = 32 * int(options.get("num_warps", 4))
    record = records.make_record(
        source="triton",
        kernel=variant.launch.module,
        function=variant.launch.name,
        arch=arch,
        variant=describe(variant),
        facts=facts,
        shared_bytes=int(kernel.metadata.shared),
        elements_per_iteration=int(c["TILE"]) // threads if "TILE" in c else None,
        streams=streams(variant.launch.module, c),
        default=is_default(variant.launch.module, c),
        fma=dict(
            ptx=sass.ptx_fma_count(ptx),
            ptx_uncontracted=sass.ptx_fma_count(baseline_ptx),
            contractible=sass.ptx_contractible_count(ptx),
            sass=facts["fma"],
            sass_uncontracted=baseline_facts["fma"],
        ),
        options=options,
        compiler=compiler(arch),
    )
    record["ptx_narrowing"] = dict(collections.Counter(_NARROWING.findall(ptx)))
    return record


# ----------------------------------------------------------------------
# what each kernel moves, and its default variant
# ----------------------------------------------------------------------
def _dtype_name(tl_dtype) -> str:
    return {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}.get(str(tl_dtype), str(tl_dtype))


def _size(tl_dtype) -> int:
    return tl_dtype.primitive_bitwidth // 8


def streams(module: str, c: dict) -> list[records.Stream]:
    """The arrays a kernel variant reads and writes per element."""
    S = records.Stream
    if module in ("adam", "sgd"):
        # the parameter under its storage mode (fastmup.kernels.rounding: 2 = fp32 master, 3 = remainder)
        storage = c.get("STORAGE", 0)
        out = [S("param", _size(c["PARAM"]), 0 if storage == 2 else 1, 1), S("grad", _size(c["GRAD"]), 1, 0)]
        if storage == 2:
            out.append(S("master_weight", 4, 1, 1))
        elif storage == 3:
            out.append(S("weight_remainder", 2, 1, 1))
    if module == "adam":
        out += [S("exp_avg", _size(c["STATE"]), 1, 1), S("exp_avg_sq", _size(c["STATE"]), 1, 1)]
        if c["HAS_AMSGRAD"]:
            out.append(S("max_exp_avg_sq", _size(c["STATE"]), 1, 1))
        return out
    if module == "sgd":
        if c["HAS_MOMENTUM"]:
            out.append(S("momentum_buffer", _size(c["STATE"]), 1, 1))
        return out
    if module == "esgd":
        out = [S("param", _size(c["PARAM"]), 1, 1), S("grad", _size(c["GRAD"]), 1, 0), S("exp_avg", _size(c["STATE"]), 1, 1)]
        out.append(S("exp_avg_d", _size(c["STATE"]), 1, 1 if c["HVP"] else 0))
        if c["HVP"]:
            out.append(S("hvp", _size(c.get("HVP_DTYPE", c["PARAM"])), 1, 0))
        return out
    if module == "rademacher":
        return [S("probe", _size(c["OUT"]), 0, 1)]
    raise ValueError(f"no stream description for kernel module {module!r}")


def is_default(module: str, c: dict) -> bool:
    """Default settings: no amsgrad, no AMP, aligned buffers."""
    if c.get("HAS_SCALE") or c.get("HAS_FOUND_INF") or c.get("ALIGNED") is False or c.get("HAS_AMSGRAD"):
        return False
    if c.get("STORAGE", 0) != 0:  # a storage mode does more work per element than the default
        return False
    return True


def describe(variant: Variant) -> dict:
    c = variant.constexprs
    out: dict[str, Any] = {}
    for key, name in (("PARAM", "param"), ("GRAD", "grad"), ("STATE", "state"), ("OUT", "out")):
        if key in c:
            out[name] = _dtype_name(c[key])
    for key, value in sorted(c.items()):
        if isinstance(value, bool):
            out[key.lower()] = value
    if c.get("STORAGE", 0):
        out["storage"] = {1: "stochastic", 2: "master", 3: "remainder"}.get(c["STORAGE"], str(c["STORAGE"]))
    return out


def inspect_all(settings: Optional[Sequence[Settings]] = None, archs: Sequence[int] = targets.ARCHS, jobs: int = 1) -> list[dict]:
    """Records of every variant the launchers request for ``settings``
    (default: :func:`all_settings`), for each of ``archs``; ``jobs``: compile
    in that many processes."""
    found = variants(all_settings() if settings is None else settings)
    work = [(v.settings, v.index, arch) for v in found for arch in archs]
    if jobs <= 1:
        return [inspect(v, arch) for v in found for arch in archs]
    return records.parallel_map(_inspect_job, work, jobs)


def _inspect_job(settings: Settings, index: int, arch: int) -> dict:
    return inspect(_variant(record(settings)[index], settings, index), arch)
