"""fastmup.inspect.sass / records / targets / report on hand-written listings."""
from __future__ import annotations

import pytest

from fastmup.inspect import records, report, sass, targets

# One function: a prologue, a loop whose iteration has a fast path and an
# out-of-line slow path (a CALL, as ptxas emits for IEEE division), a
# second loop nested inside an outer one, and the end-of-function self-loop.
LISTING = """
	code for sm_90
		Function : kernel
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                       /* 0x00000a00ff017b82 */
                                                                                /* 0x000fe20000000800 */
        /*0010*/                   ISETP.GE.AND P0, PT, R2, R3, PT ;            /* 0x0000000302007c0c */
        /*0020*/               @P0 EXIT ;                                       /* 0x000000000000094d */
        /*0030*/                   LDG.E.128 R4, desc[UR4][R8.64] ;             /* 0x0000000408047981 */
        /*0040*/                   LDG.E.U16 R9, desc[UR4][R10.64] ;            /* 0x0000000408047981 */
        /*0050*/              @!P1 BRA 0x90 ;                                   /* 0x0000000000108947 */
        /*0060*/                   MOV R0, 0x80 ;                               /* 0x0000000000108947 */
        /*0070*/                   CALL.REL.NOINC 0x300 ;                       /* 0x0000000000108947 */
        /*0080*/                   BRA 0xb0 ;                                   /* 0x0000000000108947 */
        /*0090*/                   FFMA R4, R4, R5, R6 ;                        /* 0x0000000000108947 */
        /*00a0*/              @P3 CALL.REL.NOINC 0x300 ;                        /* 0x0000000000108947 */
        /*00b0*/                   STG.E.128 desc[UR4][R8.64], R4 ;             /* 0x0000000000108947 */
        /*00c0*/                   STL [R1], R4 ;                               /* 0x0000000000108947 */
        /*00d0*/               @P2 BRA 0x30 ;                                   /* 0x0000000000108947 */
        /*00e0*/                   IADD3 R2, R2, 0x1, RZ ;                      /* 0x0000000000108947 */
        /*00f0*/                   LDS R7, [R3] ;                               /* 0x0000000000108947 */
        /*0100*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;                /* 0x0000000000108947 */
        /*0110*/               @P4 LDG.E.64 R6, desc[UR4][R8.64] ;              /* 0x0000000000108947 */
        /*0120*/                   DFMA R6, R6, R6, R6 ;                        /* 0x0000000000108947 */
        /*0130*/              @P5 BRA 0xf0 ;                                    /* 0x0000000000108947 */
        /*0140*/                   STG.E desc[UR4][R8.64], R7 ;                 /* 0x0000000000108947 */
        /*0150*/              @P6 BRA 0xe0 ;                                    /* 0x0000000000108947 */
        /*0160*/                   EXIT ;                                       /* 0x0000000000108947 */
        /*0170*/                   BRA 0x170 ;                                  /* 0x0000000000108947 */
        /*0300*/                   MUFU.RCP R0, R0 ;                            /* 0x0000000000108947 */
        /*0310*/                   RET.REL.NODEC R20 0x0 ;                      /* 0x0000000000108947 */
"""


@pytest.fixture(scope="module")
def function():
    (fn,) = sass.parse_sass(LISTING)
    return fn


def test_parse(function):
    assert function.name == "kernel"
    assert len(function.instructions) == 26
    assert function.instructions[2].predicated and function.instructions[2].base == "EXIT"
    widths = {i.address: i.global_width for i in function.instructions if i.global_width}
    assert widths == {0x30: 16, 0x40: 2, 0xB0: 16, 0x110: 8, 0x140: 4}
    assert function.spill_instructions == 1
    assert function.fma == 2  # FFMA and DFMA


def test_loops(function):
    """Innermost loops only, in address order; the longest warm path skips
    the block that always calls the slow path, not the predicated CALL."""
    first, second = sass.analyse(function)
    assert first.header == 0x30
    # 0x30-0x50 (3) + 0x90-0xa0 (2) + 0xb0-0xd0 (3)
    assert first.instructions == 8
    assert (first.loads_128, first.stores_128, first.loads_narrow, first.stores_narrow) == (1, 1, 1, 0)
    assert first.bytes == 16 + 2 + 16 and first.predicated == 0
    assert (first.shared, first.barriers) == (0, 0)
    # the loop at 0xf0 is nested in the one at 0xe0: only it is reported
    assert second.header == 0xF0
    assert second.instructions == 5
    assert (second.shared, second.barriers, second.loads_narrow, second.predicated) == (1, 1, 1, 1)
    loops = [first.to_dict(), second.to_dict()]
    # 2 elements of 17 bytes per copy: the first is a full-tile loop; the
    # second, masked throughout, is not; with other streams, neither
    assert records.main_loop(loops, 2, 17.0) == 0 and records.main_loop(loops, 3, 17.0) == 0
    assert records.main_loop(loops[1:], 2, 4.0) == 0  # no full-tile loop: the first


# An inner loop left through a predicated CALL to the convergence point that
# a branch also reaches (as ptxas may emit), inside an outer loop.
JUMP_CALL_LISTING = """
		Function : jumps
        /*0000*/                   LDG.E R0, desc[UR4][R2.64] ;
        /*0010*/               @P0 BRA 0x60 ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R8.64] ;
        /*0030*/                   STG.E.128 desc[UR4][R8.64], R4 ;
        /*0040*/               @P1 CALL.REL.NOINC 0x60 ;
        /*0050*/                   BRA 0x20 ;
        /*0060*/                   STG.E desc[UR4][R2.64], R0 ;
        /*0070*/               @P2 BRA 0x0 ;
        /*0080*/                   EXIT ;
"""


