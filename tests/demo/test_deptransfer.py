"""The depth-transfer demo, reduced: two depths, a short grid, few steps.

The claim under test is the one the demo makes for CompleteP: its best
learning rate at depth 2 stays (within one grid step) the best at depth 8.
"""
from __future__ import annotations

import math

import pytest

from fastmup.demo import deptransfer as dt

SMALL = dt.QUICK_CONFIG.replace(depths=(2, 8), log2_lrs=tuple(float(v) for v in range(-9, -4)), steps=50)


# tiny models: one thread is as fast as two and immune to oversubscription
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def results():
    return dt.sweep(SMALL, workers=1, backend="eager", progress=False)


def test_completep_best_lr_transfers_across_depth(results):
    best = dt.best_lrs(results)
    table = dt.format_best_table(results)
    lr2, loss2 = best[("completep", 2)]
    lr8, loss8 = best[("completep", 8)]
    assert math.isfinite(lr2) and math.isfinite(lr8), table
    # something was learnt: below the loss of a model that ignores the context
    unigram = dt.tasks.MarkovTask(vocab=SMALL.vocab, seq_len=SMALL.seq_len).entropy_rates()[0]
    assert max(loss2, loss8) < unigram, table
    assert abs(lr8 - lr2) <= 1, table
    assert dt.optimum_shift(results)["completep"] == lr8 - lr2


def test_results_are_complete(results):
    assert len(results) == len(dt.PARAMETRIZATIONS) * len(SMALL.depths) * len(SMALL.log2_lrs)
    assert {r["parametrization"] for r in results} == set(dt.PARAMETRIZATIONS)
    # at depth 2 = the base depth, the three parametrizations are the same model
    by = {(r["parametrization"], r["log2_lr"]): r["final"] for r in results if r["depth"] == 2}
    for lr in SMALL.log2_lrs:
        vals = [by[(p, lr)] for p in dt.PARAMETRIZATIONS]
        assert all(v == vals[0] or (math.isnan(v) and math.isnan(vals[0])) for v in vals), (lr, vals)


def test_plot_and_table(results, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "d.png"
    dt.plot_sweep(results, SMALL, str(path))
    assert path.stat().st_size > 10_000
    table = dt.format_best_table(results, title="t")
    assert "CompleteP (α = 1): best log2 lr moves" in table


def test_coord_check_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    dfs = dt.coord_check(SMALL.replace(width=32), depths=(2, 8), nsteps=3, nseeds=1, progress=False, backend="eager")
    assert set(dfs) == set(dt.PARAMETRIZATIONS)
    path = tmp_path / "c.png"
    dt.plot_coord_check(dfs, str(path), lr=2.0**-6)
    assert path.stat().st_size > 10_000


def test_command_line_quick(tmp_path, monkeypatch):
    monkeypatch.setattr(dt, "QUICK_CONFIG", SMALL.replace(depths=(2, 4), log2_lrs=(-7.0, -6.0), steps=5))
    summary = dt.main(["--quick", "--out", str(tmp_path), "--workers", "1", "--no-progress", "--no-coord-check",
                       "--backend", "eager"])
    assert (tmp_path / "deptransfer.png").exists() and (tmp_path / "results.json").exists()
    assert set(summary["optimum_shift"]) == set(dt.PARAMETRIZATIONS)
