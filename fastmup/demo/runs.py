"""What the learning-rate sweep demos share: one training run, a sweep of
runs in worker processes, and the records of ``results.json``.

A run is a plain dict: its coordinates (parametrization, width or depth,
``log2_lr``, seed...) followed by the fields of :func:`train_run`.  The
demos differ in their models, data and plots; how a run is trained, timed
and recorded, how a sweep is spread over processes and how its summary is
written are the same and live here.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple

import torch

__all__ = ["train_run", "worker_pool", "grid_jobs", "run_jobs", "add_sweep_options", "sweep_record", "write_summary", "cpu_seconds", "usable_cpus"]

Loss = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def train_run(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    loss: Loss,
    data: Callable[[], Tuple[Iterable, Tuple[torch.Tensor, torch.Tensor]]],
    steps: int,
) -> Dict[str, Any]:
    """Train ``model`` one step per batch and evaluate it once at the end.

    ``data()`` (called once the clock runs, so making the data counts in the
    times) gives ``(batches, (x_eval, y_eval))``.  Returns ``final`` (the
    loss on the evaluation data, ``nan`` if the run diverged or stopped
    before ``steps`` steps), ``first`` (the first minibatch loss),
    ``losses`` (one per step; a run stops at the first non-finite one),
    ``seconds`` and ``cpu_seconds``.
    """
    losses: List[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    batches, (x_eval, y_eval) = data()
    for xb, yb in batches:
        value_t = loss(model, xb, yb)
        value = value_t.item()
        losses.append(value)
        if not math.isfinite(value):
            break
        opt.zero_grad(set_to_none=True)
        value_t.backward()
        opt.step()
        sched.step()
    final = float("nan")
    if len(losses) == steps and math.isfinite(losses[-1]):
        with torch.no_grad():
            final = loss(model.eval(), x_eval, y_eval).item()
        if not math.isfinite(final):
            final = float("nan")
    return dict(
        final=final,
        first=losses[0],
        losses=losses,
        seconds=time.perf_counter() - start,
        cpu_seconds=time.process_time() - cpu_start,
    )


# ---------------------------------------------------------------------------
# sweeps


def _job(job) -> Dict[str, Any]:
    train, args = job
    return train(*args)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def worker_pool(workers: int):
    """A pool of ``workers`` spawned processes with one torch thread each.

    Use as a context manager and pass it to a demo's ``sweep`` to share it
    between sweeps (each worker imports torch once).  The caller's main
    module must be import-safe (``if __name__ == "__main__":``), as for any
    spawned pool.
    """
    import multiprocessing as mp

    return mp.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(1,))


def grid_jobs(
    train: Callable[..., Dict[str, Any]], cfg: Any, sizes: Iterable[int], parametrizations: Sequence[str], backend: str
) -> List[Tuple[Callable[..., Dict[str, Any]], tuple]]:
    """One job ``(train, (cfg, parametrization, size, log2_lr, seed, backend))``
    per point of the grid ``sizes × parametrizations × cfg.log2_lrs ×
    range(cfg.seeds)``, the largest sizes (the long runs) first."""
    return [
        (train, (cfg, p, size, lr, s, backend))
        for size in sorted(sizes, reverse=True)
        for p in parametrizations
        for lr in cfg.log2_lrs
        for s in range(cfg.seeds)
    ]


def run_jobs(
    jobs: Sequence[Tuple[Callable[..., Dict[str, Any]], tuple]],
    axis: str,
    *,
    workers: int = 1,
    pool=None,
    progress: bool = True,
    desc: str = "sweep",
) -> List[Dict[str, Any]]:
    """Run every ``(train, args)`` job: in ``pool`` if given, else in a pool
    of ``workers`` processes made for these jobs when ``workers > 1``, else
    here, one after the other.  ``train`` must be a module-level function
    (worker processes import it).  Returns the runs sorted by
    parametrization, ``axis`` (the size the runs vary), lr and seed."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc=desc, unit="run", dynamic_ncols=True)
    results = []
    try:
        with (worker_pool(workers) if pool is None and workers > 1 else contextlib.nullcontext(pool)) as own:
            for r in own.imap_unordered(_job, jobs) if own is not None else map(_job, jobs):
                results.append(r)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    results.sort(key=lambda r: (r["parametrization"], r[axis], r["log2_lr"], r["seed"]))
    return results


def add_sweep_options(ap: argparse.ArgumentParser, size: str, backend_help: str = "fastmup optimizer backend") -> None:
    """The command-line options every sweep demo takes after its own:
    steps, seeds, the learning-rate grid, workers, backend, and switches for
    the coordinate checks and progress bars.  ``size`` names what the runs
    vary ("width", "depth")."""
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default: from the config)")
    ap.add_argument("--seeds", type=int, default=None, help=f"seeds per ({size}, lr); losses are averaged")
    ap.add_argument("--lr-range", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                    help="log2 learning-rate grid from LO to HI in steps of 1, e.g. --lr-range -12 -4")
    ap.add_argument("--workers", type=int, default=None,
                    help="worker processes, one thread each (default: the usable CPUs, at most 8; 1 runs in-process)")
    ap.add_argument("--backend", default="auto", help=backend_help + " (default: %(default)s)")
    ap.add_argument("--no-coord-check", action="store_true", help="skip the coordinate checks")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")


# ---------------------------------------------------------------------------
# results.json


def sweep_record(
    cfg: Any, results: Sequence[Dict[str, Any]], best: Dict[Tuple[str, int], Tuple[float, float]], **fields: Any
) -> Dict[str, Any]:
    """The record of one sweep: its config (a dataclass), ``fields``
    (timings, ...), the best learning rates (``"parametrization/size":
    [log2 lr, loss]``) and every run without its per-step losses."""
    return dict(
        config=dataclasses.asdict(cfg),
        **fields,
        best={f"{p}/{size}": list(v) for (p, size), v in best.items()},
        runs=[{k: v for k, v in r.items() if k != "losses"} for r in results],
    )


def write_summary(summary: Dict[str, Any], out: str, t0: float, cpu0: float, workers: int) -> Dict[str, Any]:
    """Add the demo's total wall and CPU seconds (since ``t0``, ``cpu0`` of
    :func:`cpu_seconds`) to ``summary``, write it to ``out/results.json``,
    print the totals and return it."""
    summary["seconds"] = time.perf_counter() - t0
    summary["cpu_seconds"] = cpu_seconds() - cpu0
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print(f"\ntotal {summary['seconds']:.0f} s wall, {summary['cpu_seconds']:.0f} CPU-s ({workers} worker(s)); "
          f"results in {out}/")
    return summary


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool's workers)."""
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    return total


def usable_cpus(cap: int = 8) -> int:
    """The CPUs this process may run on, at most ``cap``."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(cap, n))
