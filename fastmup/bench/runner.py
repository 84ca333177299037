"""Running the comparison: one :class:`Case` per parameter set × optimizer,
one :class:`Instance` per implementation, and :func:`run` over them all.

A case first steps the fastmup eager reference a few times (``check_steps``,
alternating two gradient sets) and keeps the resulting parameters; every
other implementation starts from the same parameters, sees the same
gradients, and is compared with them (max relative error) before it is
timed.  Timing rotates through ``n_copies`` independent parameter / gradient
/ state sets, enough that their total exceeds the last-level cache.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from fastmup.bench import models as model_sets
from fastmup.bench.impls import BASELINE, REFERENCE, Impl
from fastmup.bench.models import ParamSet, drop_grads, fill_grads, materialize
from fastmup.bench.optimizers import OptimizerSpec, fastmup_class
from fastmup.bench.timing import Stats, time_interleaved, time_steps

__all__ = ["Config", "Case", "Instance", "Step", "run", "max_rel_err", "step_bytes", "step_once"]

GRAD_SEEDS = (1001, 1002)  # the two gradient sets
MEMORY_HEADROOM = 0.85  # fraction of free memory a case may plan to use
#: untimed steps of every input set before timing.  A set's first step
#: allocates its state (and builds a planned optimizer's plan); its second is
#: the first to run as every later step runs (caches filled on the first,
#: torch's momentum buffers in use, and on the intermittent sets the first
#: step with the other gradient pattern).  With one, most timed steps of a
#: case rotating through 16 sets were those second steps: each optimizer's
#: one-time costs of its second step counted as if every step paid them.
WARM_STEPS_PER_SET = 2


def warmup_calls(cfg: "Config", n_copies: int) -> int:
    """Untimed steps of an implementation before timing: ``cfg.warmup``, and
    at least :data:`WARM_STEPS_PER_SET` of each of its ``n_copies`` input sets."""
    return max(cfg.warmup, WARM_STEPS_PER_SET * n_copies)


@dataclass
class Config:
    device: torch.device
    dtype: torch.dtype = torch.float32
    steps: int = 50  # timed steps per implementation
    warmup: int = 5
    check_steps: int = 3  # steps compared with the eager reference
    budget_s: float = float("inf")  # per implementation: stop timing after this (≥ min_steps steps)
    min_steps: int = 5  # timed steps taken whatever the budget
    time_limit_s: float = float("inf")  # whole run: per-implementation budgets shrink to end near this
    max_copies: int = 16  # input sets rotated through while timing (at least 2)
    cache_bytes: int = 32 << 20  # last-level cache size; rotated sets total ≥ 4× this
    seed: int = 0
    interleave: bool = True  # time a case's implementations round by round (see _time_case)

    def rotation_bytes(self) -> int:
        """How much memory the rotated input sets should span: 4× the
        last-level cache, and on a CPU at least 256 MiB (a VM may report less
        cache than its host has)."""
        floor = 256 << 20 if self.device.type == "cpu" else 0
        return max(4 * self.cache_bytes, floor)


def clone_params(params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    out = []
    for p in params:
        q = nn.Parameter(p.detach().clone())
        q.infshape = p.infshape
        out.append(q)
    return out


def state_tensors(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> list[torch.Tensor]:
    """The per-element state buffers of ``p`` (same shape as ``p``; not ``step``)."""
    state = optimizer.state.get(p, {})
    return [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == p.shape]


def step_bytes(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], read_only: Sequence[str] = ()) -> int:
    """Bytes one step must move, in each tensor's storage dtype: read p, g and
    every state buffer, write p and every state buffer but those in
    ``read_only`` (Adam: 4 reads + 3 writes; SGD with momentum: 3 + 2;
    amsgrad adds a buffer)."""
    total = 0
    for p in params:
        total += 2 * p.numel() * p.element_size()
        if p.grad is not None:
            total += p.grad.numel() * p.grad.element_size()
        state = optimizer.state.get(p, {})
        for key, s in state.items():
            if isinstance(s, torch.Tensor) and s.shape == p.shape:
                total += (1 if key in read_only else 2) * s.numel() * s.element_size()
    return total


def step_once(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], seed: int) -> None:
    """``optimizer.step()``; for an optimizer that asks for gradients with an
    autograd graph (``should_create_graph()``, e.g. ESGD-M's Hessian-vector
    product steps) the gradients are ``p·a`` for this step (``a`` random,
    drawn from ``seed``: a diagonal Hessian), then the plain ones come back."""
    wants_graph = getattr(optimizer, "should_create_graph", None)
    if wants_graph is None or not wants_graph():
        optimizer.step()
        return
    plain = [p.grad for p in params]
    gen = torch.Generator(device=params[0].device)
    gen.manual_seed(seed + 7919)
    with torch.enable_grad():
        for p in params:
            a = torch.empty_like(p).normal_(0.0, 1.0, generator=gen)
            p.grad = p * a
    try:
        optimizer.step()
    finally:
        for p, g in zip(params, plain):
            p.grad = g


@torch.no_grad()
def max_rel_err(params: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """max over tensors of ``max|x - ref| / max|ref|``."""
    worst = 0.0
    for x, r in zip(params, reference):
        r32 = r.float()
        scale = r32.abs().max().item()
        diff = (x.detach().to(r.device).float() - r32).abs().max().item()
        if scale == 0.0:
            err = 0.0 if diff == 0.0 else math.inf
        else:
            err = diff / scale
        if math.isnan(diff):
            err = math.inf
        worst = max(worst, err)
    return worst


def _release(device: torch.device, nbytes: int) -> None:
    """Give memory back after a case of ``nbytes``.  Tensors are freed by
    reference counting; a full ``gc.collect`` (slow once torch._dynamo is
    imported) only runs when a lingering cycle would hold a lot of memory."""
    if nbytes > 256 << 20:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Case:
    """One parameter set × optimizer on one device."""

    def __init__(self, pset: ParamSet, opt: OptimizerSpec, cfg: Config) -> None:
        self.pset, self.opt, self.cfg = pset, opt, cfg
        self.element_size = torch.empty((), dtype=cfg.dtype).element_size()
        self.reference: Optional[list[torch.Tensor]] = None
        self.reference_device = cfg.device  # the host when the device is short of memory
        self.bytes_per_step: Optional[int] = None
        # fastmup storage options (Impl.options) -> (reference params, bytes per step) of the eager
        # reference with those options: an implementation is checked against the same rounding
        self._mode_references: dict = {}

    # -- memory -----------------------------------------------------------
    def copy_bytes(self) -> int:
        """One input set: params + grads + state buffers."""
        return self.pset.n_params * self.element_size * (2 + self.opt.state_buffers)

    def peak_bytes(self, n_copies: int, reference_on_device: bool = True) -> int:
        """Reference params kept + ``n_copies`` input sets + temporaries
        (torch's foreach Adam allocates about two params' worth; so does an
        HVP step's ``p·a`` gradients and probes)."""
        per_param = self.pset.n_params * self.element_size
        return per_param * (3 if reference_on_device else 2) + n_copies * self.copy_bytes()

    def plan_copies(self, free_bytes: int) -> tuple[int, Optional[str]]:
        """How many input sets to rotate through, or a reason it does not fit.

        On a GPU short of memory the reference parameters are kept on the host."""
        want = math.ceil(self.cfg.rotation_bytes() / max(self.copy_bytes(), 1))
        n = max(2, min(self.cfg.max_copies, want))
        budget = free_bytes * MEMORY_HEADROOM
        while n > 2 and self.peak_bytes(n) > budget:
            n -= 1
        self.reference_device = self.cfg.device
        if self.peak_bytes(n) > budget and self.cfg.device.type != "cpu" and self.peak_bytes(n, False) <= budget:
            self.reference_device = torch.device("cpu")
        elif self.peak_bytes(n) > budget:
            return 0, (
                f"needs ~{self.peak_bytes(n, self.cfg.device.type == 'cpu') / 2**30:.1f} GiB "
                f"({n} input sets of params+grads+state, reference, temporaries), {free_bytes / 2**30:.1f} GiB free"
            )
        return n, None

    # -- reference ----------------------------------------------------------
    def new_params(self) -> list[nn.Parameter]:
        return materialize(self.pset, self.cfg.device, self.cfg.dtype, seed=self.cfg.seed)

    def run_checked_steps(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> None:
        for s in range(self.cfg.check_steps):
            fill_grads(params, GRAD_SEEDS[s % 2])
            drop_grads(self.pset, params, s)
            step_once(optimizer, params, GRAD_SEEDS[s % 2])

    def prepare_reference(self) -> None:
        """Step the fastmup eager reference; keep its parameters and the step's byte count."""
        from fastmup.bench.impls import get as get_impl

        params = self.new_params()
        optimizer = get_impl(REFERENCE).make(params, self.opt)
        self.run_checked_steps(optimizer, params)
        self.reference = [p.detach().to(self.reference_device, copy=True) for p in params]
        self.bytes_per_step = step_bytes(optimizer, params, self.opt.read_only_state)
        if self.opt.clip_max_norm is not None:  # the norm reads every gradient once more
            self.bytes_per_step += sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        del optimizer, params
        _release(self.cfg.device, self.copy_bytes())

    def reference_for(self, options: tuple) -> tuple[list[torch.Tensor], int]:
        """``(reference params, bytes per step)`` of the eager reference run
        with the fastmup storage options ``options`` (stochastic rounding,
        master weights; ``()``: the plain reference)."""
        if not options:
            return self.reference, self.bytes_per_step
        found = self._mode_references.get(options)
        if found is None:
            from fastmup.bench.impls import Impl as _Impl

            params = self.new_params()
            optimizer = _Impl(REFERENCE, "fastmup", backend="eager", options=options).make(params, self.opt)
            self.run_checked_steps(optimizer, params)
            # an fp32 master replaces the read of the parameter (it is only written)
            nbytes = step_bytes(optimizer, params, self.opt.read_only_state)
            if dict(options).get("master_weights") == "fp32":
                nbytes -= sum(p.numel() * p.element_size() for p in params)
            found = self._mode_references[options] = (
                [p.detach().to(self.reference_device, copy=True) for p in params],
                nbytes,
            )
            del optimizer, params
        return found

    def instantiate(self, impl: Impl, n_copies: int) -> "Instance":
        return Instance(self, impl, n_copies)

    def close(self) -> None:
        self.reference = None
        self._mode_references.clear()
        _release(self.cfg.device, self.copy_bytes())


class Step:
    """One input set's optimizer step, as a training loop sees it.

    ``prepare()`` (untimed) gives the params the next of the instance's
    gradient sets: every step sees new gradient tensors, as after
    ``zero_grad(set_to_none=True)`` and a backward, without allocating any.
    (The sets have the same shapes; with two or more input sets, consecutive
    steps of one set never see the same gradient tensors.)"""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list, seed: int,
                 grad_sets: list[list[torch.Tensor]], offset: int, wait: bool, pset: Optional[ParamSet] = None) -> None:
        self.optimizer, self.params, self.seed = optimizer, params, seed
        self.grad_sets, self.offset, self.wait = grad_sets, offset, wait
        self.pset = pset
        self.calls = 0

    def prepare(self) -> None:
        grads = self.grad_sets[(self.offset + self.calls) % len(self.grad_sets)]
        for p, g in zip(self.params, grads):
            p.grad = g
        if self.pset is not None:
            drop_grads(self.pset, self.params, self.calls)

    def __call__(self) -> None:
        step_once(self.optimizer, self.params, self.seed)
        self.calls += 1
        if self.wait:
            torch.cuda.synchronize(self.params[0].device)


class _Rotation:
    """Steps the next input set on each call (for pytest-benchmark)."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps, self.calls = steps, 0

    def prepare(self) -> None:
        self.steps[self.calls % len(self.steps)].prepare()

    def __call__(self) -> None:
        self.steps[self.calls % len(self.steps)]()
        self.calls += 1


class Instance:
    """``n_copies`` independent parameter sets, each with its own gradients
    and optimizer of one implementation."""

    def __init__(self, case: Case, impl: Impl, n_copies: int) -> None:
        self.case, self.impl = case, impl
        first = case.new_params()
        self.copies = [first] + [clone_params(first) for _ in range(n_copies - 1)]
        for k, params in enumerate(self.copies):
            fill_grads(params, GRAD_SEEDS[k % 2])
        self.optimizers = [impl.make(params, case.opt) for params in self.copies]

    def check(self) -> float:
        """Step copy 0 like the reference was stepped; its max relative error."""
        assert self.case.reference is not None, "prepare_reference() first"
        self.case.run_checked_steps(self.optimizers[0], self.copies[0])
        err = max_rel_err(self.copies[0], self.case.reference_for(self.impl.options)[0])
        fill_grads(self.copies[0], GRAD_SEEDS[0])
        return err

    def steps(self, sync: bool = False) -> list["Step"]:
        """One step callable per input set (``sync``: wait for the device, for wall-clock timers)."""
        wait = sync and self.case.cfg.device.type == "cuda"
        grad_sets = [[p.grad for p in params] for params in self.copies]
        return [
            Step(o, ps, GRAD_SEEDS[k % 2], grad_sets, k, wait, self.case.pset)
            for k, (o, ps) in enumerate(zip(self.optimizers, self.copies))
        ]

    def rotating_step(self, sync: bool = True) -> "Step":
        """One callable that steps the next input set on each call."""
        return _Rotation(self.steps(sync=sync))

    def close(self) -> None:
        nbytes = len(self.copies) * self.case.copy_bytes()
        self.optimizers.clear()
        self.copies.clear()
        _release(self.case.cfg.device, nbytes)


@dataclass
class Results:
    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    finished: list[tuple[str, str]] = field(default_factory=list)  # (model, optimizer) cases done

    def skip(self, model: str, optimizer: str, impl: str, reason: str) -> None:
        self.skipped.append({"model": model, "optimizer": optimizer, "impl": impl, "reason": reason})


def run(
    model_names: Sequence[str],
    optimizers: Sequence[OptimizerSpec],
    impls: Sequence[Impl],
    cfg: Config,
    copy_bw_GBps: float,
    free_bytes: Callable[[], int],
    progress: Optional[Callable[[str], None]] = None,
    out: Optional[Results] = None,
    checkpoint: Optional[Callable[[Results], None]] = None,
) -> Results:
    """Time and check every model × optimizer × implementation.

    ``progress(label)`` is called once per (model, optimizer, impl) triple.
    Rows go into ``out`` (a fresh :class:`Results` by default) as each case
    finishes, so that a caller interrupted mid-run keeps the finished cases;
    ``checkpoint(out)`` is called after each case (e.g. to save them).
    """
    out = Results() if out is None else out

    def finish(model: str, opt: OptimizerSpec) -> None:
        out.finished.append((model, opt.name))
        if checkpoint is not None:
            checkpoint(out)

    tick = progress or (lambda label: None)
    began = time.perf_counter()
    left = [len(model_names) * len(optimizers) * len(impls)]  # triples not yet timed

    def budget() -> float:
        """This implementation's share of the time left (cfg.budget_s at most)."""
        remaining = cfg.time_limit_s - (time.perf_counter() - began)
        if not math.isfinite(remaining):
            return cfg.budget_s
        return max(0.0, min(cfg.budget_s, 0.5 * remaining / (left[0] + 1)))  # left excludes the current one

    def done(label: str) -> None:
        left[0] -= 1
        tick(label)

    for model in model_names:
        pset = model_sets.get(model)
        for opt in optimizers:
            if fastmup_class(opt) is None:
                for impl in impls:
                    out.skip(model, opt.name, impl.name, f"fastmup has no {opt.fastmup_name} yet")
                    done(f"{model} {opt.name} {impl.name}")
                finish(model, opt)
                continue
            case = Case(pset, opt, cfg)
            n_copies, reason = case.plan_copies(free_bytes())
            if reason is None:
                try:
                    case.prepare_reference()
                except Exception as e:  # noqa: BLE001 - reported, the run goes on
                    reason = f"the eager reference failed: {type(e).__name__}: {e}"
            if reason is not None:
                for impl in impls:
                    out.skip(model, opt.name, impl.name, reason)
                    done(f"{model} {opt.name} {impl.name}")
                case.close()
                finish(model, opt)
                continue
            case_rows = _time_case(case, impls, n_copies, budget, done, out, copy_bw_GBps, free_bytes)
            out.rows += case_rows
            case.close()
            finish(model, opt)
    return out


def _row(case: Case, impl: Impl, stats: Stats, err: float, n_copies: int, copy_bw_GBps: float,
         setup_s: float, timing_s: float, timing: str) -> dict:
    pset, cfg = case.pset, case.cfg
    nbytes = case.reference_for(impl.options)[1]
    gbps = nbytes / (stats.median * 1e-3) / 1e9
    return {
        "model": pset.name,
        "optimizer": case.opt.name,
        "impl": impl.name,
        "n_params": pset.n_params,
        "n_tensors": pset.n_tensors,
        "ms_median": stats.median,
        "ms_min": stats.min,
        "ms_max": stats.max,
        "GBps": gbps,
        "pct_of_copy_bw": 100.0 * gbps / copy_bw_GBps if copy_bw_GBps else None,
        "baseline": case.opt.baseline,
        "speedup_vs_baseline": None,
        "speedup_vs_torch_fused": None,  # the same figure where the baseline is torch-fused
        "max_rel_err_vs_eager": err,
        "steps_timed": stats.n,
        "ms_samples": list(stats.samples),  # in timing order (interleaved: one per round)
        "n_copies": n_copies,
        "bytes_per_step": nbytes,
        "dtype": str(cfg.dtype).replace("torch.", ""),
        "timing": timing,
        "setup_check_s": setup_s,  # building the input sets + the checked steps
        "timing_s": timing_s,  # warm-up + timed steps
    }


def _set_speedup(row: dict, speedup: float) -> None:
    row["speedup_vs_baseline"] = speedup
    if row["baseline"] == BASELINE:
        row["speedup_vs_torch_fused"] = speedup


def _time_case(case: Case, impls: Sequence[Impl], n_copies: int, budget: Callable[[], float],
               done: Callable[[str], None], out: "Results", copy_bw_GBps: float,
               free_bytes: Callable[[], int]) -> list[dict]:
    """Check and time every implementation of one case.

    With ``cfg.interleave`` (and memory for every implementation's input
    sets at once) the implementations are timed together, round by round
    (:func:`time_interleaved`), and each row's ``speedup_vs_baseline`` is
    the median over rounds of the per-round ratio; otherwise one after the
    other, and the ratio is of the medians.  The ratios are to the
    optimizer's baseline (torch-fused; ESGD-M: the per-tensor loop)."""
    cfg = case.cfg
    label = f"{case.pset.name} {case.opt.name}"
    ready: list[tuple[Impl, Instance, float, float]] = []  # impl, instance, error, setup seconds
    rows: list[dict] = []
    sequential = not cfg.interleave
    if not sequential:
        usable = [i for i in impls if i.unavailable(case.opt, cfg.device, cfg.dtype) is None]
        need = len(usable) * n_copies * case.copy_bytes()
        sequential = need > (free_bytes() - case.peak_bytes(0)) * MEMORY_HEADROOM
    try:
        for impl in impls:
            done(f"{label} {impl.name}")
            reason = impl.unavailable(case.opt, cfg.device, cfg.dtype)
            if reason is not None:
                out.skip(case.pset.name, case.opt.name, impl.name, reason)
                continue
            instance = None
            t0 = time.perf_counter()
            try:
                instance = case.instantiate(impl, n_copies)
                err = instance.check()
                t1 = time.perf_counter()
                if sequential:
                    stats = time_steps(instance.steps(), cfg.device, warmup=warmup_calls(cfg, n_copies), repeats=cfg.steps,
                                       budget_s=budget(), min_repeats=min(cfg.min_steps, cfg.steps))
                    rows.append(_row(case, impl, stats, err, n_copies, copy_bw_GBps, t1 - t0,
                                     time.perf_counter() - t1, "sequential"))
                else:
                    ready.append((impl, instance, err, t1 - t0))
                    instance = None  # kept for the interleaved timing
            except NotImplementedError as e:
                out.skip(case.pset.name, case.opt.name, impl.name, f"not implemented: {e}")
            except Exception as e:  # noqa: BLE001 - reported, the run goes on
                out.skip(case.pset.name, case.opt.name, impl.name, f"failed: {type(e).__name__}: {e}")
            finally:
                if instance is not None:
                    instance.close()
        if sequential:
            baseline = next((r for r in rows if r["impl"] == case.opt.baseline), None)
            for r in rows:
                if baseline is not None:
                    _set_speedup(r, baseline["ms_median"] / r["ms_median"])
            return rows
        if not ready:
            return rows
        t1 = time.perf_counter()
        try:
            times = time_interleaved(
                [inst.steps() for _, inst, _, _ in ready], cfg.device, warmup=warmup_calls(cfg, n_copies), repeats=cfg.steps,
                budget_s=budget() * len(ready), min_repeats=min(cfg.min_steps, cfg.steps),
            )
        except Exception as e:  # noqa: BLE001 - reported, the run goes on
            for impl, _, _, _ in ready:
                out.skip(case.pset.name, case.opt.name, impl.name, f"failed: {type(e).__name__}: {e}")
            return rows
        timing_s = time.perf_counter() - t1
        base = next((ms for (impl, _, _, _), ms in zip(ready, times) if impl.name == case.opt.baseline), None)
        for (impl, _, err, setup_s), ms in zip(ready, times):
            row = _row(case, impl, Stats.of(ms), err, n_copies, copy_bw_GBps, setup_s, timing_s / len(ready), "interleaved")
            if base is not None:
                _set_speedup(row, statistics.median(b / x for b, x in zip(base, ms)))
            rows.append(row)
        return rows
    finally:
        for _, instance, _, _ in ready:
            instance.close()

