"""``make gpu-check`` (``python -m fastmup.bench.gpu_check``): everything a GPU
machine can tell about fastmup, in one command and one JSON file.

On a CUDA machine with torch, triton, pybind11, ninja, pytest and nvcc
installed and no network, run from the source tree (``PYTHONPATH=.``):

1. **build** the ``cuda`` backend (``python -m fastmup.ext build cuda``);
2. **test**: the compiled Triton kernels against the eager reference
   (``tests/kernels`` with ``TRITON_INTERPRET=0``), the ``cuda`` backend
   against eager and bit for bit against the ``cpu`` backend, CUDA graph
   capture and AMP (``tests/ext/test_cuda_backend.py``), and every other test
   marked ``gpu``;
3. **benchmark** GPT-2 small, a GPT-2 XL-like set (1.56B) and 500 small
   tensors for μAdam, μAdamW, μSGD-M and μESGD-M: fastmup's Triton and CUDA
   backends against torch's fused and foreach optimizers under mup's param
   groups (ESGD-M: against the per-tensor torch loop), and the "clip + step"
   cases of μAdam and μAdamW (fastmup's deferred clip against
   ``torch.nn.utils.clip_grad_norm_(foreach=True)`` and torch's step);
4. **write** ``benchmarks/results/<device>-<date>.json``: the device, the
   versions, the commit, each phase's outcome and every timing.

Everything runs within ``--budget`` seconds (default 450: under 8 minutes
with start-up).  The build, each test suite and each parameter set's
benchmark cases run in a child process with a share of the time left; one
that overruns its share gets SIGINT (pytest and the benchmark then report
what they finished) and is killed ``GRACE_S`` later.  A failure is recorded
and the run goes on: a benchmark process that dies loses only the case it
was in (:func:`run_cases`).  The exit status is 0 when the build worked,
every suite passed and every case ran.

``--dry-run`` runs the same phases on the CPU with the tiny parameter sets
(the CPU backend instead of CUDA and Triton; suites that skip without a
GPU), which is how CI checks this script without a GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["Plan", "GPU_PLAN", "DRY_PLAN", "Suite", "main", "run_command", "run_suite", "run_cases", "parse_junit"]

ROOT = Path(__file__).resolve().parents[2]  # the source tree: fastmup/bench/gpu_check.py
GRACE_S = 20.0  # after SIGINT, time to report before the kill
TAIL = 3000  # characters of a failed child's output kept in the JSON


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    args: tuple[str, ...]  # pytest arguments
    weight: float = 1.0  # share of the test time
    env: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run does (the GPU run, or its CPU dry run)."""

    device: str
    build: str  # extension kind to build
    suites: tuple[Suite, ...]
    models: tuple[str, ...]
    optimizers: tuple[str, ...]
    impls: tuple[str, ...]
    bench_args: tuple[str, ...]  # passed to every `python -m fastmup.bench`
    model_weight: tuple[tuple[str, float], ...] = ()  # relative time of a case of this set (default 1)
    test_share: float = 0.4  # of the time left after the build


_GPU_SUITES = (
    Suite("triton-compiled", ("tests/kernels",), weight=2.0,
          env=(("TRITON_INTERPRET", "0"), ("FASTMUP_KERNEL_EXAMPLES", "10"))),
    Suite("cuda-backend", ("tests/ext/test_cuda_backend.py",), weight=1.5),
    Suite("gpu-marked", ("tests", "-m", "gpu", "--ignore=tests/kernels", "--ignore=tests/ext/test_cuda_backend.py"),
          weight=0.5, env=(("TRITON_INTERPRET", "0"),)),
)

GPU_PLAN = Plan(
    device="cuda",
    build="cuda",
    suites=_GPU_SUITES,
    models=("gpt2-small", "small-500", "gpt2-xl"),
    optimizers=("adam", "adamw", "sgd", "esgd", "adamw-clip", "adam-clip"),
    impls=("fastmup-triton", "fastmup-cuda", "torch-fused", "torch-foreach", "esgd-per-tensor-torch"),
    bench_args=("--steps", "50", "--warmup", "5", "--budget", "2", "--check-steps", "2", "--max-copies", "4"),
    model_weight=(("gpt2-xl", 3.0),),
)

