"""Reading compiled GPU code: SASS listings (``cuobjdump -sass``) and PTX.

A kernel's SASS is split into basic blocks; branches (``BRA``, and the
predicated ``CALL`` that ptxas may use as one: :func:`_jump_targets`) give
the control-flow edges, and a branch back to an earlier block closes a loop.
For every innermost loop that touches global memory, :func:`analyse` counts
what one iteration does:

* ``instructions``: the instructions on the longest path from the loop's
  header to a branch back to it.  Blocks that always ``CALL`` a subroutine
  are left out: those are the out-of-line slow paths of IEEE division and
  square root (operands near the ends of the exponent range), not the
  common case.
* global loads and stores by width (128-bit ones and narrower ones), over
  every warm block of the loop; generic ``LD``/``ST`` count as global (nvcc
  emits them for pointers it cannot prove global);
* shared-memory accesses and barriers (``BAR``, ``SYNCS``) in the loop;
* ``bytes``: the global bytes moved along that longest path;
* ``divisions`` (``FCHK``, the operand check of every IEEE fp32 division) and
  ``nan_maxes`` (``FSETP.NAN``, the NaN test of a NaN-propagating max) over
  the warm blocks: what tells a kernel's compiled variants apart
  (:mod:`fastmup.inspect.csrc`).

Functions also report their local-memory traffic (``LDL``/``STL``: register
spills) and FMA counts (``FFMA``/``DFMA``), which :func:`ptx_fma_count`
and :func:`ptx_contractible_count` complement on the PTX side.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

__all__ = [
    "Instruction",
    "Loop",
    "Function",
    "parse_sass",
    "analyse",
    "ptx_contractible_count",
    "ptx_fma_count",
    "ptx_functions",
]

_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_PREDICATE = re.compile(r"^@!?U?P[T0-9]+\s+")
_ADDRESS = re.compile(r"0x([0-9a-f]+)\s*$")
_ONLY_TARGET = re.compile(r"^(?:!?PT\s*,\s*)?0x[0-9a-f]+$")

#: opcodes (first dot-separated part) of the memory instructions
_GLOBAL = {"LDG", "STG", "LD", "ST", "ATOMG", "ATOM", "RED", "REDG"}
_SHARED = {"LDS", "STS", "LDSM", "STSM", "ATOMS", "LDGSTS"}
_BARRIER = {"BAR", "SYNCS"}
_LOCAL = {"LDL", "STL"}
_WIDTHS = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


@dataclass(frozen=True)
class Instruction:
    address: int
    text: str  # without the predicate
    predicated: bool

    @property
    def opcode(self) -> str:
        return self.text.split()[0] if self.text else ""

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def branch_target(self) -> Optional[int]:
        if self.base not in ("BRA", "JMP"):
            return None
        m = _ADDRESS.search(self.text)
        return int(m.group(1), 16) if m else None

    @property
    def ends_flow(self) -> bool:
        """Control never falls through to the next instruction."""
        if self.predicated:
            return False
        if self.base in ("EXIT", "RET", "BRX", "JMX", "KILL", "BPT"):
            return True
        # BRA with an operand besides its target (a predicate, BRA.DIV's
        # register) is conditional.
        return self.base in ("BRA", "JMP") and bool(_ONLY_TARGET.match(self.text.split(None, 1)[-1]))

    @property
    def global_width(self) -> int:
        """Bytes per thread of a global access (0: not a global access)."""
        if self.base not in _GLOBAL:
            return 0
        for part in self.opcode.split(".")[1:]:
            if part in _WIDTHS:
                return _WIDTHS[part]
        return 4

    @property
    def is_store(self) -> bool:
        return self.base in ("STG", "ST", "RED", "REDG")


@dataclass
class Loop:
    """One innermost loop of a function (all counts per thread and iteration)."""

    header: int  # address of the loop's first block
    instructions: int  # longest warm path through one iteration
    loads_128: int
    stores_128: int
    loads_narrow: int
    stores_narrow: int
    shared: int
    barriers: int
    bytes: int  # global bytes moved along the longest path
    bytes_all: int  # global bytes of every warm block (every path at once)
    predicated: int  # global accesses under a predicate (masked)
    divisions: int = 0  # IEEE fp32 divisions (FCHK: the range check of each)
    nan_maxes: int = 0  # NaN-propagating max/min (FSETP.NAN: torch.maximum's NaN test)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Function:
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def count(self, *bases: str) -> int:
        return sum(1 for i in self.instructions if i.base in bases)

    @property
    def spill_instructions(self) -> int:
        return self.count(*_LOCAL)

    @property
    def fma(self) -> int:
        return self.count("FFMA", "DFMA")


def parse_sass(text: str) -> list[Function]:
    """The functions of a ``cuobjdump -sass`` listing (one architecture)."""
    functions: list[Function] = []
    current: Optional[Function] = None
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current = Function(m.group(1))
            functions.append(current)
            continue
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            body = m.group(2)
            predicated = bool(_PREDICATE.match(body)) and not body.startswith("@PT ")
            body = _PREDICATE.sub("", body)
            current.instructions.append(Instruction(int(m.group(1), 16), body, predicated))
    return functions


# ----------------------------------------------------------------------
# control flow
# ----------------------------------------------------------------------
@dataclass
class _Block:
    start: int
    instructions: list[Instruction]
    successors: list[int] = field(default_factory=list)

    @property
    def cold(self) -> bool:
        # An unconditional CALL: the out-of-line slow path of a division or
        # square root.  (ptxas also emits predicated CALLs in hot code.)
        return any(i.base == "CALL" and not i.predicated for i in self.instructions)


def _call_target(i: Instruction) -> Optional[int]:
    if i.base != "CALL":
        return None
    m = _ADDRESS.search(i.text)
    return int(m.group(1), 16) if m else None


def _jump_targets(ins: list[Instruction]) -> dict[int, int]:
    """Address -> target of each predicated CALL that is a jump: ptxas may
    leave a loop through a predicated ``CALL.REL.NOINC`` to a block that
    branches also reach (its convergence point), which never returns; a
    subroutine (a division's slow path) is entered by calls only."""
    branched = {i.branch_target for i in ins if i.branch_target is not None}
    return {i.address: t for i in ins if i.predicated for t in [_call_target(i)] if t is not None and t in branched}


def _blocks(fn: Function) -> dict[int, _Block]:
    ins = fn.instructions
    if not ins:
        return {}
    jumps = _jump_targets(ins)
    leaders = {ins[0].address}
    for k, i in enumerate(ins):
        target = i.branch_target if i.address not in jumps else jumps[i.address]
        if target is not None:
            leaders.add(target)
        if (target is not None or i.ends_flow) and k + 1 < len(ins):
            leaders.add(ins[k + 1].address)
    blocks: dict[int, _Block] = {}
    order = []
    current: Optional[_Block] = None
    for i in ins:
        if i.address in leaders:
            current = _Block(i.address, [])
            blocks[i.address] = current
            order.append(i.address)
        current.instructions.append(i)
    for k, start in enumerate(order):
        block = blocks[start]
        last = block.instructions[-1]
        target = last.branch_target if last.address not in jumps else jumps[last.address]
        if target is not None and target in blocks:
            block.successors.append(target)
        if not last.ends_flow and k + 1 < len(order):
            block.successors.append(order[k + 1])
    return blocks


def _natural_loops(blocks: dict[int, _Block]) -> dict[int, set[int]]:
    """Header -> blocks of the loop, for every back edge (to an address at or
    before the branch).  Several back edges to one header make one loop."""
    preds: dict[int, list[int]] = {b: [] for b in blocks}
    for b in blocks.values():
        for s in b.successors:
            preds[s].append(b.start)
    loops: dict[int, set[int]] = {}
    for b in blocks.values():
        for s in b.successors:
            if s <= b.start:  # back edge b -> s
                body = loops.setdefault(s, {s})
                stack = [b.start]
                while stack:
                    x = stack.pop()
                    if x in body:
                        continue
                    body.add(x)
                    stack.extend(p for p in preds[x] if p >= s)
    return loops


def _longest_path(blocks: dict[int, _Block], header: int, body: set[int]) -> tuple[int, int]:
    """(instructions, global bytes) of the heaviest warm path header -> back edge."""
    warm = {b for b in body if not blocks[b].cold}
    if header not in warm:
        return 0, 0
    weight = {b: sum(1 for i in blocks[b].instructions if i.base != "NOP") for b in warm}
    moved = {b: sum(i.global_width for i in blocks[b].instructions) for b in warm}
    best: dict[int, tuple[int, int]] = {}
    # Forward edges inside the loop go to higher addresses (back edges are
    # the ones to the header), so increasing address order is topological.
    for b in sorted(warm):
        if b == header:
            here = (weight[b], moved[b])
        else:
            froms = [best[p] for p in warm if p in best and b in blocks[p].successors and p < b]
            if not froms:
                continue
            top = max(froms)
            here = (top[0] + weight[b], top[1] + moved[b])
        best[b] = here
    latches = [best[b] for b in best if header in blocks[b].successors]
    return max(latches) if latches else (0, 0)


def analyse(fn: Function) -> list[Loop]:
    """Every innermost loop of ``fn`` that accesses global memory, in address order."""
    blocks = _blocks(fn)
    loops = _natural_loops(blocks)
    out = []
    for header, body in sorted(loops.items()):
        if any(h != header and h in body for h in loops):
            continue  # not innermost
        warm = [i for b in body if not blocks[b].cold for i in blocks[b].instructions]
        accesses = [i for i in warm if i.global_width]
        if not accesses:
            continue
        instructions, moved = _longest_path(blocks, header, body)
        out.append(
            Loop(
                header=header,
                instructions=instructions,
                loads_128=sum(1 for i in accesses if i.global_width == 16 and not i.is_store),
                stores_128=sum(1 for i in accesses if i.global_width == 16 and i.is_store),
                loads_narrow=sum(1 for i in accesses if i.global_width < 16 and not i.is_store),
                stores_narrow=sum(1 for i in accesses if i.global_width < 16 and i.is_store),
                shared=sum(1 for i in warm if i.base in _SHARED),
                barriers=sum(1 for i in warm if i.base in _BARRIER),
                bytes=moved,
                bytes_all=sum(i.global_width for i in accesses),
                predicated=sum(1 for i in accesses if i.predicated),
                divisions=sum(1 for i in warm if i.base == "FCHK"),
                nan_maxes=sum(1 for i in warm if i.opcode.startswith("FSETP.NAN")),
            )
        )
    return out


# ----------------------------------------------------------------------
# PTX
# ----------------------------------------------------------------------
_PTX_ENTRY = re.compile(r"^\s*\.(?:visible\s+)?\.entry\s+([\w$]+)", re.M)
_PTX_CONTRACTIBLE = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:mul|add|sub)(?:\.ftz)?(?:\.sat)?\.f(?:32|64)\b", re.M)
_PTX_FMA = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:fma|mad)\.r[nzmp](?:\.ftz)?(?:\.sat)?\.f(?:32|64)\b", re.M)


def ptx_functions(ptx: str) -> dict[str, str]:
    """Entry name -> its PTX text."""
    starts = [(m.start(), m.group(1)) for m in _PTX_ENTRY.finditer(ptx)]
    out = {}
    for k, (pos, name) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else len(ptx)
        out[name] = ptx[pos:end]
    return out


def ptx_fma_count(ptx: str) -> int:
    """Floating-point fused multiply-adds (fp32 and fp64) in PTX text."""
    return len(_PTX_FMA.findall(ptx))


def ptx_contractible_count(ptx: str) -> int:
    """fp32/fp64 multiplies, adds and subtracts without a rounding modifier:
    ptxas may fuse those into FMAs (``.rn`` ones it leaves alone)."""
    return len(_PTX_CONTRACTIBLE.findall(ptx))


def loops_to_dicts(loops: Iterable[Loop]) -> list[dict]:
    return [loop.to_dict() for loop in loops]
