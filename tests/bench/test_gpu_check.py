"""``make gpu-check`` without a GPU: its dry run (the same phases on the CPU
with tiny sets) end to end, and the parts that keep one failure from losing
the rest: a failing case, an overrunning child, junit parsing."""
from __future__ import annotations

import datetime
import json
import sys

import pytest

from fastmup.bench import gpu_check
from fastmup.ext import build as ext_build


@pytest.mark.skipif(bool(ext_build.missing_requirements("cpu")), reason="the cpu backend cannot be built here")
def test_dry_run_writes_one_document(tmp_path):
    # generous budget: on a fresh CI machine the build of the cpu backend happens here
    rc = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--budget", "900"])
    (path,) = tmp_path.glob("dry-run-cpu-*.json")
    doc = json.loads(path.read_text())
    assert rc == 0 and doc["ok"], json.dumps({k: doc[k] for k in ("build", "tests", "bench")}, indent=1)[:4000]
    for key in ("device", "device_info", "versions", "git_commit", "nvcc", "timestamp", "wall_s", "plan"):
        assert key in doc, key
    assert doc["build"]["ok"] and doc["build"]["kind"] == "cpu"
    suites = {t["suite"]: t for t in doc["tests"]}
    assert set(suites) == {s.name for s in gpu_check.DRY_PLAN.suites}
    assert suites["shared-math"]["passed"] > 0 and not suites["shared-math"]["failed"]
    assert suites["cuda-backend"]["skipped"] > 0  # collected, and skipped without a GPU
    cases = {(c["model"], c["optimizer"]) for c in doc["bench"]["cases"] if c["ok"]}
    assert cases == {(m, o) for m in gpu_check.DRY_PLAN.models for o in gpu_check.DRY_PLAN.optimizers}
    ran = {(r["model"], r["optimizer"], r["impl"]) for r in doc["rows"]}
    assert ("gpt2-tiny", "sgd", "fastmup-cpu") in ran and ("gpt2-tiny", "sgd", "torch-fused") in ran
    assert ("gpt2-tiny", "esgd", "esgd-per-tensor-torch") in ran
    assert all(r["ms_samples"] and r["max_rel_err_vs_eager"] < 1e-5 for r in doc["rows"])
    skipped = {(s["model"], s["optimizer"], s["impl"]) for s in doc["skipped"]}
    assert ("gpt2-tiny", "esgd", "torch-fused") in skipped  # no torch ESGD-M: a reason, not a failure


def test_a_failing_case_is_recorded_and_the_others_run():
    """A set that does not exist fails in its own process; the next set runs."""
    plan = gpu_check.Plan(device="cpu", build="cpu", suites=(), models=("no-such-set", "gpt2-tiny"), optimizers=("sgd",),
                          impls=("torch-foreach",), bench_args=gpu_check.DRY_PLAN.bench_args)
    import time

    out = gpu_check.run_cases(plan, time.perf_counter() + 120)
    first, second = out["cases"]
    assert (first["model"], first["ok"]) == ("no-such-set", False)
    assert first["returncode"] not in (0, None) and "no-such-set" in first["output_tail"]
    assert (second["model"], second["ok"], second["rows"]) == ("gpt2-tiny", True, 1)
    assert [r["impl"] for r in out["rows"]] == ["torch-foreach"]
    assert any(s["model"] == "no-such-set" and "failed" in s["reason"] for s in out["skipped"])


