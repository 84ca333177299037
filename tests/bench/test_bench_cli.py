"""``python -m fastmup.bench`` in-process at its tiniest (``--smoke``): the
JSON schema, correctness of every fast implementation against the eager
reference, the PNG; plus the byte counts and the parameter sets' shapes."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from fastmup.bench import impls, main, models, optimizers
from fastmup.bench.runner import step_bytes, step_once
from fastmup.bench.timing import time_interleaved

ROW_KEYS = {
    "model", "optimizer", "impl", "n_params", "n_tensors", "ms_median", "ms_min", "ms_max", "GBps",
    "pct_of_copy_bw", "speedup_vs_torch_fused", "speedup_vs_baseline", "baseline", "max_rel_err_vs_eager", "timing", "ms_samples", "steps_timed",
}
VERSION_KEYS = {"python", "torch", "triton", "fastmup", "mup", "cuda"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "result.json", out / "result.png"
    threads = torch.get_num_threads()
    try:
        rc = main(["--smoke", "--device", "cpu", "--threads", "1", "--no-progress",
                   "--json", str(json_path), "--plot", str(png_path)])
    finally:
        torch.set_num_threads(threads)
    return rc, json.loads(json_path.read_text()), png_path


def test_exit_status_and_schema(smoke_run):
    rc, doc, _ = smoke_run
    assert rc == 0
    for key in ("device", "versions", "git_commit", "copy_bandwidth_GBps", "rows", "skipped"):
        assert key in doc, key
    assert VERSION_KEYS <= set(doc["versions"])
    assert doc["versions"]["torch"] == torch.__version__
    assert doc["git_commit"] is None or len(doc["git_commit"]) == 40
    assert isinstance(doc["copy_bandwidth_GBps"], float) and doc["copy_bandwidth_GBps"] > 0
    assert doc["rows"], "no implementation ran"
    for row in doc["rows"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["ms_min"] <= row["ms_median"] <= row["ms_max"]
        assert row["GBps"] > 0 and row["pct_of_copy_bw"] > 0
        pset = models.get(row["model"])
        assert (row["n_params"], row["n_tensors"]) == (pset.n_params, pset.n_tensors)
    for entry in doc["skipped"]:
        assert {"model", "optimizer", "impl", "reason"} <= set(entry) and entry["reason"]


def test_every_case_ran_or_was_skipped_with_a_reason(smoke_run):
    _, doc, _ = smoke_run
    ran = {(r["model"], r["optimizer"], r["impl"]) for r in doc["rows"]}
    skipped = {(s["model"], s["optimizer"], s["impl"]) for s in doc["skipped"]}
    expected = {(m, o, i) for m in models.SMOKE for o in optimizers.OPTIMIZERS for i in impls.IMPLS}
    assert ran | skipped == expected
    assert not ran & skipped
    for m in models.SMOKE:  # the reference and the baseline always run on CPU
        for o in ("adam", "adamw", "sgd"):
            assert (m, o, "fastmup-eager") in ran
            assert (m, o, "torch-fused") in ran


def test_fast_implementations_match_the_eager_reference(smoke_run):
    _, doc, _ = smoke_run
    checked = 0
    for row in doc["rows"]:
        if row["impl"] == impls.REFERENCE:
            assert row["max_rel_err_vs_eager"] == 0
            continue
        assert row["max_rel_err_vs_eager"] < 1e-5, row
        checked += 1
    assert checked > 0


def test_speedup_is_relative_to_the_baseline(smoke_run):
    """× baseline: torch-fused for the torch-like optimizers, the per-tensor
    loop for ESGD-M (torch has none)."""
    _, doc, _ = smoke_run
    for row in doc["rows"]:
        assert row["baseline"] == ("esgd-per-tensor-torch" if row["optimizer"] == "esgd" else "torch-fused")
        key = (row["model"], row["optimizer"], row["baseline"])
        base = next((r for r in doc["rows"] if (r["model"], r["optimizer"], r["impl"]) == key), None)
        assert base is not None, key
        if row["timing"] == "interleaved":  # the median over rounds of the per-round ratio
            ratios = [b / x for b, x in zip(base["ms_samples"], row["ms_samples"])]
            assert len(ratios) == row["steps_timed"] == base["steps_timed"]
            expected = statistics.median(ratios)
        else:
            expected = base["ms_median"] / row["ms_median"]
        assert row["speedup_vs_baseline"] == pytest.approx(expected)
        assert row["speedup_vs_torch_fused"] == (row["speedup_vs_baseline"] if row["baseline"] == "torch-fused" else None)


def test_interleaved_by_default_and_sequential_on_request(smoke_run, tmp_path):
    _, doc, _ = smoke_run
    assert doc["config"]["interleave"] is True
    assert {r["timing"] for r in doc["rows"]} == {"interleaved"}
    path = tmp_path / "seq.json"
    threads = torch.get_num_threads()
    try:
        rc = main(["--smoke", "--device", "cpu", "--threads", "1", "--no-progress", "--sequential",
                   "--models", "small-64", "--optimizers", "sgd", "--impls", "fastmup-eager,torch-fused",
                   "--json", str(path)])
    finally:
        torch.set_num_threads(threads)
    seq = json.loads(path.read_text())
    assert rc == 0 and seq["config"]["interleave"] is False
    assert [r["timing"] for r in seq["rows"]] == ["sequential", "sequential"]
    for row in seq["rows"]:
        assert len(row["ms_samples"]) == row["steps_timed"]
        assert statistics.median(row["ms_samples"]) == pytest.approx(row["ms_median"])


def test_time_interleaved_alternates_the_order_and_times_every_round():
    calls = []
    steps = [[lambda k=k, j=j: calls.append((k, j)) for j in range(2)] for k in range(3)]  # 3 impls x 2 input sets
    ms = time_interleaved(steps, torch.device("cpu"), warmup=1, repeats=4)
    assert [len(m) for m in ms] == [4, 4, 4]
    warm, timed = calls[:6], calls[6:]
    assert warm == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]  # every input set stepped before timing
    assert [k for k, _ in timed] == [0, 1, 2, 2, 1, 0, 0, 1, 2, 2, 1, 0]
    assert [j for k, j in timed if k == 1] == [0, 1, 0, 1]  # each impl rotates through its own input sets


def test_plot_is_a_png(smoke_run):
    *_, png = smoke_run
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_on_stdout(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "gpt2-xl" in out and "torch-fused" in out


def test_unknown_names_are_rejected():
    with pytest.raises(SystemExit):
        main(["--smoke", "--models", "no-such-model"])
    with pytest.raises(SystemExit):
        main(["--smoke", "--impls", "nope"])


@pytest.mark.parametrize("opt_name, per_element", [("adam", 7), ("adamw", 7), ("sgd", 5), ("esgd", 6)])
def test_step_bytes(opt_name, per_element):
    """Adam reads p, g, m, v and writes p, m, v; SGD-M reads p, g, b and
    writes p, b; ESGD-M's plain step reads p, g, m, d and writes p, m."""
    spec = optimizers.get(opt_name)
    if optimizers.fastmup_class(spec) is None:
        pytest.skip(f"fastmup has no {spec.fastmup_name}")
    pset = models.get("small-64")
    params = models.materialize(pset, "cpu")
    models.fill_grads(params, 0)
    opt = impls.get("fastmup-eager").make(params, spec)
    step_once(opt, params, 0)  # an HVP step first where the optimizer asks for one
    assert step_bytes(opt, params, spec.read_only_state) == per_element * 4 * pset.n_params


