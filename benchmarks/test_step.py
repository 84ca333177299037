"""One optimizer step, per parameter set × optimizer × implementation.

Each benchmark first checks its implementation against the fastmup eager
reference (same start, same gradients, a few steps), then times steps that
rotate through independent input sets.  ``extra_info`` carries the sizes,
the bytes a step moves, GB/s and the error, so saved runs hold every figure
``python -m fastmup.bench`` prints.
"""
from __future__ import annotations

import pytest

from fastmup.bench import impls, optimizers
from fastmup.bench.cli import TOLERANCE
from fastmup.bench.runner import WARM_STEPS_PER_SET


def test_step(benchmark, bench_settings, bench_cases, bench_model, bench_optimizer, bench_impl):
    device = bench_settings.device
    opt = optimizers.get(bench_optimizer)
    impl = impls.get(bench_impl)
    bench_cases.prepare(impl)
    case, n_copies, reason = bench_cases.get(bench_model, bench_optimizer)
    if reason is not None:
        pytest.skip(reason)
    reason = impl.unavailable(opt, device, case.cfg.dtype)
    if reason is not None:
        pytest.skip(reason)

    try:
        instance = case.instantiate(impl, n_copies)
    except NotImplementedError as e:
        pytest.skip(f"not implemented: {e}")
    try:
        err = instance.check()
        step = instance.rotating_step(sync=True)
        benchmark.group = f"{bench_model} {bench_optimizer}"
        benchmark.extra_info.update(
            model=bench_model,
            optimizer=bench_optimizer,
            impl=bench_impl,
            device=str(device),
            n_params=case.pset.n_params,
            n_tensors=case.pset.n_tensors,
            bytes_per_step=case.bytes_per_step,
            n_copies=n_copies,
            max_rel_err_vs_eager=err,
        )
        benchmark.pedantic(step, setup=step.prepare, rounds=bench_settings.rounds, warmup_rounds=max(bench_settings.warmup, WARM_STEPS_PER_SET * n_copies), iterations=1)
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is not None and stats.median > 0:
            benchmark.extra_info["GBps"] = case.bytes_per_step / stats.median / 1e9
    finally:
        instance.close()
    tolerance = impl.tolerance(TOLERANCE.get(case.cfg.dtype, 1e-2), case.cfg.check_steps)
    if not impl.is_reference:
        assert err <= tolerance, f"{bench_impl} differs from the eager reference: max rel err {err:.3g} > {tolerance:g}"