def test_a_crash_loses_only_its_own_case(tmp_path, monkeypatch):
    """A benchmark process that dies after its first case: that case is
    kept, the one it died in is recorded, the last runs in a fresh process."""
    import time

    calls = []
    real = gpu_check.run_command

    def fake(cmd, timeout_s, env=None, cwd=gpu_check.ROOT):
        optimizers = cmd[cmd.index("--optimizers") + 1].split(",")
        calls.append(optimizers)
        if len(calls) > 1:
            return real(cmd, timeout_s, env, cwd)
        # first process: finishes "sgd", then dies in "adam"
        path = cmd[cmd.index("--json") + 1]
        one = list(cmd)
        one[one.index("--optimizers") + 1] = optimizers[0]
        result = real(one, timeout_s, env, cwd)
        doc = json.loads(open(path).read())
        doc["partial"] = True
        open(path, "w").write(json.dumps(doc))
        return gpu_check.CommandResult(-11, result.seconds, False, "Segmentation fault")

    monkeypatch.setattr(gpu_check, "run_command", fake)
    plan = gpu_check.Plan(device="cpu", build="cpu", suites=(), models=("gpt2-tiny",), optimizers=("sgd", "adam", "adamw"),
                          impls=("torch-foreach",), bench_args=gpu_check.DRY_PLAN.bench_args)
    out = gpu_check.run_cases(plan, time.perf_counter() + 300)
    assert calls == [["sgd", "adam", "adamw"], ["adamw"]]
    status = {c["optimizer"]: c["ok"] for c in out["cases"]}
    assert status == {"sgd": True, "adam": False, "adamw": True}
    assert {r["optimizer"] for r in out["rows"]} == {"sgd", "adamw"}


def test_an_overrunning_child_is_interrupted_and_then_killed(monkeypatch):
    r = gpu_check.run_command([sys.executable, "-c", "import time; time.sleep(60)"], timeout_s=1)
    assert r.timed_out and r.returncode != 0 and r.seconds < 15  # SIGINT ends a sleeping Python at once
    monkeypatch.setattr(gpu_check, "GRACE_S", 1.0)
    stubborn = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    r = gpu_check.run_command([sys.executable, "-c", stubborn], timeout_s=2)
    assert r.timed_out and r.returncode == -9 and r.seconds < 15 and "up" in r.output


def test_junit_counts(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(
        '<testsuites><testsuite tests="4">'
        '<testcase classname="t" name="ok"/>'
        '<testcase classname="t" name="bad"><failure message="assert 1 == 2"/></testcase>'
        '<testcase classname="t" name="broken"><error message="boom"/></testcase>'
        '<testcase classname="t" name="later"><skipped message="no GPU"/></testcase>'
        '<testcase time="0.0"/>'  # what an interrupt leaves of the test it stopped
        "</testsuite></testsuites>"
    )
    out = gpu_check.parse_junit(path)
    assert (out["tests"], out["passed"], out["failures"], out["errors"], out["skipped"]) == (4, 1, 1, 1, 1)
    assert [f["test"] for f in out["failed"]] == ["t::bad", "t::broken"]


def test_result_file_names(tmp_path):
    when = datetime.datetime(2027, 1, 2, tzinfo=datetime.timezone.utc)
    first = gpu_check.result_path(tmp_path, "NVIDIA H200", when, dry_run=False)
    assert first.name == "nvidia-h200-2027-01-02.json"
    first.write_text("{}")
    assert gpu_check.result_path(tmp_path, "NVIDIA H200", when, dry_run=False).name == "nvidia-h200-2027-01-02-2.json"
    assert gpu_check.result_path(tmp_path, "cpu", when, dry_run=True).name == "dry-run-cpu-2027-01-02.json"


def test_the_gpu_plan_names_what_exists():
    """The GPU run cannot be tried here: at least every set, optimizer,
    implementation and test path it names must exist."""
    from fastmup.bench import impls, models, optimizers

    for plan in (gpu_check.GPU_PLAN, gpu_check.DRY_PLAN):
        assert all(models.get(m) for m in plan.models)
        assert all(optimizers.get(o) for o in plan.optimizers)
        assert all(impls.get(i) for i in plan.impls)
        for suite in plan.suites:
            for arg in suite.args:
                if arg.startswith("tests"):
                    assert (gpu_check.ROOT / arg).exists(), arg
                elif arg.startswith("--ignore="):
                    assert (gpu_check.ROOT / arg.split("=", 1)[1]).exists(), arg
    assert {"gpt2-small", "gpt2-xl", "small-500"} <= set(gpu_check.GPU_PLAN.models)
    assert {"adam", "adamw", "sgd", "esgd"} <= set(gpu_check.GPU_PLAN.optimizers)
    assert {"fastmup-triton", "fastmup-cuda", "torch-fused", "torch-foreach"} <= set(gpu_check.GPU_PLAN.impls)
