"""The Triton kernels, compiled for sm_80 and sm_90 as a GPU would compile them, meet the code targets.

No GPU is needed: ``fastmup.inspect`` runs the optimizers' launchers on CPU
tensors, compiles every kernel launch they make ahead of time and reads the
SASS and PTX.  It runs in a subprocess, because this test process imports
the kernels under Triton's interpreter.  The variants are a representative
set (below): every algorithm and kernel at its defaults for each param
dtype, mixed param and state dtypes both ways, and every option and AMP
flag on at once, with aligned and with misaligned buffers, and the deferred
clip on the heaviest kernel it reaches (no setting drives it).  Compiled kernels
are cached by Triton (``TRITON_CACHE_DIR``), their analyses by the tool
(``FASTMUP_INSPECT_CACHE``): a warm rerun takes seconds.

The targets (docs/compiled_kernels.md):

* every variant compiles for both targets, without register spills;
* aligned full tiles move every stream with 128-bit accesses (and exactly
  the bytes the variant's streams need);
* no shared-memory access or barrier in the main loop;
* instruction issue needed at an H200's 4.8 TB/s: at most 60% for the
  default settings, 80% for every variant;
* no floating-point contraction: the FMAs are those the source writes
  (``tl.fma``), and bf16/fp16 stores round to nearest even.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

pytest.importorskip("triton")

from fastmup.inspect import toolchain  # noqa: E402
from fastmup.inspect.triton_kernels import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ISSUE = 0.60
MAX_ISSUE = 0.80

S = Settings
ALL_ON = dict(option=True, amp="scale+found_inf")
SETTINGS = [
    # Adam: each dtype, fp32 state for bf16 params, then amsgrad + AMP
    S("adam", "fp32", "fp32"), S("adam", "bf16", "bf16"), S("adam", "fp16", "fp16"), S("adam", "bf16", "fp32"),
    S("adam", "bf16", "bf16", **ALL_ON), S("adam", "bf16", "fp32", **ALL_ON, aligned=False),
    # SGD with and without momentum, bf16 state for fp32 params, then momentum + AMP
    S("sgd", "bf16", "bf16"), S("sgd", "fp32", "fp32", option=True), S("sgd", "bf16", "bf16", option=True),
    S("sgd", "bf16", "fp32", option=True), S("sgd", "fp32", "bf16", option=True),
    S("sgd", "bf16", "bf16", **ALL_ON), S("sgd", "bf16", "fp32", **ALL_ON, aligned=False),
    # bf16 parameter storage modes (stochastic rounding, fp32 masters, remainders), fp16 stochastic rounding
    # (Adam's also misaligned: the fewest bytes per element for its hash and rounding), then with everything
    # on (fp16 stochastic rounding misaligned: the heaviest; with a deferred clip: below).
    S("adam", "bf16", "bf16", storage="stochastic"), S("adam", "bf16", "bf16", storage="master"),
    S("adam", "bf16", "bf16", storage="remainder"), S("sgd", "bf16", "bf16", option=True, storage="stochastic"),
    S("adam", "fp16", "fp16", storage="stochastic"), S("sgd", "fp16", "fp16", option=True, storage="stochastic"),
    S("adam", "fp16", "fp16", storage="stochastic", aligned=False), S("adam", "bf16", "bf16", storage="stochastic", aligned=False),
    S("sgd", "bf16", "fp32", option=True, storage="master"), S("sgd", "bf16", "bf16", option=True, storage="remainder"),
    S("adam", "bf16", "bf16", **ALL_ON, storage="remainder", aligned=False),
    S("adam", "fp16", "fp16", **ALL_ON, storage="stochastic", aligned=False),
    S("sgd", "fp16", "fp16", **ALL_ON, storage="stochastic", aligned=False),
    # stochastic rounding with AMP but without amsgrad or momentum (three streams for SGD: the fewest bytes
    # per element for the hash, the rounding and the division by a grad_scale without an exact reciprocal;
    # fp16 on misaligned buffers the heaviest of all)
    S("adam", "bf16", "bf16", amp="scale+found_inf", storage="stochastic", aligned=False),
    S("adam", "fp16", "fp16", amp="scale+found_inf", storage="stochastic", aligned=False),
    S("sgd", "bf16", "bf16", amp="scale+found_inf", storage="stochastic", aligned=False),
    S("sgd", "fp16", "fp16", amp="scale+found_inf", storage="stochastic", aligned=False),
    S("sgd", "fp16", "fp16", amp="scale+found_inf", storage="stochastic"),
    # ESGD-M plain and HVP steps (the latter draw the probes: one probe kernel per dtype)
    S("esgd", "fp32", "fp32"), S("esgd", "bf16", "bf16"), S("esgd", "bf16", "fp32"),
    S("esgd", "fp32", "fp32", option=True), S("esgd", "bf16", "bf16", option=True), S("esgd", "fp16", "fp16", option=True),
    S("esgd", "bf16", "fp32", option=True),
    S("esgd", "bf16", "bf16", **ALL_ON), S("esgd", "bf16", "fp32", **ALL_ON, aligned=False),
]

_SCRIPT = """
import json, sys
from fastmup.inspect import triton_kernels as tk
settings = [tk.Settings(**s) for s in json.load(sys.stdin)]
records = tk.inspect_all(settings, jobs=int(sys.argv[1]))
# The deferred clip, which no setting drives, on the heaviest kernel it reaches: Adam
# with fp16 stochastic rounding.
from fastmup.inspect.records import label
clipped = [v for v in tk.variants([tk.Settings("adam", "fp16", "fp16", storage="stochastic")]) if v.launch.module == "adam"][0]
for arch in (80, 90):
    r = tk.inspect(clipped, arch, HAS_CLIP=True)
    r["variant"]["has_clip"] = True
    r["label"] = label(r["variant"])
    records.append(r)
