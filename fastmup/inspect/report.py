"""The records as a table (plain text or Markdown)."""
from __future__ import annotations

from typing import Iterable, Sequence

__all__ = ["COLUMNS", "rows", "table", "worst"]

#: (heading, what it shows)
COLUMNS = (
    ("source", "triton or csrc"),
    ("kernel", "the algorithm's kernel"),
    ("variant", "param/grad/state dtypes and flags"),
    ("sm", "target architecture"),
    ("regs", "registers per thread"),
    ("spill", "LDL/STL instructions (register spills) in the function"),
    ("smem", "shared memory per block, bytes"),
    ("ld128", "128-bit global loads per loop iteration"),
    ("st128", "128-bit global stores per loop iteration"),
    ("ld<128", "narrower global loads per loop iteration"),
    ("st<128", "narrower global stores per loop iteration"),
    ("shm", "shared-memory accesses in the loop"),
    ("bar", "barriers in the loop"),
    ("instr/el", "SASS instructions per element (longest warm path of the main loop)"),
    ("B/el", "global bytes per element"),
    ("H100", "instruction issue needed at H100 HBM bandwidth (3.35 TB/s)"),
    ("H200", "instruction issue needed at H200 HBM bandwidth (4.8 TB/s)"),
    ("+fma", "PTX FMAs beyond those the source writes (contracted)"),
    ("fusable", "PTX multiplies/adds without a rounding modifier, which ptxas may still fuse"),
)


def _fmt(x, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def rows(records: Iterable[dict]) -> list[list[str]]:
    out = []
    for r in records:
        loop = r["loop"] or {}
        issue = r["issue"] or {}
        fma = r["fma"]
        extra = None if fma.get("ptx_uncontracted") is None else fma["ptx"] - fma["ptx_uncontracted"]
        out.append([
            r["source"],
            r["kernel"],
            r["label"],
            str(r["arch"]),
            _fmt(r["registers"]),
            _fmt(r["spill_instructions"]),
            _fmt(r["shared_bytes"]),
            _fmt(loop.get("loads_128")),
            _fmt(loop.get("stores_128")),
            _fmt(loop.get("loads_narrow")),
            _fmt(loop.get("stores_narrow")),
            _fmt(loop.get("shared")),
            _fmt(loop.get("barriers")),
            _fmt(r["instructions_per_element"]),
            _fmt(r["bytes_per_element"]),
            f"{issue['H100']:.0%}" if "H100" in issue else "-",
            f"{issue['H200']:.0%}" if "H200" in issue else "-",
            _fmt(extra),
            _fmt(fma.get("contractible")),
        ])
    return out


def table(records: Sequence[dict], markdown: bool = False) -> str:
    heads = [h for h, _ in COLUMNS]
    body = rows(records)
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[k]) for row in body)) if body else len(h) for k, h in enumerate(heads)]
    numeric = set(range(3, len(heads)))

    def line(cells):
        return "  ".join(c.rjust(w) if k in numeric else c.ljust(w) for k, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(heads), line(["-" * w for w in widths])] + [line(row) for row in body])


def worst(records: Iterable[dict]) -> list[dict]:
    """Per source, kernel, dtype signature and arch: the variant needing the most issue at H200."""
    best: dict[tuple, dict] = {}
    for r in records:
        v = r["variant"]
        key = (r["source"], r["kernel"], tuple(v.get(k) for k in ("param", "grad", "state", "out")), r["arch"])
        score = (r["issue"] or {}).get("H200", -1.0)
        if key not in best or score > (best[key]["issue"] or {}).get("H200", -1.0):
            best[key] = r
    return list(best.values())
