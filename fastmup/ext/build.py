"""Building the C++/CUDA extension modules of ``csrc/`` on first use.

Three modules, built independently:

``_fastmup_cpu``   ``csrc/host/*.cpp``: the ``cpu`` backend, any C++17
                   compiler (OpenMP when it has it).
``_fastmup_cuda``  ``csrc/*.cu`` (nvcc) + ``csrc/cuda_bindings.cpp``: the
                   ``cuda`` backend, linked with the static CUDA runtime.
``_fastmup_plan``  ``csrc/plan/checks.cpp``: the optimizer plan's per-step
                   checks over the tensors (an optional speed-up of every
                   backend's step; :func:`fastmup.ext.plan_checks`).

The backends are plain pybind11 modules taking raw addresses, so they are not
compiled against PyTorch's C++ ABI: any compiler that builds pybind11 will do.
The ``plan`` module reads tensors, so it is compiled against the installed
torch's headers (C++20, torch's ABI flag) and linked with its libraries; its
cache key covers torch's version and location.

A build lives in ``<root>/<kind>-<hash>`` where ``<root>`` is
``$FASTMUP_EXT_DIR`` or ``~/.cache/fastmup/ext`` and ``<hash>`` covers the
sources, the compiler (path and version), the flags, the Python ABI and the
pybind11 version, so a change to any of them builds afresh and a stale module
is never loaded.  The build writes a ``build.ninja`` and runs ninja (the
``ninja`` pip package or one on PATH); without ninja it runs the same
commands one by one.  A file lock serialises concurrent builds of one key.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

__all__ = [
    "BuildError",
    "build_extension",
    "cache_root",
    "compile_cuda_sources",
    "csrc_dir",
    "find_cxx",
    "find_ninja",
    "find_nvcc",
    "missing_requirements",
    "module_name",
]

#: bumped when the build recipe changes in a way the hash would not see
RECIPE_VERSION = "1"

KINDS = ("cpu", "cuda", "plan")

_CPU_SOURCES = (
    "host/adam_host.cpp",
    "host/sgd_host.cpp",
    "host/esgd_host.cpp",
    "host/isa.cpp",
    "host/rounding_host.cpp",
    "host/grad_norm_host.cpp",
    "host/bindings.cpp",
)
_CUDA_CXX_SOURCES = ("cuda_bindings.cpp",)
_PLAN_SOURCES = ("plan/checks.cpp",)
#: what a first build takes on 2 cores, as the build's progress line says
_BUILD_TIMES = {"plan": "about 15 s"}
_SOURCE_SUFFIXES = (".h", ".cuh", ".cpp", ".cu", ".inc")

# -ffp-contract=off: no fused multiply-adds the reference does not do (x86-64
#   has none without -mfma anyway; aarch64 would contract), so results do not
#   depend on the target.
# -fno-math-errno / -fno-trapping-math: sqrtf needs no errno, and selects on
#   per-tensor flags may be computed both ways; neither changes a result, both
#   are needed for GCC to vectorise the update loops.
_CXX_FLAGS = (
    "-std=c++17",
    "-O3",
    "-fPIC",
    "-fvisibility=hidden",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
)
# --fmad=false: nvcc contracts a*b + c into one fused multiply-add by default;
#   the reference rounds the product first, and so does the host build
#   (-ffp-contract=off above), so the CUDA and host backends round alike.
_NVCC_FLAGS = (
    "-std=c++17",
    "-O3",
    "--expt-relaxed-constexpr",
    "--fmad=false",
    "-Xcompiler",
    "-fPIC",
    "-Xcompiler",
    "-fvisibility=hidden",
)
DEFAULT_CUDA_ARCHS = ("sm_80", "sm_90")


class BuildError(RuntimeError):
    """The extension cannot be built: a missing tool, or a failed compile (with its log)."""


# ---------------------------------------------------------------------------
# where things are
# ---------------------------------------------------------------------------
def csrc_dir() -> Path:
    """The C++/CUDA sources: ``fastmup/csrc`` when installed, ``<repo>/csrc`` in a checkout."""
    override = os.environ.get("FASTMUP_CSRC")
    here = Path(__file__).resolve().parent  # fastmup/ext
    candidates = ([Path(override)] if override else []) + [here.parent / "csrc", here.parent.parent / "csrc"]
    for candidate in candidates:
        if (candidate / "common.h").is_file():
            return candidate
    raise BuildError(
        "fastmup: cannot find the C++/CUDA sources (csrc/); looked in "
        + ", ".join(str(c) for c in candidates)
        + ". Reinstall fastmup, or set FASTMUP_CSRC to the csrc directory."
    )


def user_cache(variable: str, name: str) -> Path:
    """``$variable`` when set, else ``fastmup/<name>`` under the user's cache
    directory (``$XDG_CACHE_HOME``, else ``~/.cache``)."""
    root = os.environ.get(variable)
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastmup" / name


def cache_root() -> Path:
    """Where built extensions go: ``$FASTMUP_EXT_DIR``, else ``~/.cache/fastmup/ext``."""
    return user_cache("FASTMUP_EXT_DIR", "ext")


def module_name(kind: str) -> str:
    _check_kind(kind)
    return f"_fastmup_{kind}"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown extension kind {kind!r}; expected one of {KINDS}")


# ---------------------------------------------------------------------------
# tools
# ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def find_cxx() -> Optional[str]:
    """The host C++ compiler: ``$CXX``, else ``c++``, ``g++`` or ``clang++`` on PATH."""
    env = os.environ.get("CXX")
    if env:
        exe = shlex.split(env)[0]
        found = shutil.which(exe)
        return found or (exe if os.path.isfile(exe) else None)
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


@functools.lru_cache(maxsize=None)
def find_nvcc() -> Optional[str]:
    """nvcc: ``$NVCC``, ``$CUDA_HOME/bin``, ``$CUDA_PATH/bin``, PATH, then /usr/local/cuda."""
    env = os.environ.get("NVCC")
    if env and (shutil.which(env) or os.path.isfile(env)):
        return shutil.which(env) or env
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.isfile(default) else None


@functools.lru_cache(maxsize=None)
def find_ninja() -> Optional[str]:
    """ninja from the ``ninja`` pip package, else on PATH; None: build without it."""
    try:
        import ninja  # type: ignore

        candidate = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.isfile(candidate):
            return candidate
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        pass
    return shutil.which("ninja")


def pybind11_available() -> bool:
    try:
        return importlib.util.find_spec("pybind11") is not None
    except (ImportError, ValueError):
        return False


def _pybind11() -> tuple[str, str]:
    import pybind11  # type: ignore

    return pybind11.get_include(), getattr(pybind11, "__version__", "?")


def cxx_command() -> list[str]:
    """The compiler command: ``$CXX`` split like a shell would (e.g. ``ccache g++``), else :func:`find_cxx`."""
    env = os.environ.get("CXX")
    exe = find_cxx()
    if exe is None:
        return []
    if env:
        parts = shlex.split(env)
        return [exe] + parts[1:]
    return [exe]


@functools.lru_cache(maxsize=None)
def _tool_version(*cmd: str) -> str:
    try:
        out = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=60)
        return (out.stdout or out.stderr).strip()
    except Exception as e:  # noqa: BLE001
        return f"unknown ({e})"


def missing_requirements(kind: str) -> list[str]:
    """What prevents building ``kind``, in words (empty: nothing)."""
    _check_kind(kind)
    missing = []
    if find_cxx() is None:
        missing.append("a C++ compiler (set $CXX or install g++/clang++)")
    if not pybind11_available():
        missing.append("pybind11 (pip install pybind11)")
    if kind == "cuda" and find_nvcc() is None:
        missing.append("nvcc, the CUDA compiler (set $CUDA_HOME or put nvcc on PATH)")
    if kind == "plan" and _torch_build_flags() is None:
        missing.append("torch's C++ headers and libraries (a torch wheel ships them)")
    try:
        csrc_dir()
    except BuildError:
        missing.append("the csrc/ sources shipped with fastmup")
    return missing


@functools.lru_cache(maxsize=None)
def openmp_flag(*cxx: str) -> Optional[str]:
    """``-fopenmp`` when ``cxx`` compiles and links an OpenMP program, else None (std::thread fallback)."""
    if os.environ.get("FASTMUP_NO_OPENMP"):
        return None
    src = "#include <omp.h>\nint main() { int n = 0;\n#pragma omp parallel reduction(+:n)\n n += 1;\n return n > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "omp.cpp")
        with open(path, "w") as f:
            f.write(src)
        try:
            r = subprocess.run(
                [*cxx, "-fopenmp", path, "-o", os.path.join(tmp, "omp")], capture_output=True, timeout=120
            )
        except Exception:  # noqa: BLE001
            return None
        return "-fopenmp" if r.returncode == 0 else None


# ---------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------
def _normalize_arch(arch: str | int) -> str:
    s = str(arch).strip().lower().replace(".", "")
    s = s.removeprefix("sm_").removeprefix("compute_").removeprefix("sm")
    if not re.fullmatch(r"\d+[a-z]?", s):
        raise ValueError(f"bad CUDA architecture {arch!r}; expected e.g. 'sm_90', '90' or '9.0'")
    return s


def gencode_flags(archs: Sequence[str | int]) -> list[str]:
    """``-gencode`` for each arch (SASS), plus PTX of the newest for later GPUs."""
    norm = sorted({_normalize_arch(a) for a in archs}, key=lambda a: (int(re.sub(r"\D", "", a)), a))
    if not norm:
        raise ValueError("no CUDA architecture given")
    flags = []
    for a in norm:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{norm[-1]},code=compute_{norm[-1]}"]
    return flags


def cuda_archs() -> list[str]:
    """Archs for load("cuda"): ``$FASTMUP_CUDA_ARCHS`` ("80;90" or "sm_80,sm_90"),
    else those of the visible GPUs (capped at what nvcc supports), else sm_80/sm_90."""
    env = os.environ.get("FASTMUP_CUDA_ARCHS")
    if env:
        return [a for a in re.split(r"[;, ]+", env) if a]
    archs: list[str] = []
    try:
        import torch

        if torch.cuda.is_available():
            archs = sorted({f"{major}{minor}" for major, minor in (torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))})
    except Exception:  # noqa: BLE001
        archs = []
    if not archs:
        return list(DEFAULT_CUDA_ARCHS)
    supported = _nvcc_archs()
    if supported:
        top = max(supported, key=int)
        archs = [a if a in supported else (a if int(a) < int(top) else top) for a in archs]
    return archs


@functools.lru_cache(maxsize=None)
def _nvcc_archs() -> tuple[str, ...]:
    nvcc = find_nvcc()
    if nvcc is None:
        return ()
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except Exception:  # noqa: BLE001
        return ()
    return tuple(sorted({m for m in re.findall(r"compute_(\d+)", out)}, key=int))


@functools.lru_cache(maxsize=None)
def _torch_build_flags() -> Optional[tuple[tuple[str, ...], tuple[str, ...], str]]:
    """(compile flags, link flags, torch version) of a module compiled against
    the installed torch, or None when its headers or libraries are missing."""
    try:
        import torch
    except Exception:  # noqa: BLE001
        return None
    base = Path(torch.__file__).resolve().parent
    include, lib = base / "include", base / "lib"
    if not (include / "torch" / "csrc" / "autograd" / "python_variable.h").is_file() or not lib.is_dir():
        return None
    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    cflags = ("-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{include}", f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}")
    libs = ("-lc10", "-ltorch_cpu", "-ltorch_python", "-ltorch")
    ldflags = (f"-L{lib}", *libs, f"-Wl,-rpath,{lib}")
    return cflags, ldflags, torch.__version__


def _sources(kind: str, root: Path) -> tuple[list[Path], list[Path]]:
    if kind == "cpu":
        return [root / s for s in _CPU_SOURCES], []
    if kind == "plan":
        return [root / s for s in _PLAN_SOURCES], []
    return [root / s for s in _CUDA_CXX_SOURCES], sorted(root.glob("*.cu"))


def _python_includes() -> list[str]:
    paths = sysconfig.get_paths()
    out = []
    for key in ("include", "platinclude"):
        p = paths.get(key)
        if p and p not in out:
            out.append(p)
    return out


class _Recipe:
    """Commands building one module (also what the cache hash covers)."""

    def __init__(self, kind: str, archs: Optional[Sequence[str]] = None) -> None:
        _check_kind(kind)
        missing = missing_requirements(kind)
        if missing:
            raise BuildError(
                f"fastmup: cannot build the {kind!r} backend extension: missing " + "; ".join(missing) + "."
            )
        self.kind = kind
        self.root = csrc_dir()
        self.cxx = cxx_command()
        self.nvcc = find_nvcc() if kind == "cuda" else None
        pyb_include, self.pybind11_version = _pybind11()
        self.cxx_srcs, self.cu_srcs = _sources(kind, self.root)
        self.module = module_name(kind)
        self.suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
        includes = [f"-I{self.root}", f"-I{pyb_include}"] + [f"-I{p}" for p in _python_includes()]
        self.cxxflags = list(_CXX_FLAGS) + includes + shlex.split(os.environ.get("FASTMUP_CXXFLAGS", ""))
        self.ldflags = ["-shared"]
        if sys.platform == "darwin":
            self.ldflags += ["-undefined", "dynamic_lookup"]
        self.torch_version = ""
        if kind == "plan":
            cflags, ldflags, self.torch_version = _torch_build_flags()
            self.cxxflags = [f for f in self.cxxflags if not f.startswith("-std=")] + list(cflags)
            self.ldflags += list(ldflags)
        self.omp = None
        if kind == "cpu":
            self.omp = openmp_flag(*self.cxx)
            if self.omp:
                self.cxxflags.append(self.omp)
                self.ldflags.append(self.omp)
        self.archs = list(archs) if archs is not None else (cuda_archs() if kind == "cuda" else [])
        self.nvccflags = (
            list(_NVCC_FLAGS) + [f"-I{self.root}"] + (gencode_flags(self.archs) if kind == "cuda" else [])
            + shlex.split(os.environ.get("FASTMUP_NVCCFLAGS", ""))
        )
        if kind == "cuda" and os.environ.get("CXX"):
            self.nvccflags += ["-ccbin", self.cxx[-1] if len(self.cxx) > 1 else self.cxx[0]]

    def key(self) -> str:
        h = hashlib.sha256()
        for part in (
            RECIPE_VERSION,
            self.kind,
            sys.version,
            self.suffix,
            self.pybind11_version,
            self.torch_version,
            " ".join(self.cxx),
            _tool_version(*self.cxx),
            self.nvcc or "",
            _tool_version(self.nvcc) if self.nvcc else "",
            " ".join(self.cxxflags),
            " ".join(self.ldflags),
            " ".join(self.nvccflags),
        ):
            h.update(part.encode())
            h.update(b"\0")
        for path in sorted(p for p in self.root.rglob("*") if p.suffix in _SOURCE_SUFFIXES):
            h.update(str(path.relative_to(self.root)).encode())
            h.update(b"\0")
            h.update(path.read_bytes())
        return h.hexdigest()[:16]

    def output(self) -> str:
        return self.module + self.suffix

    # the commands, as argument lists -----------------------------------
    def objects(self) -> list[tuple[str, Path, bool]]:
        """(object file name, source, compiled by nvcc) for every source."""
        return [(src.stem + ".o", src, False) for src in self.cxx_srcs] + [
            (src.stem + ".cu.o", src, True) for src in self.cu_srcs
        ]

    def compile(self, src: str, obj: str, cuda: bool, depfile: bool = False) -> list[str]:
        if cuda:
            return [self.nvcc, *self.nvccflags, "-c", src, "-o", obj]
        dep = ["-MMD", "-MF", obj + ".d"] if depfile else []
        return [*self.cxx, *self.cxxflags, *dep, "-c", src, "-o", obj]

    def link(self, objs: Iterable[str], out: str) -> list[str]:
        if self.kind == "cuda":
            # nvcc links the device-code registration and the static CUDA runtime.
            return [self.nvcc, "-shared", "--cudart", "static", *objs, "-o", out]
        return [*self.cxx, *objs, *self.ldflags, "-o", out]


def _ninja_escape(s: str) -> str:
    """A path in a ninja build line."""
    return s.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _cmd(args: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def _ninja_cmd(args: Sequence[str]) -> str:
    """A shell command in a ninja rule ($in/$out kept as ninja variables)."""
    return " ".join(a if a in ("$in", "$out", "$out.d", "$out.tmp") else shlex.quote(a).replace("$", "$$") for a in args)


def _write_ninja(recipe: _Recipe, build_dir: Path) -> None:
    lines = ["ninja_required_version = 1.3", ""]
    lines += ["rule cxx", f"  command = {_ninja_cmd(recipe.compile('$in', '$out', False, depfile=True))}"]
    lines += ["  depfile = $out.d", "  deps = gcc", "  description = CXX $in", ""]
    if recipe.cu_srcs:
        lines += ["rule nvcc", f"  command = {_ninja_cmd(recipe.compile('$in', '$out', True))}"]
        lines += ["  description = NVCC $in", ""]
    out = recipe.output()
    link = _ninja_cmd(recipe.link(["$in"], "$out.tmp"))
    lines += ["rule link", f"  command = {link} && mv -f $out.tmp $out", "  description = LINK $out", ""]
    objs = recipe.objects()
    for obj, src, cuda in objs:
        lines.append(f"build {_ninja_escape(obj)}: {'nvcc' if cuda else 'cxx'} {_ninja_escape(str(src))}")
    lines.append(f"build {_ninja_escape(out)}: link " + " ".join(_ninja_escape(o) for o, _, _ in objs))
    lines.append(f"default {_ninja_escape(out)}")
    (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no lock, builds of one key may race
            pass
        try:
            yield
        finally:
            try:
                import fcntl

                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            except ImportError:
                pass


def _run_logged(cmds: Sequence[Sequence[str]], cwd: Path, log: Path, parallel: bool) -> None:
    """Run compile commands (in parallel when asked), appending to ``log``; raise on failure."""

    def one(cmd: Sequence[str]) -> tuple[Sequence[str], subprocess.CompletedProcess]:
        return cmd, subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)

    workers = max(1, min(len(cmds), os.cpu_count() or 1)) if parallel else 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, cmds))
    failed = None
    with open(log, "a") as f:
        for cmd, r in results:
            f.write("$ " + _cmd(cmd) + "\n" + r.stdout + r.stderr)
            if r.returncode != 0 and failed is None:
                failed = cmd
    if failed is not None:
        raise BuildError(_failure_message(log, f"command failed: {_cmd(failed)}"))


def _failure_message(log: Path, what: str) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    tail = "\n".join(text.splitlines()[-80:])
    return f"fastmup: building the extension failed ({what}).\nFull log: {log}\n--- build log (tail) ---\n{tail}"


def build_extension(kind: str, *, root: Optional[os.PathLike] = None, archs: Optional[Sequence[str]] = None, force: bool = False) -> Path:
    """Build (if needed) the ``kind`` module and return the path of the shared library.

    ``root``: cache root (default :func:`cache_root`).  ``archs``: CUDA archs
    (default :func:`cuda_archs`).  ``force``: rebuild even when up to date.
    """
    recipe = _Recipe(kind, archs)
    build_dir = Path(root).expanduser() if root is not None else cache_root()
    build_dir = build_dir / f"{kind}-{recipe.key()}"
    target = build_dir / recipe.output()
    if target.is_file() and not force:
        return target
    build_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(build_dir.with_name(build_dir.name + ".lock")):
        if target.is_file() and not force:
            return target  # built by another process meanwhile
        if force and target.exists():
            target.unlink()
        started = time.monotonic()
        _say(
            f"fastmup: building the {kind!r} extension once ({_BUILD_TIMES.get(kind, 'about a minute')}; cached in {build_dir}). "
            f"To build ahead of time: python -m fastmup.ext build {kind}"
        )
        log = build_dir / "build.log"
        log.write_text("")
        _write_ninja(recipe, build_dir)
        ninja = find_ninja()
        env_jobs = os.environ.get("MAX_JOBS")
        if ninja is not None:
            cmd = [ninja, "-C", str(build_dir)] + (["-j", env_jobs] if env_jobs else [])
            r = subprocess.run(cmd, capture_output=True, text=True)
            with open(log, "a") as f:
                f.write("$ " + _cmd(cmd) + "\n" + r.stdout + r.stderr)
            if r.returncode != 0:
                raise BuildError(_failure_message(log, f"ninja exited with status {r.returncode}"))
        else:
            objs = recipe.objects()
            _run_logged([recipe.compile(str(src), obj, cuda) for obj, src, cuda in objs], build_dir, log, parallel=True)
            tmp = recipe.output() + ".tmp"
            _run_logged([recipe.link([o for o, _, _ in objs], tmp)], build_dir, log, parallel=False)
            os.replace(build_dir / tmp, target)
        if not target.is_file():
            raise BuildError(_failure_message(log, f"no {target.name} was produced"))
        _say(f"fastmup: built the {kind!r} extension in {time.monotonic() - started:.0f} s")
    return target


def _say(message: str) -> None:
    """A progress line on stderr (a first-step build takes long enough to
    look like a hang without one)."""
    print(message, file=sys.stderr, flush=True)


def built_path(kind: str) -> Optional[Path]:
    """The up-to-date built library of ``kind`` in the cache, or None (never builds, never raises)."""
    try:
        recipe = _Recipe(kind)
        target = cache_root() / f"{kind}-{recipe.key()}" / recipe.output()
        return target if target.is_file() else None
    except Exception:  # noqa: BLE001
        return None


def import_module(kind: str, path: Path):
    """Import the built library at ``path`` as module ``_fastmup_<kind>``."""
    name = module_name(kind)
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def compile_cuda_sources(archs: Sequence[str] = DEFAULT_CUDA_ARCHS, out_dir: Optional[os.PathLike] = None) -> list[Path]:
    """Compile (``nvcc -c``, no link) every ``csrc/*.cu`` for ``archs``; return the object files.

    One nvcc invocation per source covers all archs; sources compile in
    parallel.  Raises :class:`BuildError` (with nvcc's output) on failure.
    Needs nvcc only: no GPU, no pybind11.
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError("fastmup: nvcc not found (set $CUDA_HOME or put nvcc on PATH)")
    root = csrc_dir()
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="fastmup-cu-"))
    out.mkdir(parents=True, exist_ok=True)
    flags = list(_NVCC_FLAGS) + [f"-I{root}"] + gencode_flags(archs)
    sources = sorted(root.glob("*.cu"))
    cmds = [[nvcc, *flags, "-c", str(src), "-o", str(out / (src.stem + ".cu.o"))] for src in sources]
    log = out / "nvcc.log"
    log.write_text("")
    _run_logged(cmds, out, log, parallel=True)
    return [out / (src.stem + ".cu.o") for src in sources]
