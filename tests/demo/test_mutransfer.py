"""The μTransfer demo, reduced: two widths, a short learning-rate grid, the MLP on digits.

The claim under test is the demo's: under μP the best learning rate found at
one width stays (within one grid step) the best at four times the width.
scikit-learn (the bundled digits) is an optional dependency.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

pytest.importorskip("sklearn")

from fastmup.demo import mutransfer as mt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The demo's MLP setup, reduced: widths 64 (the μP base) and 256, lr grid
# 2^-10 .. 2^-2, 100 Adam steps of batch 64 (3.5 epochs), one seed; the loss
# is measured on all the digits after training.
SMALL = mt.CONFIGS["mlp"].replace(
    widths=(64, 256),
    base_width=64,
    log2_lrs=tuple(float(v) for v in range(-10, -1)),
    steps=100,
    batch_size=64,
    seeds=1,
)


# tiny models: one thread is as fast as two and immune to oversubscription
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mlp_results():
    return mt.sweep(SMALL, parametrizations=("sp", "mup"), workers=1, backend="eager", progress=False)


def test_mup_best_lr_transfers_across_widths(mlp_results):
    best = mt.best_lrs(mlp_results)
    narrow, wide = SMALL.widths
    lr_narrow, loss_narrow = best[("mup", narrow)]
    lr_wide, loss_wide = best[("mup", wide)]
    table = mt.format_best_table(mlp_results)
    # Something was learnt, at finite losses: a test that could not fail would prove nothing.
    assert math.isfinite(lr_narrow) and math.isfinite(lr_wide), table
    for r in mlp_results:
        if r["parametrization"] == "mup" and r["log2_lr"] == lr_narrow:
            assert all(math.isfinite(v) for v in r["losses"]), r
            assert r["final"] < 0.25 * r["first"], (r["width"], r["first"], r["final"])
    assert max(loss_narrow, loss_wide) < 0.5, table
    # The μTransfer claim: the optimum moves by at most one grid step.
    assert abs(lr_wide - lr_narrow) <= 1, table


def test_results_are_complete_and_finite_below_the_optimum(mlp_results):
    assert len(mlp_results) == 2 * len(SMALL.widths) * len(SMALL.log2_lrs)
    best = mt.best_lrs(mlp_results)
    for r in mlp_results:
        assert len(r["losses"]) >= 1 and r["cpu_seconds"] >= 0
        if r["log2_lr"] <= best[(r["parametrization"], r["width"])][0]:
            assert math.isfinite(r["final"]), r


def test_plot_and_table(mlp_results, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sweep.png"
    fig = mt.plot_sweep(mlp_results, SMALL, str(path), note="test")
    assert path.stat().st_size > 1000
    assert len(fig.axes) == 2
    table = mt.format_best_table(mlp_results, title="t")
    assert "SP best lr" in table and "μP best lr" in table
    assert all(f"{w:>7} " in table for w in SMALL.widths)


def test_sweep_in_worker_processes_matches_in_process():
    # The CLI's default path: spawned workers with one thread each.
    tiny = SMALL.replace(widths=(32,), base_width=32, log2_lrs=(-7.0, -6.0), steps=5)
    here = mt.sweep(tiny, parametrizations=("mup",), workers=1, backend="eager", progress=False)
    there = mt.sweep(tiny, parametrizations=("mup",), workers=2, backend="eager", progress=False)
    def key(runs):
        return [(r["log2_lr"], r["losses"], r["final"]) for r in runs]

    assert key(here) == key(there)


def test_best_lrs_treats_any_diverged_seed_as_diverged():
    runs = [
        dict(parametrization="mup", width=8, log2_lr=-3.0, seed=0, final=0.1),
        dict(parametrization="mup", width=8, log2_lr=-3.0, seed=1, final=float("nan")),
        dict(parametrization="mup", width=8, log2_lr=-4.0, seed=0, final=0.3),
        dict(parametrization="mup", width=8, log2_lr=-4.0, seed=1, final=0.5),
        dict(parametrization="sp", width=8, log2_lr=-4.0, seed=0, final=float("nan")),
    ]
    best = mt.best_lrs(runs)
    assert best[("mup", 8)] == (-4.0, pytest.approx(0.4))
    assert all(math.isnan(v) for v in best[("sp", 8)])


def test_transformer_run_is_finite_and_learns():
    cfg = mt.CONFIGS["transformer"].replace(widths=(32,), base_width=32, steps=30, eval_size=32)
    for parametrization in ("sp", "mup"):
        r = mt.train_one(cfg, parametrization, 32, -6.0, 0, backend="eager")
        assert len(r["losses"]) == 30 and all(math.isfinite(v) for v in r["losses"])
        assert r["final"] < r["first"] - 0.3, (parametrization, r["first"], r["final"])


def test_mup_model_equals_sp_model_at_base_width_up_to_the_mup_choices():
    from fastmup.demo.models import build

    torch.manual_seed(0)
    sp = build("mlp", 64, "sp", 64)
    torch.manual_seed(0)
    mup = build("mlp", 64, "mup", 64)
    # Same init for every layer but the readout (zero under μP); width multiplier 1.
    assert torch.equal(sp.fc_in.weight, mup.fc_in.weight)
    assert torch.equal(sp.hidden[0].weight, mup.hidden[0].weight)
    assert mup.readout.width_mult() == 1.0 and torch.count_nonzero(mup.readout.weight) == 0
    wide = build("mlp", 256, "mup", 64)
    assert wide.readout.width_mult() == 4.0
    with pytest.raises(ValueError, match="parametrization"):
        build("mlp", 64, "ntk", 64)


def test_coord_check_sp_blows_up_and_mup_does_not(tmp_path):
    pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    widths = (64, 512)
    path = tmp_path / "coord.png"
    df_sp, df_mup = mt.coord_check("mlp", widths=widths, base_width=64, nsteps=3, nseeds=1, progress=False,
                                   backend="eager", path=str(path))
    assert path.stat().st_size > 1000

    def growth(df, module):
        last = df[(df["module"] == module) & (df["t"] == df["t"].max())].groupby("width")["l1"].mean()
        return last[widths[1]] / last[widths[0]]

    # After two Adam steps the SP readout output grows with width; μP's stays put.
    assert growth(df_sp, "readout") > 2.0 * growth(df_mup, "readout")
    assert 0.5 < growth(df_mup, "readout") < 2.0


def test_cli_writes_pngs_and_results(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    mt.main([
        "--models", "mlp,transformer", "--widths", "32,64", "--steps", "4", "--seeds", "1", "--lr-range", "-8", "-7",
        "--workers", "1", "--backend", "eager", "--no-progress", "--no-coord-check", "--out", str(out),
    ])
    assert (out / "mutransfer_mlp.png").stat().st_size > 1000
    assert (out / "mutransfer_transformer.png").stat().st_size > 1000
    summary = json.loads((out / "results.json").read_text())
    assert set(summary) >= {"mlp", "transformer", "seconds"}
    assert len(summary["mlp"]["runs"]) == 2 * 2 * 2
    printed = capsys.readouterr().out
    assert "best learning rate per width" in printed


def test_demo_dispatcher(capsys):
    from fastmup.demo import main

    assert main(["no-such-demo"]) == 2
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert "mutransfer" in capsys.readouterr().out


def _load_example(name: str):
    path = os.path.join(ROOT, "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dag_mlp_example_trains():
    example = _load_example("dag_mlp")
    out = example.main(["--steps", "12", "--width", "64", "--base-width", "32", "--quiet", "--backend", "eager"])
    losses = out["losses"]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert out["lr_scale"] == pytest.approx(0.28057, abs=1e-5)  # the paper's factor for "2_02_002_0002"
    model = out["model"]
    assert model.readout.width_mult() == 2.0  # μP base shapes from width 32


def test_mutransfer_example_is_importable_without_running():
    example = _load_example("mutransfer")
    assert example.main is mt.main
    assert "examples" in sys.modules.get(example.__name__, example).__file__
