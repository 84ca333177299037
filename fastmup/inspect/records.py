"""The record of one compiled kernel variant: what the table and the checks read.

A record is a JSON-able dict, one per kernel variant and architecture, the
same for Triton kernels and ``csrc/`` kernels:

===========================  ===============================================
``source``                   ``"triton"`` or ``"csrc"``
``kernel``                   the algorithm: ``adam``, ``sgd``, ``esgd``, ``rademacher``
``function``                 the function's name in the binary (mangled for C++)
``arch``                     compute capability (80, 90)
``variant``                  what the variant specialises on: ``param``,
                             ``grad``, ``state`` (or ``out``) dtypes and flags
                             (Triton: the kernel's boolean constexprs; csrc:
                             ``mask`` = ``base``/``full`` and ``aligned``)
``label``                    the same in a few words
``default``                  the algorithm's default settings (no amsgrad, no
                             AMP, aligned buffers)
``registers``                registers per thread
``stack_bytes``              stack frame per thread
``spill_instructions``       ``LDL``/``STL`` in the whole function
``shared_bytes``             shared memory per block (Triton: what the launch
                             asks for; csrc: static)
``loop``                     the main loop (:class:`fastmup.inspect.sass.Loop`
                             as a dict, counts per thread and iteration), or None
``loops``                    how many innermost loops touch global memory
``elements_per_iteration``   elements a thread handles per iteration of ``loop``
``unroll``                   copies of the loop body per iteration (a compiler
                             may unroll): inferred as the loop's bytes over
                             those of one copy
``instructions_per_element`` ``loop.instructions / elements_per_iteration``
``bytes_per_element``        ``loop.bytes / elements_per_iteration``
``expected_bytes_per_element`` the same from the variant's streams (:class:`Stream`)
``streams``                  the arrays it moves: name, bytes, reads, writes
``issue``                    ``{"H100": f, "H200": f}``: fraction of the chip's
                             instruction issue the loop needs at HBM bandwidth
                             (:mod:`fastmup.inspect.targets`)
``fma``                      ``ptx``/``sass``: fp32+fp64 FMAs of the function;
                             ``*_uncontracted``: the same compiled with
                             contraction off (csrc: PTX only).  Equal, and
                             ``contractible`` (PTX mul/add/sub without a
                             rounding modifier, which ptxas may fuse) 0:
                             every FMA is one the source writes.
``options``                  Triton: the launch options; csrc: the nvcc flags
``compiler``                 e.g. ``"triton 3.6.0 (ptxas 12.8)"``, ``"nvcc 13.0"``
``ptx_narrowing``            Triton only: fp32 -> bf16/fp16 conversions in the
                             PTX, by instruction (``cvt.rn.bf16x2.f32``: n)
===========================  ===============================================

For Triton kernels the main loop is the heaviest version of the unmasked
full-tile loop (:func:`main_loop`), one copy of whose body handles
``TILE / (32 · num_warps)`` elements per thread.  For csrc kernels each
record is one loop of the kernel function, one copy handling a vector's
worth of elements (see :mod:`fastmup.inspect.csrc`).
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import multiprocessing
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import sass, targets

__all__ = ["SCHEMA_VERSION", "analysis_key", "Stream", "binary_facts", "make_record", "label", "main_loop", "parallel_map"]

#: bumped when a record's fields or their meaning change
SCHEMA_VERSION = "2"


@functools.lru_cache(maxsize=None)
def analysis_key() -> str:
    """Keys the analysis cache: the schema and the code that reads binaries."""
    h = hashlib.sha256(SCHEMA_VERSION.encode())
    for module in (sass, sys.modules[__name__]):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Stream:
    """An array a kernel moves: ``bytes`` per element, read and/or written (0/1)."""

    name: str
    bytes: int
    reads: int
    writes: int


def binary_facts(fn: sass.Function, usage: dict) -> dict:
    """What the SASS of one function and its resource usage say."""
    return dict(
        function=fn.name,
        registers=int(usage.get("REG", 0)),
        stack_bytes=int(usage.get("STACK", 0)),
        static_shared=int(usage.get("SHARED", 0)),
        local_bytes=int(usage.get("LOCAL", 0)),
        spill_instructions=fn.spill_instructions,
        fma=fn.fma,
        loops=sass.loops_to_dicts(sass.analyse(fn)),
    )


def label(variant: dict) -> str:
    dtypes = "/".join(variant[k] for k in ("param", "grad", "state", "out") if k in variant)
    flags = [k for k, v in variant.items() if v is True and k != "aligned"]
    if variant.get("aligned") is False:
        flags.append("unaligned")
    if "mask" in variant:
        flags.insert(0, variant["mask"])
    if "storage" in variant:  # a parameter storage mode (Triton's STORAGE)
        flags.append(variant["storage"])
    return dtypes + (" " + " ".join(flags) if flags else "")


def make_record(
    *,
    source: str,
    kernel: str,
    function: str,
    arch: int,
    variant: dict,
    facts: dict,
    shared_bytes: int,
    elements_per_iteration: Optional[int],  # of one copy of the loop body
    streams: Sequence[Stream],
    default: bool,
    fma: dict,
    options: dict,
    compiler: str,
    loop_index: Optional[int] = None,
) -> dict:
    """A record (module docstring) from the facts of a compiled function;
    ``loop_index``: which loop is the main one (default: :func:`main_loop`)."""
    loops = facts["loops"]
    expected = float(sum(s.bytes * (s.reads + s.writes) for s in streams))
    if loop_index is None:
        loop_index = main_loop(loops, elements_per_iteration, expected)
    loop = loops[loop_index] if loop_index is not None else None
    unroll = None
    if loop is not None and elements_per_iteration and expected > 0:
        # A compiler may unroll the loop: k copies of the body move k times the bytes.
        unroll = max(1, round(loop["bytes"] / (elements_per_iteration * expected)))
        elements_per_iteration *= unroll
    ipe = bpe = None
    issue = {}
    if loop is not None and elements_per_iteration:
        ipe = loop["instructions"] / elements_per_iteration
        bpe = loop["bytes"] / elements_per_iteration
        issue = {gpu.name: targets.issue_fraction(gpu, ipe, bpe) for gpu in targets.GPUS}
    return dict(
        source=source,
        kernel=kernel,
        function=function,
        arch=arch,
        variant=variant,
        label=label(variant),
        default=default,
        registers=facts["registers"],
        stack_bytes=facts["stack_bytes"],
        spill_instructions=facts["spill_instructions"],
        shared_bytes=max(int(shared_bytes), facts["static_shared"]),
        loop=loop,
        loops=len(loops),
        elements_per_iteration=elements_per_iteration,
        unroll=unroll,
        instructions_per_element=ipe,
        bytes_per_element=bpe,
        expected_bytes_per_element=expected,
        streams=[asdict(s) for s in streams],
        issue=issue,
        fma=fma,
        options=options,
        compiler=compiler,
    )


def _copies(loop: dict, elements: int, expected: float) -> int:
    """How many copies of a full tile's body ``loop`` holds (0: not a whole number)."""
    k, rest = divmod(loop["bytes"], elements * expected) if elements and expected else (0, 1)
    return int(k) if rest == 0 else 0


