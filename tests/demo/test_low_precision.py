"""The low-precision demo, in its quick configuration: every mode trains,
the remainders follow the fp32 master weights bit for bit, and the figure
and the JSON are written."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("matplotlib")

from fastmup.demo import low_precision as lp  # noqa: E402

CFG = lp.replace(lp.QUICK, steps=30, eval_every=10, backend="eager")


@pytest.fixture(scope="module")
def results():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {r["label"]: r for r in lp.run(CFG, tuple(lp.MODES))}
    finally:
        torch.set_num_threads(before)


def test_every_mode_trains(results):
    for r in results.values():
        assert all(math.isfinite(v) for v in r["losses"])
        assert r["losses"][-1] < r["losses"][0]


def test_remainder_run_is_the_fp32_master_run(results):
    assert results["bf16 + remainder"]["losses"] == results["bf16 + fp32 master"]["losses"]


def test_only_low_precision_runs_lose_updates(results):
    assert max(results["fp32"]["lost_updates"]) < 0.01
    assert max(results["bf16"]["lost_updates"]) > 0.05


def test_main_writes_figure_and_json(tmp_path, monkeypatch):
    monkeypatch.setattr(lp, "QUICK", CFG)
    monkeypatch.setattr(lp, "LABELS", ("bf16", "fp32"))
    lp.main(["--quick", "--out", str(tmp_path)])
    assert os.path.getsize(tmp_path / "low_precision.png") > 1000
    data = json.loads((tmp_path / "low_precision.json").read_text())
    assert [r["label"] for r in data["results"]] == ["bf16", "fp32"]