# A control: the same Adam kernel with Triton's default contraction on.
adam = [v for v in tk.variants([tk.Settings("adam", "bf16", "bf16")]) if v.launch.module == "adam"][0]
fused = tk.inspect(adam, 90, enable_fp_fusion=True)
print(json.dumps({"records": records, "fused": fused}))
"""


@pytest.fixture(scope="module")
def inspection():
    try:
        toolchain.cuobjdump()
    except toolchain.ToolError as e:
        pytest.skip(str(e))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    jobs = str(max(1, min(2, os.cpu_count() or 1)))
    r = subprocess.run(
        [sys.executable, "-c", _SCRIPT, jobs], input=json.dumps([asdict(s) for s in SETTINGS]),
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def records(inspection):
    return inspection["records"]


def _name(r: dict) -> str:
    return f"{r['kernel']} {r['label']} sm_{r['arch']}"


def _check(records, bad, what: str) -> None:
    failures = [f"{_name(r)}: {why}" for r in records for why in [bad(r)] if why]
    assert not failures, f"{what}:\n" + "\n".join(failures)


def test_every_variant_compiles_for_both_targets(records):
    kernels = {}
    for r in records:
        kernels.setdefault((r["kernel"], r["label"]), set()).add(r["arch"])
    assert {k for k, _ in kernels} == {"adam", "sgd", "esgd", "rademacher"}
    assert all(archs == {80, 90} for archs in kernels.values()), kernels
    assert len(kernels) >= len(SETTINGS)  # the HVP settings add probe kernels, none collapse
    assert all(r["loop"] is not None for r in records), [_name(r) for r in records if r["loop"] is None]


def test_no_register_spills(records):
    _check(records, lambda r: r["spill_instructions"] and f"{r['spill_instructions']} LDL/STL, {r['stack_bytes']} B stack",
           "register spills")


def test_aligned_full_tiles_use_128_bit_accesses_for_every_stream(records):
    def bad(r):
        if not r["variant"].get("aligned", True):
            return None
        loop = r["loop"]
        if loop["loads_narrow"] or loop["stores_narrow"]:
            return f"{loop['loads_narrow']} narrow loads, {loop['stores_narrow']} narrow stores"
        if r["bytes_per_element"] != r["expected_bytes_per_element"]:
            return f"moves {r['bytes_per_element']} B/element, its streams need {r['expected_bytes_per_element']}"
        return None

    _check(records, bad, "aligned main loops with narrow accesses")
    assert any(not r["variant"].get("aligned", True) for r in records)  # the misaligned path is compiled too


def test_no_shared_memory_staging_or_barriers_in_the_main_loop(records):
    _check(records, lambda r: (r["loop"]["shared"] or r["loop"]["barriers"])
           and f"{r['loop']['shared']} shared accesses, {r['loop']['barriers']} barriers", "shared memory in the main loop")


def test_instruction_issue_at_h200_bandwidth(records):
    """The estimate of fastmup.inspect.targets: the fraction of an H200's
    instruction issue that the main loop needs at 4.8 TB/s."""

    def bad(r):
        limit = DEFAULT_ISSUE if r["default"] else MAX_ISSUE
        h200 = r["issue"]["H200"]
        return h200 > limit and f"{h200:.0%} of issue at H200 bandwidth (limit {limit:.0%}; {r['instructions_per_element']:.1f} instr/element)"

    _check(records, bad, "instruction-bound variants")
    assert sum(r["default"] for r in records) >= 20


def test_fmas_are_the_ones_the_source_writes(records, inspection):
    """Compiled with the launchers' options, a kernel has exactly the FMAs of
    the same kernel compiled with contraction off, in PTX and in SASS, and
    no multiply or add that ptxas could fuse; with Triton's default
    (contraction on) the Adam kernel would have more."""
    _check(records, lambda r: r["options"].get("enable_fp_fusion") is not False and f"options {r['options']}",
           "launches that leave contraction on")
    _check(records, lambda r: (r["fma"]["ptx"] != r["fma"]["ptx_uncontracted"] or r["fma"]["sass"] != r["fma"]["sass_uncontracted"]
                               or r["fma"]["contractible"]) and f"FMAs {r['fma']}", "contracted multiply-adds")
    fused = inspection["fused"]["fma"]
    assert fused["ptx"] > fused["ptx_uncontracted"] and fused["sass"] > fused["sass_uncontracted"], fused


def test_narrow_stores_round_to_nearest_even(records):
    """Every fp32 -> bf16/fp16 conversion in the PTX is a round-to-nearest-even
    one (compiled kernels use the GPU's conversion; the interpreter tests
    check the bit-exact rounding of the same values)."""
    _check(records, lambda r: any(".rn." not in op for op in r["ptx_narrowing"]) and f"{r['ptx_narrowing']}",
           "conversions that do not round to nearest even")
    # (a parameter storage mode writes the bf16 parameter from its bits: then only bf16 state converts,
    # where the kernel writes state: SGD without momentum has none)
    def converts_bf16(r):
        writes_state = any(s["writes"] for s in r["streams"] if s["name"] not in ("param", "grad"))
        if "storage" in r["variant"]:
            return r["variant"]["state"] == "bf16" and writes_state
        return "bf16" in (r["variant"]["param"], r["variant"]["state"] if writes_state else None)

    low = [r for r in records if r["kernel"] != "rademacher" and converts_bf16(r)]
    assert low and all(any(op.startswith("cvt.rn.bf16") for op in r["ptx_narrowing"]) for r in low)
