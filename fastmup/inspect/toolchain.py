"""The NVIDIA tools the inspection runs, and where its results are cached.

``cuobjdump`` (SASS listings, resource usage) comes from the Triton wheel,
which bundles it with ``ptxas`` and ``nvdisasm``; else from ``PATH`` or next
to ``nvcc``.  ``nvcc`` is found as the extension build finds it
(:func:`fastmup.ext.build.find_nvcc`).  Nothing here needs a GPU.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Optional

__all__ = ["ToolError", "cache_dir", "cached", "cuobjdump", "resource_usage", "sass_listing"]


class ToolError(RuntimeError):
    """A tool is missing or failed."""


@functools.lru_cache(maxsize=None)
def cuobjdump() -> str:
    candidates = []
    try:
        from triton import knobs

        candidates.append(knobs.nvidia.cuobjdump.path)
    except Exception:  # noqa: BLE001 - an older or absent Triton: look elsewhere
        pass
    candidates.append(shutil.which("cuobjdump"))
    try:
        from fastmup.ext.build import find_nvcc

        nvcc = find_nvcc()
        if nvcc:
            candidates.append(str(Path(nvcc).with_name("cuobjdump")))
    except Exception:  # noqa: BLE001
        pass
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise ToolError("cuobjdump not found: install triton (it bundles one) or the CUDA toolkit")


def _run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise ToolError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return r.stdout


def sass_listing(binary: Path, arch: Optional[int] = None) -> str:
    """``cuobjdump -sass`` of a cubin or object file (``arch``: pick one of a fat binary's)."""
    return _run([cuobjdump(), "-sass", *(["-arch", f"sm_{arch}"] if arch else []), str(binary)])


_RESOURCE = re.compile(r"Function\s+(\S+):\s*\n\s*(.*)")


def resource_usage(binary: Path, arch: Optional[int] = None) -> dict[str, dict[str, int]]:
    """Function -> ``{"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}`` (``--dump-resource-usage``)."""
    text = _run([cuobjdump(), "--dump-resource-usage", *(["-arch", f"sm_{arch}"] if arch else []), str(binary)])
    out = {}
    for name, line in _RESOURCE.findall(text):
        out[name] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
    return out


def cache_dir() -> Path:
    """``$FASTMUP_INSPECT_CACHE``, else ``~/.cache/fastmup/inspect``."""
    from fastmup.ext.build import user_cache

    return user_cache("FASTMUP_INSPECT_CACHE", "inspect")


def cached(kind: str, key_parts: list[str | bytes], compute: Callable[[], dict]) -> dict:
    """``compute()`` (a JSON-able dict), stored under a hash of ``key_parts``."""
    h = hashlib.sha256()
    for part in key_parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    path = cache_dir() / kind / (h.hexdigest()[:32] + ".json")
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(value, f)
    os.replace(f.name, path)
    return value
