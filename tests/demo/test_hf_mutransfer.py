"""The transformers μTransfer demo, reduced to a smoke run.

A learning-rate sweep of two widths and three rates, a coordinate check and
their plots; the command line's configuration.  What the full run shows is
in the README; what μP does to these models is tested in
``tests/integrations/transformers``.
"""
from __future__ import annotations

import math
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from fastmup.demo import hf_mutransfer as hm  # noqa: E402

TINY = hm.CONFIGS["gpt2"].replace(widths=(32, 64), log2_lrs=(-8.0, -6.0, -4.0), steps=20)


# tiny models: one thread is as fast as two and immune to oversubscription
pytestmark = pytest.mark.usefixtures("one_thread")


def test_sweep_runs_learns_and_plots(tmp_path):
    results = hm.mt.sweep(TINY, workers=1, backend="eager", progress=False, train=hm.train_one)
    assert len(results) == 2 * 2 * 3
    for r in results:
        assert r["model"] == "gpt2" and len(r["losses"]) == TINY.steps
        assert math.isfinite(r["final"]) and r["final"] < r["first"], r  # every run learns something
    # μP at base width differs from SP only by the zero query (GPT-2 ties its readout):
    # the first losses agree where the query starts at zero.
    first = {(r["parametrization"], r["width"], r["log2_lr"]): r["first"] for r in results}
    assert first[("mup", 32, -6.0)] == pytest.approx(first[("sp", 32, -6.0)], abs=0.05)
    path = tmp_path / "sweep.png"
    hm.mt.plot_sweep(results, TINY, str(path), title="GPT-2", panel_titles=hm._PANELS)
    assert path.stat().st_size > 10_000


def test_coord_check_plots(tmp_path):
    path = tmp_path / "coord.png"
    df_sp, df_mup = hm.coord_check("llama", widths=(32, 64), nseeds=1, nsteps=2, progress=False,
                                   backend="eager", path=str(path), modules=hm.COORD_MODULES["llama"])
    for df in (df_sp, df_mup):
        assert set(hm.COORD_MODULES["llama"]) <= set(df["module"])
        assert sorted(df["width"].unique()) == [32, 64]
    assert path.stat().st_size > 10_000


def test_command_line_configs():
    args = hm.build_parser().parse_args(["--quick", "--models", "llama", "--steps", "7"])
    cfgs = hm.mt.configs_from_args(args, table=hm.QUICK_CONFIGS)
    assert list(cfgs) == ["llama"] and cfgs["llama"].steps == 7
    assert hm.build_parser().parse_args([]).models == "gpt2,llama"
    with pytest.raises(ValueError, match="unknown model kind"):
        hm.model_config("bert", 32)
