"""The CUDA kernels of csrc/, compiled with nvcc for sm_80 and sm_90, against the code targets.

The same targets as the Triton kernels (tests/inspect/test_compiled_triton.py,
docs/compiled_kernels.md), read off the records of
:func:`fastmup.inspect.csrc.inspect_csrc`: one record per kernel
instantiation (``G == P``), loop and architecture, where the loops are each
variant's 16-byte vector loop (``aligned``) and its scalar loops; the
variants (:data:`fastmup.inspect.csrc.VARIANTS`) are the state masks, the
two ways of unscaling the gradient and ESGD-M's two rules; each has a scalar
loop with the deferred clip coefficient and one without.  ``default``:
aligned, no loss-scale division, ESGD-M's EMA rule and for Adam no amsgrad.
"""
from __future__ import annotations

import json
from collections import Counter

import pytest

from fastmup.ext import build
from fastmup.inspect import csrc, toolchain

DEFAULT_ISSUE = 0.60
MAX_ISSUE = 0.80


@pytest.fixture(scope="module")
def records():
    if build.find_nvcc() is None:
        pytest.skip("nvcc is not installed: the CUDA sources cannot be compiled here")
    try:
        return csrc.inspect_csrc()
    except toolchain.ToolError as e:
        if "not found" in str(e):
            pytest.skip(str(e))
        raise


def _name(r: dict) -> str:
    return f"{r['kernel']} {r['label']} sm_{r['arch']}"


def _check(records, bad, what: str) -> None:
    failures = [f"{_name(r)}: {why}" for r in records for why in [bad(r)] if why]
    assert not failures, f"{what} ({len(failures)}):\n" + "\n".join(failures)


def test_every_kernel_compiles_for_both_targets(records):
    """Every (param, state) dtype pair of every algorithm, and every
    parameter storage mode compiled for it (csrc.STORAGE_KERNELS), has, on
    both architectures, a vector loop and two scalar loops (with and without
    the deferred clip) of each of its variants, each found once in the SASS."""
    found = {}
    for r in records:
        v = r["variant"]
        flags = (v["mask"], v["divide"], v.get("max_rule", False), v.get("clip"))
        found.setdefault((r["kernel"], v["param"], v["state"], v.get("storage", "nearest")), []).append((r["arch"], flags, v["aligned"]))
    # 3 algorithms x 9 (param, state) dtype pairs, then the storage modes of each 16-bit param and state dtype
    storage = {(spec[0], param, state, mode) for op, spec in csrc.OPS.items() for param, modes in csrc.STORAGE_KERNELS[op].items()
               for mode in modes for state in ("fp32", "bf16", "fp16")}
    assert len(storage) == 2 * 3 * (3 + 2)  # Adam and SGD: bf16 stochastic rounding, masters and remainders; fp16 the first two
    assert len(found) == 27 + len(storage) and storage <= set(found)
    for (kernel, _, _, _), loops in found.items():
        (op,) = [op for op, spec in csrc.OPS.items() if spec[0] == kernel]
        every = [(arch, (x.mask, x.divide, x.max_rule, clip), aligned) for arch in (80, 90) for x in csrc.VARIANTS[op]
                 for aligned, clip in ((True, None), (False, False), (False, True))]
        assert Counter(loops) == Counter(every), (kernel, set(every) ^ set(loops))
    assert sum(len(csrc.VARIANTS[op]) for op in csrc.OPS) == 4 + 4 + 6


def test_no_register_spills(records):
    _check(records, lambda r: r["spill_instructions"] and f"{r['spill_instructions']} LDL/STL", "register spills")


def test_vector_loops_use_128_bit_accesses_for_every_stream(records):
    def bad(r):
        loop = r["loop"]
        if r["variant"]["aligned"] and (loop["loads_narrow"] or loop["stores_narrow"]):
            return f"{loop['loads_narrow']} narrow loads, {loop['stores_narrow']} narrow stores"
        if r["bytes_per_element"] != r["expected_bytes_per_element"]:
            return f"moves {r['bytes_per_element']} B/element, its streams need {r['expected_bytes_per_element']}"
        return None

    _check(records, bad, "loops moving more than their streams, or narrowly")


def test_no_shared_memory_staging_or_barriers_in_the_loops(records):
    _check(records, lambda r: (r["loop"]["shared"] or r["loop"]["barriers"])
           and f"{r['loop']['shared']} shared accesses, {r['loop']['barriers']} barriers", "shared memory in a loop")


def _issue_over_budget(r: dict):
    limit = DEFAULT_ISSUE if r["default"] else MAX_ISSUE
    h200 = r["issue"]["H200"]
    return h200 > limit and f"{h200:.0%} (limit {limit:.0%}; {r['instructions_per_element']:.1f} instr/element)"


def test_instruction_issue_at_h200_bandwidth(records):
    _check(records, _issue_over_budget, "instruction-bound loops")


def test_fmas_are_the_ones_the_source_writes(records):
    """No multiply or add is left for ptxas to fuse (each has a rounding
    modifier), and the PTX FMAs are exactly those of the PTX compiled with
    --fmad=false.  The extension build passes --fmad=false itself (then the
    two compiles are one): without it the first count fails."""
    _check(records, lambda r: (r["fma"]["ptx"] != r["fma"]["ptx_uncontracted"] or r["fma"]["contractible"])
           and f"FMAs {r['fma']}", "contracted multiply-adds")
    assert all("--fmad=false" in r["options"]["nvcc"].split() for r in records)


def test_the_command_line_prints_and_writes_the_records(records, tmp_path, capsys):
    """``python -m fastmup.inspect`` on the csrc kernels (compiled by the
    fixture above, so from the cache): the table, its Markdown form, the
    heaviest variant per dtype signature, and the JSON records."""
    from fastmup.inspect.__main__ import main
    from fastmup.inspect.report import COLUMNS

    out = tmp_path / "records.json"
    assert main(["--source", "csrc", "--kernel", "sgd", "--arch", "90", "--dtype", "bf16", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    written = json.loads(out.read_text())
    assert lines[0].split() == [h for h, _ in COLUMNS] and len(lines) == 2 + len(written)
    assert written and all(r["kernel"] == "sgd" and r["arch"] == 90 and r["variant"]["param"] == "bf16" for r in written)
    # three state dtypes; two masks, each unscaled two ways; a vector loop and two scalar ones (with and without the
    # deferred clip); to nearest, stochastic rounding, fp32 masters, remainders
    assert len(written) == 3 * 4 * 3 * 4
    main(["--source", "csrc", "--kernel", "sgd", "--arch", "90", "--dtype", "bf16", "--worst", "--markdown"])
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| source |") and len(md) == 2 + 3
