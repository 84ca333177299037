"""Timing: per-step wall times (CUDA events on a GPU, ``perf_counter`` on
CPU) and the device's measured copy bandwidth."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = ["Stats", "synchronize", "time_steps", "time_interleaved", "copy_bandwidth", "inplace_bandwidth"]


@dataclass(frozen=True)
class Stats:
    """Step times in milliseconds."""

    median: float
    min: float
    max: float
    n: int
    samples: tuple[float, ...] = ()  # every timed step, in order

    @classmethod
    def of(cls, ms: Sequence[float]) -> "Stats":
        return cls(statistics.median(ms), min(ms), max(ms), len(ms), tuple(ms))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    steps: Sequence[Callable[[], object]],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    budget_s: float = float("inf"),
    min_repeats: int = 5,
) -> Stats:
    """Time ``repeats`` calls, rotating through ``steps`` (one callable per
    input set, so consecutive calls touch different memory): one
    implementation of :func:`time_interleaved`."""
    return Stats.of(time_interleaved([steps], device, warmup=warmup, repeats=repeats,
                                     budget_s=budget_s, min_repeats=min_repeats)[0])


def time_interleaved(
    steps: Sequence[Sequence[Callable[[], object]]],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    budget_s: float = float("inf"),
    min_repeats: int = 5,
) -> list[list[float]]:
    """Time several implementations in rounds: each round steps every
    implementation once, each on its next input set, forwards on even rounds
    and backwards on odd ones.

    ``steps[i]`` holds implementation ``i``'s callables, one per input set,
    rotated through so that consecutive calls touch different memory.  The
    first ``max(warmup, len(steps[i]))`` calls of each are not timed, so
    every input set has been stepped (state allocated, plan built) before
    timing; a step's ``prepare()``, if it has one, runs untimed before it.
    Timing stops early once ``budget_s`` has passed and ``min_repeats``
    rounds were taken.

    Returns each implementation's step times in ms, round by round, so that
    ``ms[a][r] / ms[b][r]`` compares two implementations under the same
    conditions: on a shared machine the memory bandwidth left by other
    tenants drifts over seconds, which a sequential comparison would credit
    to whichever implementation ran at the better moment.
    """
    n = len(steps)
    calls = [0] * n

    def prepare(i: int) -> None:
        _prepare(steps[i][calls[i] % len(steps[i])])

    def step(i: int) -> None:
        steps[i][calls[i] % len(steps[i])]()
        calls[i] += 1

    for i in range(n):
        for _ in range(max(warmup, len(steps[i]))):
            prepare(i)
            step(i)
    synchronize(device)
    cuda = device.type == "cuda"
    ms: list[list[float]] = [[] for _ in range(n)]
    began = time.perf_counter()
    rounds = 0
    while rounds < repeats:
        # On CUDA, events over up to 10 rounds and one sync per chunk: the
        # GPU queue stays full while the wall-clock budget can end a slow case.
        chunk = min(repeats - rounds, 10 if cuda else 1)
        events = []
        for r in range(rounds, rounds + chunk):
            for i in range(n) if r % 2 == 0 else range(n - 1, -1, -1):
                prepare(i)
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    step(i)
                    end.record()
                    events.append((i, start, end))
                else:
                    t0 = time.perf_counter()
                    step(i)
                    ms[i].append((time.perf_counter() - t0) * 1e3)
        if cuda:
            torch.cuda.synchronize(device)
            for i, start, end in events:
                ms[i].append(start.elapsed_time(end))
        rounds += chunk
        if rounds >= min_repeats and time.perf_counter() - began > budget_s:
            break
    return ms


def _prepare(step: Callable[[], object]) -> None:
    """A step's untimed set-up (``step.prepare()``), when it has one."""
    prepare = getattr(step, "prepare", None)
    if prepare is not None:
        prepare()


def _stream_stats(device: torch.device, n: int, repeats: int, op: str) -> Stats:
    """Time ``op`` ("copy": ``dst.copy_(src)``; "add": ``a.add_(b)``) on ``n`` floats."""
    x = torch.ones(n, dtype=torch.float32, device=device)
    y = torch.ones_like(x)
    if op == "copy":
        run = lambda: y.copy_(x)  # noqa: E731
    else:
        run = lambda: x.add_(y, alpha=0.0)  # noqa: E731
    return time_steps([run], device, warmup=2, repeats=repeats)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> dict:
    """Measured copy bandwidth: ``dst.copy_(src)`` of ``nbytes``, counting
    bytes read + written.  Returns the best (the ceiling) and the median, in GB/s."""
    n = nbytes // 4
    stats = _stream_stats(device, n, repeats, "copy")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    moved = 2 * n * 4
    return {
        "best_GBps": moved / (stats.min * 1e-3) / 1e9,
        "median_GBps": moved / (stats.median * 1e-3) / 1e9,
        "bytes": n * 4,
        "repeats": stats.n,
    }


def inplace_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> dict:
    """``a.add_(b)`` over ``nbytes`` per operand, counting 2 reads + 1 write.

    For reference beside :func:`copy_bandwidth`: an in-place update writes
    lines it has just read, while a copy's destination costs a CPU an extra
    read (write-allocate) that bytes-read-plus-written does not count, so an
    in-place optimizer step can exceed 100% of the copy bandwidth on a CPU."""
    n = nbytes // 4
    stats = _stream_stats(device, n, repeats, "add")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    moved = 3 * n * 4
    return {"best_GBps": moved / (stats.min * 1e-3) / 1e9, "median_GBps": moved / (stats.median * 1e-3) / 1e9}
