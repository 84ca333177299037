"""pytest-benchmark configuration for ``benchmarks/``: the comparisons of
``python -m fastmup.bench`` as benchmark tests.

    pytest benchmarks/ --benchmark-only                       # --quick sizes (plain `pytest`: smoke sizes)
    pytest benchmarks/ --benchmark-only --bench-size full     # full sizes
    pytest benchmarks/ --benchmark-only --smoke               # tiny, one round (CI)
    FASTMUP_BENCH_SMOKE=1 pytest benchmarks/ --benchmark-only
    pytest benchmarks/ --benchmark-only --benchmark-save=base
    pytest benchmarks/ --benchmark-only --benchmark-compare   # against the last saved run

Selection: ``--bench-models``, ``--bench-optimizers``, ``--bench-impls``
(comma separated; also ``FASTMUP_BENCH_MODELS`` etc.), ``--bench-device``,
``--bench-rounds``, ``--bench-threads``.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a source checkout run as `pytest benchmarks/`
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from fastmup.bench import environment, impls, models, optimizers  # noqa: E402
from fastmup.bench.runner import Case, Config  # noqa: E402

SIZES = {"smoke": models.SMOKE, "quick": models.QUICK, "full": models.FULL}


def _add(parser_group, *names, **kwargs) -> None:
    try:
        parser_group.addoption(*names, **kwargs)
    except ValueError:  # already defined by another conftest of the same session
        pass


def pytest_addoption(parser) -> None:
    group = parser.getgroup("fastmup-bench", "fastmup optimizer benchmarks")
    _add(group, "--smoke", action="store_true", default=False,
         help="tiny parameter sets and one round (also FASTMUP_BENCH_SMOKE=1)")
    _add(group, "--bench-size", choices=sorted(SIZES), default=None,
         help="parameter sets: smoke, quick or full (also FASTMUP_BENCH_SIZE; default quick with "
              "--benchmark-only, else smoke)")
    _add(group, "--bench-models", default=None, help="comma-separated parameter sets (overrides --bench-size)")
    _add(group, "--bench-optimizers", default=None, help="comma-separated optimizers")
    _add(group, "--bench-impls", default=None, help="comma-separated implementations")
    _add(group, "--bench-device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    _add(group, "--bench-rounds", type=int, default=None, help="timed rounds per benchmark")
    _add(group, "--bench-threads", default=None,
         help="torch CPU threads: a count or auto (default; 1 when the CPU is oversubscribed), also FASTMUP_BENCH_THREADS")


@dataclass
class Settings:
    size: str
    device: torch.device
    models: list[str]
    optimizers: list[str]
    impls: list[str]
    rounds: int
    warmup: int
    max_copies: int
    threads: int
    threads_note: Optional[str]

    def config(self) -> Config:
        return Config(device=self.device, max_copies=self.max_copies, cache_bytes=environment.cache_bytes(self.device))


def _names(value: Optional[str], env: str, default, registry) -> list[str]:
    value = value or os.environ.get(env)
    if not value:
        return list(default)
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise pytest.UsageError(f"unknown {env}: {', '.join(unknown)} (known: {', '.join(registry)})")
    return names


def _settings(config) -> Settings:
    cached = getattr(config, "_fastmup_bench_settings", None)
    if cached is not None:
        return cached
    smoke = bool(config.getoption("--smoke", default=False)) or os.environ.get("FASTMUP_BENCH_SMOKE", "") not in ("", "0")
    # quick sizes when benchmarking (--benchmark-only); a plain `pytest` that
    # happens to collect benchmarks/ runs the smoke sizes, in seconds
    default = "quick" if config.getoption("benchmark_only", default=False) else "smoke"
    size = "smoke" if smoke else (config.getoption("--bench-size", default=None) or os.environ.get("FASTMUP_BENCH_SIZE") or default)
    if size not in SIZES:
        raise pytest.UsageError(f"unknown bench size {size!r}; known: {', '.join(SIZES)}")
    device_name = config.getoption("--bench-device", default=None) or os.environ.get("FASTMUP_BENCH_DEVICE")
    device = torch.device(device_name) if device_name else environment.default_device()
    gpu = device.type == "cuda"
    threads, threads_note = environment.choose_threads(
        device, config.getoption("--bench-threads", default=None) or os.environ.get("FASTMUP_BENCH_THREADS"))
    torch.set_num_threads(threads)
    rounds = config.getoption("--bench-rounds", default=None)
    if rounds is None:
        rounds = {"smoke": 1, "quick": 20, "full": 100 if gpu else 20}[size]
    settings = Settings(
        size=size,
        device=device,
        models=_names(config.getoption("--bench-models", default=None), "FASTMUP_BENCH_MODELS", SIZES[size], models.MODELS),
        optimizers=_names(config.getoption("--bench-optimizers", default=None), "FASTMUP_BENCH_OPTIMIZERS",
                          optimizers.OPTIMIZERS, optimizers.OPTIMIZERS),
        impls=_names(config.getoption("--bench-impls", default=None), "FASTMUP_BENCH_IMPLS", impls.IMPLS, impls.IMPLS),
        rounds=rounds,
        warmup=0 if size == "smoke" else (10 if gpu else 3),
        max_copies=2 if size == "smoke" else 16,
        threads=threads,
        threads_note=threads_note,
    )
    config._fastmup_bench_settings = settings
    return settings


def pytest_generate_tests(metafunc) -> None:
    names = ("bench_model", "bench_optimizer", "bench_impl")
    if not all(n in metafunc.fixturenames for n in names):
        return
    s = _settings(metafunc.config)
    # one parametrization, model outermost: a case's reference is built once
    combos = [(m, o, i) for m in s.models for o in s.optimizers for i in s.impls]
    metafunc.parametrize(",".join(names), combos, ids=["-".join(c) for c in combos])


def pytest_report_header(config):
    s = _settings(config)
    lines = [f"fastmup bench: size={s.size} device={s.device} rounds={s.rounds} threads={s.threads} "
             f"models={','.join(s.models)} impls={','.join(s.impls)}"]
    if s.threads_note:
        lines.append(f"fastmup bench: {s.threads_note}")
    return lines


@pytest.fixture(scope="session")
def bench_settings(request) -> Settings:
    return _settings(request.config)


class CaseCache:
    """The current parameter set × optimizer with its eager reference (one at
    a time, so memory holds a single case), and per-implementation preparation."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg = settings.config()
        self.key: Optional[tuple[str, str]] = None
        self.case: Optional[Case] = None
        self.n_copies = 0
        self.reason: Optional[str] = None
        self.prepared: set[str] = set()

    def prepare(self, impl: impls.Impl) -> None:
        if impl.name not in self.prepared:
            self.prepared.add(impl.name)
            impl.prepare(self.cfg.device)

    def get(self, model: str, optimizer: str) -> tuple[Optional[Case], int, Optional[str]]:
        if self.key != (model, optimizer):
            if self.case is not None:
                self.case.close()
            self.key, self.case, self.reason = (model, optimizer), None, None
            opt = optimizers.get(optimizer)
            if optimizers.fastmup_class(opt) is None:
                self.reason = f"fastmup has no {opt.fastmup_name} yet"
            else:
                case = Case(models.get(model), opt, self.cfg)
                self.n_copies, self.reason = case.plan_copies(environment.free_memory(self.cfg.device))
                if self.reason is None:
                    case.prepare_reference()
                    self.case = case
        return self.case, self.n_copies, self.reason

    def close(self) -> None:
        if self.case is not None:
            self.case.close()
            self.case = None


@pytest.fixture(scope="session")
def bench_cases(bench_settings):
    cache = CaseCache(bench_settings)
    yield cache
    cache.close()