DRY_PLAN = Plan(
    device="cpu",
    build="cpu",
    suites=(
        Suite("cuda-backend", ("tests/ext/test_cuda_backend.py",)),  # skips without a GPU: collection only
        Suite("shared-math", ("tests/ext/test_shared_math.py", "-k", "lerp")),  # a few real passes
    ),
    models=("gpt2-tiny",),
    optimizers=("sgd", "esgd", "adamw-clip"),
    impls=("fastmup-cpu", "torch-fused", "torch-foreach", "esgd-per-tensor-torch"),
    bench_args=("--steps", "3", "--warmup", "1", "--budget", "0.2", "--check-steps", "1", "--max-copies", "2",
                "--threads", "1"),
    test_share=0.5,
)


# ----------------------------------------------------------------------
# running children within a time limit
# ----------------------------------------------------------------------
@dataclasses.dataclass
class CommandResult:
    returncode: Optional[int]
    seconds: float
    timed_out: bool
    output: str  # stdout and stderr, interleaved

    def summary(self) -> dict:
        out = {"returncode": self.returncode, "seconds": round(self.seconds, 2), "timed_out": self.timed_out}
        if self.returncode != 0 or self.timed_out:
            out["output_tail"] = self.output[-TAIL:]
        return out


def run_command(cmd: Sequence[str], timeout_s: float, env: Optional[dict] = None, cwd: Path = ROOT) -> CommandResult:
    """Run ``cmd``; past ``timeout_s`` send SIGINT, and kill it GRACE_S later."""
    began = time.perf_counter()
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        timed_out = False
        try:
            proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.seek(0)
        output = log.read()
    return CommandResult(proc.returncode, time.perf_counter() - began, timed_out, output)