@pytest.mark.parametrize(
    "name, tensors, params_m",
    [("gpt2-small", 148, 124.4), ("gpt2-medium", 292, 354.8), ("gpt2-large", 436, 774.0),
     ("gpt2-xl", 580, 1557.6), ("resnet50", 161, 25.6), ("small-500", 500, 0.983)],
)
def test_parameter_sets(name, tensors, params_m):
    pset = models.get(name)
    assert pset.n_tensors == tensors
    assert pset.n_params / 1e6 == pytest.approx(params_m, rel=2e-3)


def test_mup_splitting_sees_several_multipliers():
    mup = pytest.importorskip("mup")
    params = models.materialize(models.get("gpt2-tiny"), "cpu")
    groups = mup.MuAdam(params, impl=lambda g, **kw: torch.optim.Adam(g, **kw), lr=1e-3).param_groups
    assert len({g["lr"] for g in groups}) >= 3  # two matrix multipliers + vectors
    groups = mup.MuSGD(params, impl=lambda g, **kw: torch.optim.SGD(g, **kw), lr=1e-2).param_groups
    assert len({g["lr"] for g in groups}) >= 4


def test_every_step_sees_new_gradient_tensors():
    """As in a training loop (zero_grad(set_to_none=True), backward), each
    timed step of an input set gets gradient tensors other than its last."""
    from fastmup.bench.runner import Case, Config

    case = Case(models.get("small-64"), optimizers.get("adam"), Config(device=torch.device("cpu")))
    case.prepare_reference()
    instance = case.instantiate(impls.get("fastmup-eager"), 2)
    try:
        steps = instance.steps()
        seen = []
        for _ in range(3):
            steps[0].prepare()
            seen.append(instance.copies[0][0].grad)
            steps[0]()
        assert seen[0] is not seen[1] and seen[1] is not seen[2]
        assert all(g.shape == instance.copies[0][0].shape for g in seen)
    finally:
        instance.close()
        case.close()