def test_a_predicated_call_to_a_branch_target_is_a_jump():
    """The CALL is the inner loop's exit edge, so the outer loop contains it
    (only the inner loop is reported); a call to a subroutine stays one."""
    (fn,) = sass.parse_sass(JUMP_CALL_LISTING)
    assert sass._jump_targets(fn.instructions) == {0x40: 0x60}
    (inner,) = sass.analyse(fn)
    assert inner.header == 0x20 and inner.instructions == 4 and inner.bytes == 32
    (plain,) = sass.parse_sass(LISTING)
    assert sass._jump_targets(plain.instructions) == {}


def test_main_loop_is_the_heaviest_full_tile_version():
    """Versions of the full-tile loop (2 copies unrolled, or one; fewer or
    more instructions per element), a masked tail and a loop moving other
    bytes: the heaviest version per element is reported."""
    def loop(instructions, nbytes, predicated=0):
        return dict(instructions=instructions, bytes=nbytes, predicated=predicated, loads_128=2, stores_128=1,
                    loads_narrow=0, stores_narrow=0)

    loops = [loop(100, 96), loop(150, 48), loop(190, 96), loop(300, 48, predicated=3), loop(10, 24)]
    assert records.main_loop(loops, 8, 6.0) == 1  # 150 / 8 > 190 / 16 > 100 / 16


def test_ptx_counts():
    ptx = """
.visible .entry a(
{
	fma.rn.f32 	%r1, %r2, %r3, %r4;
	@%p1 fma.rn.ftz.f32 	%r1, %r2, %r3, %r4;
	mad.rn.f64 	%fd1, %fd2, %fd3, %fd4;
	fma.rn.f16 	%h1, %h2, %h3, %h4;
	mad.lo.s32 	%r1, %r2, %r3, %r4;
	mul.f32 	%r1, %r2, %r3;
}
.visible .entry b(
{
	fma.rn.f32 	%r1, %r2, %r3, %r4;
}
"""
    assert sass.ptx_fma_count(ptx) == 4
    assert sass.ptx_contractible_count(ptx) == 1  # mul.f32; mul.rn.f32 would not be
    parts = sass.ptx_functions(ptx)
    assert sorted(parts) == ["a", "b"] and sass.ptx_fma_count(parts["b"]) == 1


def test_issue_fraction():
    """82 instructions per element at 14 bytes per element (bf16 Adam):
    about 84% of an H200's issue rate, 59% of an H100's."""
    h100, h200 = targets.GPUS
    assert targets.issue_fraction(h200, 82, 14) == pytest.approx(0.84, abs=0.005)
    assert targets.issue_fraction(h100, 82, 14) == pytest.approx(0.59, abs=0.005)


def _facts(loop_bytes: int, instructions: int) -> dict:
    loop = dict(header=0, instructions=instructions, loads_128=4, stores_128=3, loads_narrow=0, stores_narrow=0,
                shared=0, barriers=0, bytes=loop_bytes, bytes_all=loop_bytes, predicated=0)
    return dict(function="k", registers=40, stack_bytes=0, static_shared=0, local_bytes=0, spill_instructions=0,
                fma=0, loops=[loop])


def _record(loop_bytes: int, instructions: int, **variant) -> dict:
    streams = [records.Stream("param", 2, 1, 1), records.Stream("grad", 2, 1, 0)]
    return records.make_record(
        source="triton", kernel="sgd", function="k", arch=90, variant=dict(param="bf16", grad="bf16", state="bf16", **variant),
        facts=_facts(loop_bytes, instructions), shared_bytes=0, elements_per_iteration=8, streams=streams,
        default=True, fma=dict(ptx=1, ptx_uncontracted=1, contractible=0, sass=1, sass_uncontracted=1), options={}, compiler="x",
    )


def test_record_infers_unrolling():
    """Bytes per element come from the loop; a loop moving 4 copies' worth
    of bytes is unrolled 4 times."""
    one = _record(48, 40)
    assert (one["unroll"], one["elements_per_iteration"]) == (1, 8)
    assert one["instructions_per_element"] == 5 and one["bytes_per_element"] == 6 == one["expected_bytes_per_element"]
    four = _record(4 * 48, 100)
    assert (four["unroll"], four["elements_per_iteration"], four["instructions_per_element"]) == (4, 32, 100 / 32)
    assert four["issue"]["H200"] == pytest.approx(targets.issue_fraction(targets.GPUS[1], 100 / 32, 6))


def test_table_and_worst():
    light, heavy = _record(48, 40), _record(48, 200, has_scale=True)
    assert heavy["label"] == "bf16/bf16/bf16 has_scale"
    assert report.worst([light, heavy]) == [heavy]
    text = report.table([light, heavy])
    lines = text.splitlines()
    assert lines[0].split() == [h for h, _ in report.COLUMNS] and len(lines) == 4
    md = report.table([light], markdown=True).splitlines()
    assert md[0].startswith("| source |") and md[1].startswith("|---|") and md[2].count("|") == len(report.COLUMNS) + 1
