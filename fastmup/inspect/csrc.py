"""The CUDA kernels of ``csrc/``, compiled with nvcc for sm_80 / sm_90 and read.

:func:`inspect_csrc` compiles every ``csrc/*.cu`` with the extension build's
nvcc flags (:func:`nvcc_command`, the one place this module's compile flags
are made), to PTX once more with ``--fmad=false`` when those flags allow
contraction (to count the FMAs the source writes), disassembles the objects
with ``cuobjdump`` and returns one record (:mod:`fastmup.inspect.records`)
per kernel instantiation, loop role and architecture.

The kernel ``multi_tensor_kernel<Op, P, G, S>`` is instantiated for every
dtype combination; records cover those with ``G == P`` (autograd gives a
parameter a gradient of its own dtype, so those are the ones a launch meets).
``multi_tensor_storage_kernel<Op, P, P, S, STORAGE>`` is the same update
under a parameter storage mode (:data:`STORAGE_KERNELS`): its records carry
``variant["storage"]`` and the mode's streams (an fp32 master read and
written in place of the param's read; a 16-bit remainder beside the param).
Each instantiation runs ``update_entry`` in the variants of
``dispatch_variant`` (common.h): two state masks (``base``, and ``full``:
amsgrad, momentum, an HVP step), the gradient unscaled by an exact multiply
or, for a loss scale without an exact reciprocal, divided (``divide``), and
for ESGD-M's HVP steps the EMA or the max rule (``max_rule``): :data:`VARIANTS`.
Each variant has a 16-byte vector loop (every buffer aligned) and two scalar
loops (the tail, or every element of a misaligned tensor), with and without
the deferred clip (``clip``), each moving two elements per thread and
iteration (four under stochastic rounding: :func:`scalar_elements`).  Loops are told
apart in the SASS (:func:`_roles`): vector loops have 128-bit accesses
(``aligned: True``); the bytes a loop moves give its mask, its IEEE divisions
and NaN-propagating maxes per element the rest.  One copy of a loop body
handles the vector width (``VecWidth`` of multi_tensor.cuh: 16 bytes of the
narrowest dtype) or, in a scalar loop, its elements per iteration.

Record fields are those of :mod:`fastmup.inspect.records`; ``variant`` is
``{"param", "grad", "state", "mask", "divide", ["max_rule",] ["clip",] "aligned"[, "storage"]}``
(``clip``: scalar loops only), ``options`` the nvcc flags.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from . import records, sass, targets, toolchain

__all__ = ["inspect_csrc", "nvcc_command", "OPS", "STORAGE_KERNELS", "VARIANTS", "Variant"]

_DTYPES = {"float": ("fp32", 4), "fastmup::Bf16": ("bf16", 2), "fastmup::Fp16": ("fp16", 2)}
_KERNEL = re.compile(r"fastmup::cuda::multi_tensor_(?:storage_)?kernel<fastmup::(\w+), ([\w:]+), ([\w:]+), ([\w:]+)(?:, (\d+))?>")

#: Op -> (kernel name, streams of the base mask, streams the full mask adds);
#: a stream is (name, role, reads, writes), role: P, G or S (its dtype).
OPS = {
    "AdamOp": ("adam", [("param", "P", 1, 1), ("grad", "G", 1, 0), ("exp_avg", "S", 1, 1), ("exp_avg_sq", "S", 1, 1)],
               [("max_exp_avg_sq", "S", 1, 1)]),
    "SgdOp": ("sgd", [("param", "P", 1, 1), ("grad", "G", 1, 0)], [("momentum_buffer", "S", 1, 1)]),
    # base: a plain step reads d; full: an HVP step also writes d and reads the HVP (grad dtype)
    "EsgdOp": ("esgd", [("param", "P", 1, 1), ("grad", "G", 1, 0), ("exp_avg", "S", 1, 1), ("exp_avg_d", "S", 1, 0)],
               [("exp_avg_d", "S", 0, 1), ("hvp", "G", 1, 0)]),
}


@dataclass(frozen=True)
class Variant:
    """One compiled variant of ``update_entry`` (common.h's dispatch_variant):
    its state mask, whether the gradient is divided by the loss scale (a
    scale without an exact reciprocal) and ESGD-M's max rule, with what
    tells it apart in the SASS: IEEE divisions and NaN-propagating maxes per
    element (the source's ``/`` and ``max_propagate_nan``)."""

    mask: str  # "base" or "full"
    divide: bool
    max_rule: bool
    divisions: int
    nan_maxes: int

    def flags(self, op: str) -> dict:
        out = {"mask": self.mask, "divide": self.divide}
        if op == "EsgdOp":
            out["max_rule"] = self.max_rule
        return out


def _variants(op: str) -> list[Variant]:
    # (mask, max rule, divisions, NaN maxes) of the exact-multiply unscaling;
    # dividing by the scale adds a division per gradient-dtype input (grad, HVP)
    plain = {
        "AdamOp": [("base", False, 1, 0), ("full", False, 1, 1)],  # m / denom; amsgrad's maximum
        "SgdOp": [("base", False, 0, 0), ("full", False, 0, 0)],
        "EsgdOp": [("base", False, 1, 0), ("full", False, 1, 0), ("full", True, 1, 1)],  # m_est / denom
    }[op]
    out = []
    for divide in (False, True):
        for mask, max_rule, div, nan in plain:
            inputs = 2 if (op == "EsgdOp" and mask == "full") else 1
            out.append(Variant(mask, divide, max_rule, div + (inputs if divide else 0), nan))
    return out


#: every compiled variant of each Op's update, as :func:`inspect_csrc` labels the loops
VARIANTS = {op: _variants(op) for op in OPS}

#: the parameter storage modes (csrc/rounding.h's enum Storage, fastmup.plan.spec.ParamStorage) by code
STORAGE_NAMES = {0: "nearest", 1: "stochastic", 2: "master", 3: "remainder"}

#: Op -> param dtype -> the storage modes other than "nearest" compiled for it
#: (``multi_tensor_storage_kernel``, instantiated for gradients in the param's
#: dtype): 16-bit params, remainders for bf16 only; ESGD-M takes none
STORAGE_KERNELS = {
    "AdamOp": {"bf16": ("stochastic", "master", "remainder"), "fp16": ("stochastic", "master")},
    "SgdOp": {"bf16": ("stochastic", "master", "remainder"), "fp16": ("stochastic", "master")},
    "EsgdOp": {},
}


def nvcc_command(source: Path, archs: Sequence[int], out: Path, *, contraction: bool = True, ptx_only: bool = False) -> list[str]:
    """nvcc compiling ``source`` to ``out`` as the extension build does, with
    SASS and PTX for each of ``archs``; ``contraction=False`` adds
    ``--fmad=false``; ``ptx_only``: just the PTX of the single arch."""
    from fastmup.ext import build

    nvcc = build.find_nvcc()
    if nvcc is None:
        raise toolchain.ToolError("nvcc not found (set $CUDA_HOME or put nvcc on PATH)")
    flags = list(build._NVCC_FLAGS) + [f"-I{build.csrc_dir()}"]
    flags += shlex.split(os.environ.get("FASTMUP_NVCCFLAGS", ""))
    if ptx_only:
        (arch,) = archs
        flags += [f"-arch=compute_{arch}", "-ptx"]
    else:
        for arch in archs:
            flags += ["-gencode", f"arch=compute_{arch},code=[sm_{arch},compute_{arch}]"]
    if not contraction:
        flags.append("--fmad=false")
    return [nvcc, *flags, *([] if ptx_only else ["-c"]), str(source), "-o", str(out)]


def _contracts(cmd: Sequence[str]) -> bool:
    """Whether nvcc may contract under these flags (its default is --fmad=true)."""
    fmad = [a for a in cmd if a.startswith(("--fmad", "-fmad"))]
    return not fmad or fmad[-1].split("=")[-1] not in ("false", "0")


def _demangle(names: Sequence[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if tool is None:
        raise toolchain.ToolError("c++filt (binutils) not found: needed to read the csrc kernel names")
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout.splitlines()
    return dict(zip(names, out))


def _compile_all(sources: Sequence[Path], archs: Sequence[int], tmp: Path, **kw) -> dict[Path, Path]:
    def one(src: Path) -> tuple[Path, Path]:
        out = tmp / f"{src.stem}{'.ptx' if kw.get('ptx_only') else '.o'}"
        cmd = nvcc_command(src, archs, out, **kw)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise toolchain.ToolError(f"nvcc failed on {src.name}:\n{shlex.join(cmd)}\n{r.stderr[-4000:]}")
        return src, out

    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(sources), os.cpu_count() or 1))) as pool:
        return dict(pool.map(one, sources))


def _ptx(obj: Path, arch: int) -> dict[str, str]:
    text = subprocess.run([toolchain.cuobjdump(), "-ptx", "-arch", f"sm_{arch}", str(obj)], capture_output=True, text=True).stdout
    return sass.ptx_functions(text)


def _streams(op: str, mask: str, sizes: dict[str, int], storage: str = "nearest") -> list[records.Stream]:
    _, base, extra = OPS[op]
    merged: dict[str, list] = {}
    for name, role, r, w in base + (extra if mask == "full" else []):
        entry = merged.setdefault(name, [sizes[role], 0, 0])
        entry[1] |= r
        entry[2] |= w
    if storage == "master":  # the update starts from the fp32 master: the param is only written
        merged["param"][1] = 0
        merged["master_weight"] = [4, 1, 1]
    elif storage == "remainder":
        merged["weight_remainder"] = [2, 1, 1]
    return [records.Stream(name, b, r, w) for name, (b, r, w) in merged.items()]


def _expected_bytes(op: str, mask: str, sizes: dict[str, int], storage: str = "nearest") -> int:
    return sum(st.bytes * (st.reads + st.writes) for st in _streams(op, mask, sizes, storage))


#: elements per thread in one iteration of a scalar loop (multi_tensor.cuh's scalar_loop)
SCALAR_ELEMENTS = 2
#: the same for the parameter storage modes whose scalar loops differ: stochastic
#: rounding takes four adjacent elements (two pairs of hash-word halves) per iteration
SCALAR_ELEMENTS_OF_STORAGE = {"stochastic": 4}


def scalar_elements(storage: str = "nearest") -> int:
    """Elements per thread and iteration of a scalar loop under ``storage``."""
    return SCALAR_ELEMENTS_OF_STORAGE.get(storage, SCALAR_ELEMENTS)


#: NaN tests (``FSETP.NAN``, besides the variant's) per element that a parameter
#: storage mode may add, by param dtype: stochastic rounding to bf16 tests each
#: pair of results for NaN (rounding.h's dithered_bf16_pair is exact otherwise)
ROUNDING_NAN_TESTS = {("stochastic", "bf16"): 0.5}


def _roles(op: str, loops: list[dict], sizes: dict[str, int], storage: str = "nearest",
           nan_tests: float = 0.0) -> list[tuple[int, Optional[Variant], bool, Optional[bool]]]:
    """(loop index, variant, aligned, clip) for the loops of one kernel function.

    Vector loops have 128-bit accesses (``aligned``), scalar loops none.  A
    loop is a variant's when it moves a whole number of elements of the
    variant's streams (vector loops: a multiple of the vector width; scalar
    loops: :func:`scalar_elements`) and has the variant's divisions and
    NaN-propagating maxes for that many elements (and up to ``nan_tests``
    per element more: :data:`ROUNDING_NAN_TESTS`).  Each variant has one
    vector loop and two scalar loops, one with the deferred clip (``clip``:
    the longer, as it does the clip's work besides) and one without; the
    loops must match them one to one; when the code does not (a changed
    kernel), the loops get no variant (None) and show as ``loopN`` with the
    full mask's streams.
    """
    vec = 16 // min(sizes.values())
    out = []
    for aligned in (True, False):
        kind = [k for k, loop in enumerate(loops) if (loop["loads_128"] + loop["stores_128"] > 0) == aligned]
        variants = list(VARIANTS[op]) if aligned else [v for v in VARIANTS[op] for _ in range(2)]

        def fits(loop: dict, v: Variant) -> bool:
            expected = _expected_bytes(op, v.mask, sizes, storage)
            elements, rest = divmod(loop["bytes"], expected)
            if rest or not elements or (elements % vec if aligned else elements != scalar_elements(storage)):
                return False
            nan = loop.get("nan_maxes", 0) - v.nan_maxes * elements
            return loop.get("divisions") == v.divisions * elements and 0 <= nan <= nan_tests * elements

        options = {k: [n for n, v in enumerate(variants) if fits(loops[k], v)] for k in kind}
        assignment: dict[int, int] = {}

        def assign(i: int, used: set) -> bool:
            if i == len(kind):
                return True
            for n in options[kind[i]]:
                if n not in used:
                    assignment[kind[i]] = n
                    if assign(i + 1, used | {n}):
                        return True
            return False

        if len(kind) == len(variants) and assign(0, set()):
            if aligned:
                out += [(k, variants[assignment[k]], aligned, None) for k in kind]
            else:
                by_variant: dict[Variant, list[int]] = {}
                for k in kind:
                    by_variant.setdefault(variants[assignment[k]], []).append(k)
                for v, ks in by_variant.items():
                    shorter, longer = sorted(ks, key=lambda k: (loops[k]["instructions"], k))
                    out += [(shorter, v, aligned, False), (longer, v, aligned, True)]
        else:
            out += [(k, None, aligned, None) for k in kind]
    return out


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return f"nvcc {m.group(1) if m else '?'}"


def _analyse(sources: Sequence[Path], archs: Sequence[int]) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="fastmup-inspect-") as tmp:
        tmp = Path(tmp)
        objs = _compile_all(sources, archs, tmp)
        probe = nvcc_command(sources[0], archs, tmp / "x.o")
        # The FMAs the source writes: the PTX compiled with contraction off
        # (nvcc contracts before code generation, so one arch's PTX serves).
        plain = {}
        if _contracts(probe):
            plain_dir = tmp / "plain"
            plain_dir.mkdir()
            plain = {src: sass.ptx_functions(path.read_text())
                     for src, path in _compile_all(sources, [max(archs)], plain_dir, contraction=False, ptx_only=True).items()}
        compiler = _nvcc_version(probe[0])
        out = []
        for src in sources:
            for arch in archs:
                fns = {f.name: f for f in sass.parse_sass(toolchain.sass_listing(objs[src], arch))}
                usage = toolchain.resource_usage(objs[src], arch)
                ptx = _ptx(objs[src], arch)
                plain_ptx = plain.get(src, ptx)
                names = _demangle(sorted(fns))
                for mangled, fn in sorted(fns.items()):
                    m = _KERNEL.search(names[mangled])
                    if not m or m.group(1) not in OPS:
                        continue
                    op, p, g, s, code = m.groups()
                    storage = STORAGE_NAMES[int(code or 0)]
                    if g != p:
                        continue
                    facts = records.binary_facts(fn, usage.get(mangled, {}))
                    sizes = {"P": _DTYPES[p][1], "G": _DTYPES[g][1], "S": _DTYPES[s][1]}
                    fma = dict(
                        ptx=sass.ptx_fma_count(ptx.get(mangled, "")),
                        ptx_uncontracted=sass.ptx_fma_count(plain_ptx.get(mangled, "")),
                        contractible=sass.ptx_contractible_count(ptx.get(mangled, "")),
                    )
                    roles = _roles(op, facts["loops"], sizes, storage, ROUNDING_NAN_TESTS.get((storage, _DTYPES[p][0]), 0.0))
                    for n, (index, v, aligned, clip) in enumerate(roles):
                        flags = v.flags(op) if v is not None else {"mask": f"loop{n}"}
                        if clip is not None:
                            flags["clip"] = clip
                        variant = dict(param=_DTYPES[p][0], grad=_DTYPES[g][0], state=_DTYPES[s][0], **flags, aligned=aligned)
                        if storage != "nearest":
                            variant["storage"] = storage
                        streams = _streams(op, v.mask if v is not None else "full", sizes, storage)
                        out.append(
                            records.make_record(
                                source="csrc",
                                kernel=OPS[op][0],
                                function=mangled,
                                arch=arch,
                                variant=variant,
                                facts=facts,
                                shared_bytes=0,
                                elements_per_iteration=16 // min(sizes.values()) if aligned else scalar_elements(storage),
                                streams=streams,
                                default=v is not None and aligned and not v.divide and not v.max_rule
                                and (v.mask == "base" or op != "AdamOp") and storage == "nearest",
                                fma=fma,
                                options={"nvcc": shlex.join(probe[1:-4])},
                                compiler=compiler,
                                loop_index=index,
                            )
                        )
        return out


def inspect_csrc(archs: Sequence[int] = targets.ARCHS, sources: Optional[Sequence[Path]] = None) -> list[dict]:
    """Records of every csrc kernel (see the module docstring), cached by the
    sources, nvcc's version and the flags."""
    from fastmup.ext import build

    root = build.csrc_dir()
    sources = sorted(root.glob("*.cu")) if sources is None else [Path(s) for s in sources]
    probe = nvcc_command(sources[0], archs, Path("x.o"))
    version = subprocess.run([probe[0], "--version"], capture_output=True, text=True).stdout
    key = [records.analysis_key(), Path(__file__).read_text(), version, shlex.join(probe[1:-4]), toolchain.cuobjdump()]
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".h", ".cuh", ".cu")):
        key += [str(path.relative_to(root)), hashlib.sha256(path.read_bytes()).hexdigest()]
    key += [s.name for s in sources]
    result = toolchain.cached("csrc", key, lambda: {"records": _analyse(sources, archs)})
    return result["records"]