def child_env(extra: Sequence[tuple[str, str]] = ()) -> dict:
    """The environment of a child: this one, the source tree first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(dict(extra))
    return env


# ----------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------
def parse_junit(path: Path) -> dict:
    """Counts and the failing test ids of a pytest ``--junitxml`` file."""
    counts = {"tests": 0, "passed": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[dict] = []
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        if not case.get("name"):
            continue  # the test an interrupt cut short
        counts["tests"] += 1
        ident = f"{case.get('classname', '')}::{case.get('name')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
        else:
            counts["failures" if outcome.tag == "failure" else "errors"] += 1
            failed.append({"test": ident, "kind": outcome.tag, "message": (outcome.get("message") or "")[:500]})
    return {**counts, "failed": failed}


def run_suite(suite: Suite, timeout_s: float, python: str = sys.executable) -> dict:
    """One pytest run; its counts, failures and timing."""
    with tempfile.TemporaryDirectory(prefix="fastmup-gpu-check-") as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *suite.args]
        result = run_command(cmd, timeout_s, env=child_env(suite.env))
        out = {"suite": suite.name, "command": " ".join(cmd[1:]), **result.summary()}
        if junit.is_file():
            try:
                out.update(parse_junit(junit))
            except ET.ParseError as e:
                out["junit_error"] = str(e)
        # pytest: 0 all passed, 5 nothing collected (every test deselected)
        out["ok"] = result.returncode in (0, 5) and not result.timed_out and not out.get("failed")
        return out


# ----------------------------------------------------------------------
# benchmark cases
# ----------------------------------------------------------------------
def run_cases(plan: Plan, deadline: float, python: str = sys.executable) -> dict:
    """Every model × optimizer case; the rows, skips and notes of all of them
    and each case's outcome.  ``deadline``: a time.perf_counter() value.

    A parameter set's optimizers run in one benchmark process (one start-up
    instead of four), which saves its JSON after every case, given a share of
    the time left by the set's weight.  If that process dies, the case it was
    in is recorded as failed and the ones after it run in a fresh process; if
    it overruns, it is interrupted and the cases it did not finish are
    recorded as out of time.  So one failure loses at most its own case."""
    weights = dict(plan.model_weight)
    todo = {m: list(plan.optimizers) for m in plan.models}
    out: dict = {"cases": [], "rows": [], "skipped": [], "notes": [], "meta": {}}

    def give_up(model: str, optimizers: Sequence[str], reason: str, **facts) -> None:
        for o in optimizers:
            out["cases"].append({"model": model, "optimizer": o, "ok": False, "error": reason, **facts})
            out["skipped"] += [{"model": model, "optimizer": o, "impl": i, "reason": f"gpu-check: {reason}"} for i in plan.impls]

    with tempfile.TemporaryDirectory(prefix="fastmup-gpu-check-") as tmp:
        for model in plan.models:
            attempt = 0
            while todo[model]:
                left = deadline - time.perf_counter() - GRACE_S  # the last process may need its grace
                weight_left = sum(weights.get(m, 1.0) * len(opts) for m, opts in todo.items())
                share = left * weights.get(model, 1.0) * len(todo[model]) / weight_left
                if share < 5.0 * len(todo[model]):
                    give_up(model, todo[model], "no time left")
                    break
                attempt += 1
                path = Path(tmp) / f"{model}-{attempt}.json"
                # the benchmark paces its timing to about half the share; the rest
                # is start-up, building the input sets and the checked steps
                cmd = [python, "-m", "fastmup.bench", "--device", plan.device, "--models", model,
                       "--optimizers", ",".join(todo[model]), "--impls", ",".join(plan.impls), "--no-progress",
                       "--json", str(path), "--time-limit", f"{0.5 * share:.1f}", *plan.bench_args]
                result = run_command(cmd, share, env=child_env())
                doc = None
                if path.is_file():
                    try:
                        doc = json.loads(path.read_text())
                    except json.JSONDecodeError:
                        doc = None
                finished = [o for m, o in (doc or {}).get("finished_cases", []) if m == model]
                if doc is not None:
                    out["rows"] += doc.get("rows", [])
                    out["skipped"] += doc.get("skipped", [])
                    out["notes"] += [n for n in doc.get("notes", []) if n not in out["notes"]]
                    if not out["meta"]:
                        out["meta"] = {key: doc.get(key) for key in (
                            "device", "device_info", "versions", "git_commit", "copy_bandwidth_GBps",
                            "copy_bandwidth", "inplace_add_bandwidth_GBps", "config")}
                for o in finished:
                    rows = sum(1 for r in doc.get("rows", []) if r["model"] == model and r["optimizer"] == o)
                    out["cases"].append({"model": model, "optimizer": o, "ok": True, "rows": rows, "attempt": attempt,
                                         "process_seconds": round(result.seconds, 1)})
                rest = [o for o in todo[model] if o not in finished]
                todo[model] = rest
                if not rest:
                    break
                facts = {"attempt": attempt, **result.summary()}
                if result.timed_out:
                    give_up(model, rest, "out of time (interrupted)", **facts)
                    todo[model] = []
                else:  # it died in the first case it had not finished; the others get a fresh process
                    give_up(model, rest[:1], f"the benchmark process failed (exit {result.returncode})", **facts)
                    todo[model] = rest[1:]
    return out


# ----------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------
def _device_facts(plan: Plan) -> dict:
    import torch

    from fastmup.bench import environment

    facts = {"versions": environment.versions(), "git_commit": environment.git_commit()}
    if plan.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("gpu-check: no CUDA device (torch.cuda.is_available() is False); --dry-run runs on the CPU")
        facts["device_info"] = environment.device_info(torch.device("cuda", 0))
        facts["device"] = torch.cuda.get_device_name(0)
    else:
        facts["device_info"] = environment.device_info(torch.device("cpu"))
        facts["device"] = "cpu"
    from fastmup.ext import build

    nvcc = build.find_nvcc()
    facts["nvcc"] = None
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        facts["nvcc"] = out[-1] if out else nvcc
    return facts


def result_path(directory: Path, device: str, when: datetime.datetime, dry_run: bool) -> Path:
    """``<directory>/<device>-<date>.json``, the device in lower-case words
    ("nvidia-h200"); a second run of the day gets ``-2`` and so on."""
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "device"
    stem = f"{'dry-run-' if dry_run else ''}{slug}-{when.date().isoformat()}"
    path = directory / f"{stem}.json"
    n = 2
    while path.exists():
        path = directory / f"{stem}-{n}.json"
        n += 1
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastmup.bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the same phases on the CPU with tiny sets (no GPU needed)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 450; dry run 300)")
    p.add_argument("--out", type=Path, default=None,
                   help="directory of the JSON (default benchmarks/results; dry run: $TMPDIR/fastmup-gpu-check)")
    p.add_argument("--skip-tests", action="store_true", help="no test phase")
    p.add_argument("--skip-bench", action="store_true", help="no benchmark phase")
    args = p.parse_args(argv)
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    budget = args.budget if args.budget is not None else (300.0 if args.dry_run else 450.0)
    began = time.perf_counter()
    deadline = began + budget
    when = datetime.datetime.now(datetime.timezone.utc)

    facts = _device_facts(plan)
    print(f"gpu-check: {facts['device']}, budget {budget:.0f} s", flush=True)
    doc: dict = {
        "kind": "gpu-check" + (" dry run" if args.dry_run else ""),
        "device": facts["device"],
        "device_info": facts["device_info"],
        "versions": facts["versions"],
        "nvcc": facts["nvcc"],
        "git_commit": facts["git_commit"],
        "timestamp": when.isoformat(timespec="seconds"),
        "budget_s": budget,
        "plan": {"models": plan.models, "optimizers": plan.optimizers, "impls": plan.impls,
                 "bench_args": plan.bench_args, "suites": [s.name for s in plan.suites]},
    }

    # 1. build (children then load the cached module)
    reserve = 60.0 if not args.skip_bench else 10.0
    build_timeout = max(30.0, min(300.0, deadline - time.perf_counter() - reserve))
    print(f"gpu-check: building the {plan.build} backend", flush=True)
    build = run_command([sys.executable, "-m", "fastmup.ext", "build", plan.build], build_timeout, env=child_env())
    doc["build"] = {"kind": plan.build, "ok": build.returncode == 0, **build.summary()}
    if build.returncode == 0:
        doc["build"]["module"] = build.output.strip().splitlines()[-1] if build.output.strip() else None

    # 2. tests
    doc["tests"] = []
    if not args.skip_tests:
        left = deadline - time.perf_counter()
        test_time = left * (plan.test_share if not args.skip_bench else 1.0)
        test_deadline = time.perf_counter() + test_time
        for k, suite in enumerate(plan.suites):
            weight_left = sum(s.weight for s in plan.suites[k:])
            share = (test_deadline - time.perf_counter() - GRACE_S) * suite.weight / weight_left
            print(f"gpu-check: tests {suite.name} ({share:.0f} s)", flush=True)
            outcome = run_suite(suite, share)
            doc["tests"].append(outcome)
            print(f"gpu-check:   {outcome.get('passed', 0)} passed, {outcome.get('failures', 0)} failed, "
                  f"{outcome.get('errors', 0)} errors, {outcome.get('skipped', 0)} skipped"
                  f"{', TIMED OUT' if outcome['timed_out'] else ''} in {outcome['seconds']:.0f} s", flush=True)

    # 3. benchmark cases
    doc.update(rows=[], skipped=[], notes=[], bench={"cases": []})
    if not args.skip_bench:
        print(f"gpu-check: benchmarks ({deadline - time.perf_counter():.0f} s left)", flush=True)
        bench = run_cases(plan, deadline - 5.0)
        doc["bench"] = {"cases": bench["cases"], **{k: v for k, v in bench["meta"].items() if k not in doc}}
        doc["rows"], doc["skipped"], doc["notes"] = bench["rows"], bench["skipped"], bench["notes"]
        for c in bench["cases"]:
            print(f"gpu-check:   {c['model']} {c['optimizer']}: "
                  f"{'ok, %d rows' % c['rows'] if c['ok'] else 'FAILED: ' + c['error']}", flush=True)

    ok = doc["build"]["ok"] and all(t["ok"] for t in doc["tests"]) and all(c["ok"] for c in doc["bench"]["cases"])
    doc["ok"] = ok
    doc["wall_s"] = round(time.perf_counter() - began, 1)
    from fastmup.bench import report

    if args.out is not None:
        out_dir = args.out
    else:  # a dry run's figures are not results
        out_dir = Path(tempfile.gettempdir()) / "fastmup-gpu-check" if args.dry_run else ROOT / "benchmarks" / "results"
    path = result_path(out_dir, doc["device"], when, args.dry_run)
    report.write_json(str(path), doc)
    if doc["rows"]:
        report.print_table(doc["rows"], title=f"optimizer step ({doc['device']})")
    print(f"gpu-check: {'all passed' if ok else 'FAILURES (see the JSON)'} in {doc['wall_s']:.0f} s; wrote {path}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
