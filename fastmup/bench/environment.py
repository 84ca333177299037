"""What the run ran on: device description, free memory, cache size,
library versions and the git commit."""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from typing import Any, Optional

import torch

__all__ = ["default_device", "device_info", "free_memory", "cache_bytes", "choose_threads", "versions", "git_commit"]


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict[str, Any]:
    """The device as torch reports it (on a GPU: every plain field of
    ``torch.cuda.get_device_properties`` plus clocks where available)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info: dict[str, Any] = {"type": "cuda", "index": index}
        for attr in dir(props):
            if attr.startswith("_"):
                continue
            try:
                value = getattr(props, attr)
            except Exception:
                continue
            if isinstance(value, (bool, int, float, str)):
                info[attr] = value
        info["total_memory_GiB"] = round(props.total_memory / 2**30, 2)
        for name in ("clock_rate", "memory_clock_rate", "memory_bus_width"):
            if name not in info:  # torch reads these through NVML where the properties lack them
                fn = getattr(torch.cuda, name, None)
                try:
                    if fn is not None:
                        info[name] = fn(index)
                except Exception:
                    pass
        info["description"] = f"{props.name} ({info['total_memory_GiB']} GiB, {props.multi_processor_count} SMs)"
        return info
    threads = torch.get_num_threads()
    return {
        "type": "cpu",
        "name": _cpu_name(),
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "total_memory_GiB": round(_total_host_memory() / 2**30, 2),
        "llc_bytes": cache_bytes(device),
        "description": f"{_cpu_name()} ({threads} torch threads)",
    }


def _total_host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def free_memory(device: torch.device) -> int:
    """Bytes free for tensors on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 34


def cache_bytes(device: torch.device) -> int:
    """The last-level cache a step's data could stay in (GPU L2, CPU L3)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device.index if device.index is not None else torch.cuda.current_device())
        return int(getattr(props, "L2_cache_size", 0) or 50 << 20)
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size"), encoding="utf-8") as f:
                    text = f.read().strip()
            except OSError:
                continue
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            digits = text.rstrip("KMG")
            if digits.isdigit():
                best = max(best, int(digits) * scale)
    except OSError:
        pass
    return best or 32 << 20


def choose_threads(device: torch.device, requested: Optional[str]) -> tuple[int, Optional[str]]:
    """Torch CPU threads for the run: ``requested`` ("auto", None or a count).

    "auto" keeps torch's default unless the CPU is already oversubscribed
    (1-minute load average ≥ number of CPUs): then every multi-threaded op
    waits for a descheduled worker thread at its barrier, steps get 10-100×
    slower and noisy, and one thread measures the code instead of the
    scheduler.  Returns the count and a note saying why, if it changed.
    """
    default = torch.get_num_threads()
    if requested not in (None, "", "auto"):
        n = int(requested)
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        return n, None
    if device.type != "cpu" or default <= 1:
        return default, None
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return default, None
    cpus = os.cpu_count() or 1
    if load >= cpus:
        return 1, (
            f"--threads auto chose 1 torch thread instead of {default}: load average {load:.1f} on {cpus} CPUs "
            "(other processes); multi-threaded ops then stall at every parallel region (pass --threads N to override)"
        )
    return default, None


def _version(module: str) -> Optional[str]:
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return getattr(importlib.import_module(module), "__version__", None)
    except Exception:
        return None


def versions() -> dict[str, Optional[str]]:
    try:
        import fastmup

        fastmup_version = getattr(fastmup, "__version__", None)
    except Exception:
        fastmup_version = None
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fastmup": fastmup_version or _version("fastmup"),
        "mup": _version("mup"),
        "cuda": torch.version.cuda,
    }


def git_commit() -> Optional[str]:
    """``git rev-parse HEAD`` of the checkout fastmup runs from, if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None
