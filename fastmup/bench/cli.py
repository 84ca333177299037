"""``python -m fastmup.bench`` / ``fastmup-bench``: argument parsing and the run."""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from typing import Optional, Sequence

import torch

from fastmup.bench import environment, impls as impl_registry, models as model_sets, optimizers as opt_registry, report
from fastmup.bench.runner import Config, Results, run
from fastmup.bench.timing import copy_bandwidth, inplace_bandwidth

__all__ = ["main", "build_parser", "TOLERANCE"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}  # max rel err vs eager

# mode -> (models, steps, warmup, per-impl budget s, min timed steps, run time limit s, check steps,
#          max input sets, copy MiB on CPU, copy MiB on GPU)
INF = float("inf")
MODES = {
    "full": (model_sets.FULL, None, None, None, 5, INF, 3, 16, 512, 1024),
    "quick": (model_sets.QUICK, 20, 2, 1.0, 3, 120.0, 2, 16, 128, 512),
    "smoke": (model_sets.SMOKE, 3, 1, 0.5, 3, 20.0, 2, 2, 32, 128),
}


def _names(values: Optional[Sequence[str]]) -> Optional[list[str]]:
    if not values:
        return None
    out = []
    for v in values:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastmup.bench",
        description="Time and check fastmup's μP optimizers against torch and mup on parameter sets shaped like real models.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="reduced sizes and fewer steps (< 3 min on a 2-core CPU)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps (seconds; for tests and CI)")
    p.add_argument("--models", nargs="+", metavar="NAME", help=f"parameter sets (comma or space separated): {', '.join(model_sets.MODELS)}")
    p.add_argument("--optimizers", nargs="+", metavar="NAME", help=f"optimizers: {', '.join(opt_registry.OPTIMIZERS)}")
    p.add_argument("--impls", nargs="+", metavar="NAME", help=f"implementations: {', '.join(impl_registry.IMPLS)}")
    p.add_argument("--steps", type=int, help="timed steps per implementation (default: 100 GPU / 20 CPU; --quick 20)")
    p.add_argument("--warmup", type=int, help="untimed steps first (at least two per rotated input set)")
    p.add_argument("--check-steps", type=int, help="steps compared with the eager reference (default 3; --quick/--smoke 2)")
    p.add_argument("--budget", type=float, help="seconds of timing per implementation before stopping early (after at least 5 steps; --quick 3)")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="aim to finish the timing within this many seconds by shrinking per-implementation budgets "
                        "(default: none; --quick 150, --smoke 20)")
    p.add_argument("--max-copies", type=int, help="most input sets rotated through while timing (default 16; --smoke 2; at least 2)")
    p.add_argument("--sequential", action="store_true",
                   help="time implementations one after the other (default: interleaved, round by round, when memory allows)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="parameter / gradient / state dtype")
    p.add_argument("--threads", default="auto",
                   help="torch CPU threads: a count, or auto (default): torch's default, 1 when the CPU is already "
                        "oversubscribed by other processes (load average >= CPUs)")
    p.add_argument("--json", metavar="PATH", help="write every figure to PATH")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of step times and %% of copy bandwidth")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when an implementation exceeds the error tolerance")
    p.add_argument("--list", action="store_true", help="list parameter sets, optimizers and implementations, then exit")
    return p


def _pick(kind: str, names: Optional[list[str]], registry: dict, default: Sequence[str]) -> list[str]:
    if names is None:
        return list(default)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise SystemExit(f"unknown {kind}: {', '.join(unknown)} (known: {', '.join(registry)})")
    return names


def _list() -> None:
    print("parameter sets:")
    for name in model_sets.MODELS:
        s = model_sets.get(name)
        print(f"  {name:18s} {s.n_tensors:4d} tensors {report._params(s.n_params):>8s}  {s.description}")
    print("optimizers:", ", ".join(f"{s.name} ({s.label})" for s in opt_registry.OPTIMIZERS.values()))
    print("implementations:", ", ".join(impl_registry.IMPLS))
    print(f"sets: --smoke {', '.join(model_sets.SMOKE)}; --quick {', '.join(model_sets.QUICK)}; default {', '.join(model_sets.FULL)}")