def main_loop(loops: list[dict], elements: Optional[int], expected: float) -> Optional[int]:
    """The loop a record reports, of a kernel's innermost loops.

    The full-tile loops are those moving a whole number of tiles' bytes
    (``elements`` per copy at ``expected`` bytes each; a compiler may unroll)
    that are not masked throughout (the partial tile's are).  A kernel may
    compile several versions of its full-tile loop, chosen per launch (for a
    power-of-two grad_scale and any other, ...): the heaviest per element is
    reported.  Without a full-tile loop (its bytes are not the streams'), the
    first loop, whose bytes then show the mismatch.
    """
    full = [
        (loop["instructions"] / (k * elements), -index, index)
        for index, loop in enumerate(loops)
        for k in [_copies(loop, elements, expected)]
        if k and loop["predicated"] < loop["loads_128"] + loop["stores_128"] + loop["loads_narrow"] + loop["stores_narrow"]
    ]
    if full:
        return max(full)[2]
    return 0 if loops else None


def parallel_map(fn: Callable, jobs_args: Sequence[tuple], jobs: int) -> list:
    """``[fn(*args) for args in jobs_args]`` on ``jobs`` fresh processes (order kept)."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [pool.submit(fn, *args) for args in jobs_args]
        return [f.result() for f in futures]