class _Progress:
    """tqdm on stderr when installed, else one line per item."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        self.enabled = enabled
        self.done = 0
        self.total = total
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, unit="case", dynamic_ncols=True, desc="fastmup.bench")
            except ImportError:
                pass

    def __call__(self, label: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _loadavg() -> Optional[list[float]]:
    try:
        return list(os.getloadavg())
    except (OSError, AttributeError):
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        _list()
        return 0
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    (default_models, steps, warmup, budget, min_steps, time_limit, check_steps, max_copies,
     copy_mib_cpu, copy_mib_gpu) = MODES[mode]
    model_names = _pick("models", _names(args.models), model_sets.MODELS, default_models)
    opt_names = _pick("optimizers", _names(args.optimizers), opt_registry.OPTIMIZERS, list(opt_registry.OPTIMIZERS))
    impl_names = _pick("implementations", _names(args.impls), impl_registry.IMPLS, list(impl_registry.IMPLS))
    device = torch.device(args.device) if args.device else environment.default_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        threads, threads_note = environment.choose_threads(device, args.threads)
    except ValueError as e:
        raise SystemExit(f"--threads: {e}") from None
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    dtype = DTYPES[args.dtype]
    gpu = device.type == "cuda"
    cfg = Config(
        device=device,
        dtype=dtype,
        steps=args.steps or steps or (100 if gpu else 20),
        warmup=args.warmup if args.warmup is not None else (warmup if warmup is not None else (10 if gpu else 3)),
        check_steps=max(1, args.check_steps or check_steps),
        budget_s=args.budget if args.budget is not None else (budget if budget is not None else (60.0 if gpu else 20.0)),
        max_copies=max(2, args.max_copies or max_copies),
        min_steps=min_steps,
        time_limit_s=args.time_limit if args.time_limit is not None else time_limit,
        cache_bytes=environment.cache_bytes(device),
        interleave=not args.sequential,
    )
    started = time.perf_counter()
    meta: dict = {
        "device": "",
        "device_info": environment.device_info(device),
        "versions": environment.versions(),
        "git_commit": environment.git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": mode,
        "loadavg_start": _loadavg(),
    }
    meta["device"] = f"{device.type}: {meta['device_info']['description']}"
    copy_mib = copy_mib_gpu if gpu else copy_mib_cpu
    bw = copy_bandwidth(device, nbytes=copy_mib << 20, repeats=20 if gpu else 10)
    meta["copy_bandwidth_GBps"] = bw["best_GBps"]
    meta["copy_bandwidth"] = bw
    meta["inplace_add_bandwidth_GBps"] = inplace_bandwidth(device, nbytes=copy_mib << 20, repeats=20 if gpu else 10)["best_GBps"]
    meta["config"] = {
        "dtype": args.dtype,
        "steps": cfg.steps,
        "warmup": cfg.warmup,
        "check_steps": cfg.check_steps,
        "budget_s": cfg.budget_s,
        "max_copies": cfg.max_copies,
        "min_steps": cfg.min_steps,
        "time_limit_s": cfg.time_limit_s if math.isfinite(cfg.time_limit_s) else None,
        "threads": torch.get_num_threads(),
        "interleave": cfg.interleave,
    }
    report.print_header(meta)
    sys.stdout.flush()

    optimizers = [opt_registry.get(n) for n in opt_names]
    impls = [impl_registry.get(n) for n in impl_names]
    notes = [n for n in (impl.prepare(device) for impl in impls) if n]
    if threads_note:
        notes.insert(0, threads_note)
    progress = _Progress(len(model_names) * len(optimizers) * len(impls), enabled=not args.no_progress)
    results = Results()

    def checkpoint(done: Results) -> None:
        """The JSON so far after each case: a run that dies later keeps them."""
        if args.json:
            report.write_json(args.json, {**meta, "partial": True, "rows": done.rows, "skipped": done.skipped,
                                          "finished_cases": done.finished, "notes": notes})

    try:
        run(model_names, optimizers, impls, cfg, bw["best_GBps"], lambda: environment.free_memory(device), progress,
            results, checkpoint)
    except KeyboardInterrupt:
        # an interrupted run (Ctrl-C, or a supervisor's SIGINT at its time
        # limit) still reports and writes the cases it finished
        notes.append("INTERRUPTED: the run was stopped before every case finished; the cases below are those that did")
        meta["interrupted"] = True
    finally:
        progress.close()

    labels = {o.name: o.label for o in optimizers}
    tolerance = TOLERANCE[dtype]

    def allowed(row: dict) -> float:
        # the implementation's own allowance (rounding modes), and the optimizer case's (clip cases)
        impl_tol = impl_registry.get(row["impl"]).tolerance(tolerance, cfg.check_steps)
        spec = next((o for o in optimizers if o.name == row["optimizer"]), None)
        own = spec.tolerance if spec is not None else None
        return impl_tol if own is None else max(own, impl_tol)

    bad = [r for r in results.rows if r["impl"] != impl_registry.REFERENCE and not (r["max_rel_err_vs_eager"] <= allowed(r))]
    for r in bad:
        notes.append(f"ERROR ABOVE TOLERANCE {allowed(r):g}: {r['model']} {r['optimizer']} {r['impl']} max rel err {r['max_rel_err_vs_eager']:.3g}")
    ran_optimizers = {r["optimizer"] for r in results.rows}
    notes += [o.note for o in optimizers if o.note and o.name in ran_optimizers]
    if any(i.name == "mup" for i in impls):
        notes.append("mup = mup's optimizers as installed (torch's default implementation: for-loop on CPU, foreach on CUDA)")
    baselines = {o.label: o.baseline for o in optimizers if o.name in {r["optimizer"] for r in results.rows}}
    notes.append("× baseline: relative to " + ", ".join(
        f"{b} ({', '.join(label for label, x in baselines.items() if x == b)})" for b in dict.fromkeys(baselines.values())))
    if any(r.get("timing") == "interleaved" for r in results.rows):
        notes.append(
            "interleaved timing: a case's implementations step in turn, round by round (order reversed every other "
            "round); × baseline is the median over rounds of the baseline's time / this implementation's time"
        )
    notes.append(
        "GB/s = bytes the step must move (read p, g, state; write p, state) / median step time; "
        f"timing rotates through several input sets (n_copies in the JSON); times on {'CUDA events' if gpu else 'time.perf_counter'}"
    )
    load = meta["loadavg_start"]
    cpus = os.cpu_count() or 1
    # Only the load before the run says something about other tenants: the
    # benchmark's own threads raise it during the run.
    if not gpu and load and load[0] > 0.5 * cpus:
        notes.append(
            f"CAVEAT: load average {load[0]:.1f} at start on {cpus} CPUs: other processes competed for the cores, "
            "so CPU timings are noisy (see the min–max spread)"
        )
    if not gpu:
        notes.append(
            f"in-place a.add_(b) bandwidth {meta['inplace_add_bandwidth_GBps']:.1f} GB/s (2 reads + 1 write): a copy's "
            "destination costs a CPU an uncounted write-allocate read, so in-place optimizer steps can exceed 100% of copy BW"
        )
    report.print_table(results.rows, labels, title=f"optimizer step ({args.dtype}, {device.type})")
    report.print_notes(results.skipped, model_names, opt_names, notes)
    meta["wall_s"] = time.perf_counter() - started
    meta["loadavg_end"] = _loadavg()
    print(f"\nwall time {meta['wall_s']:.1f} s", flush=True)

    if args.json:
        document = {**meta, "rows": results.rows, "skipped": results.skipped, "finished_cases": results.finished,
                    "notes": notes}
        report.write_json(args.json, document)
        print(f"wrote {args.json}")
    if args.plot:
        report.write_plot(args.plot, results.rows, labels, title=f"fastmup.bench — {meta['device']} — {args.dtype}")
        print(f"wrote {args.plot}")
    return 1 if (args.strict and bad) else 0
