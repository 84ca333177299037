"""``python -m fastmup.inspect``: compile every kernel variant for sm_80/sm_90 and print what the code does.

Examples::

    python -m fastmup.inspect                          # every Triton and csrc variant, both archs
    python -m fastmup.inspect --source triton --kernel adam --arch 90
    python -m fastmup.inspect --set default --markdown
    python -m fastmup.inspect --worst                  # per dtype signature: the heaviest variant
    python -m fastmup.inspect --json records.json      # the records (see fastmup.inspect.records)
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Optional, Sequence

from . import report, targets


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fastmup.inspect",
        description="Compile every kernel variant for sm_80/sm_90 (no GPU needed) and print what the code does.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Columns (per thread and main-loop iteration where it applies):\n"
        + "\n".join(f"  {h:9} {what}" for h, what in report.COLUMNS)
        + "\n\nExamples:" + __doc__.split("Examples::", 1)[1].rstrip(),
    )
    p.add_argument("--source", choices=("all", "triton", "csrc"), default="all")
    p.add_argument("--kernel", action="append", help="adam, sgd, esgd, rademacher (repeatable; default: all)")
    p.add_argument("--dtype", action="append", help="param dtype: fp32, bf16, fp16 (repeatable; default: all)")
    p.add_argument("--arch", action="append", type=int, help="80 or 90 (repeatable; default: both)")
    p.add_argument("--set", choices=("all", "representative", "default"), default="all",
                   help="Triton variants: all (every dtype, option, AMP mode, alignment), representative (per dtype "
                        "signature the defaults and everything on, aligned and not), default (no amsgrad, no AMP, aligned)")
    p.add_argument("--worst", action="store_true", help="per dtype signature and arch, only the variant needing the most issue at H200")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--json", metavar="PATH", help="write the records as JSON to PATH ('-': stdout, no table)")
    p.add_argument("-j", "--jobs", type=int, default=1, help="compile Triton variants in this many processes")
    return p.parse_args(argv)


def collect(args: argparse.Namespace) -> list[dict]:
    from . import csrc, triton_kernels

    archs = tuple(args.arch or targets.ARCHS)
    kernels = set(args.kernel or ("adam", "sgd", "esgd", "rademacher"))
    dtypes = set(args.dtype or triton_kernels.DTYPES)
    out: list[dict] = []
    if args.source in ("all", "triton"):
        algorithms = [a for a in triton_kernels.ALGORITHMS if a in kernels or (a == "esgd" and "rademacher" in kernels)]
        every = triton_kernels.representative_settings if args.set == "representative" else triton_kernels.all_settings
        settings = [s for s in every(algorithms) if s.param in dtypes]
        if args.set == "default":
            settings = [s for s in settings if s.amp == "none" and s.aligned and not (s.algorithm == "adam" and s.option)]
        out += triton_kernels.inspect_all(settings, archs, jobs=args.jobs)
    if args.source in ("all", "csrc"):
        out += csrc.inspect_csrc(archs)
    out = [r for r in out if r["kernel"] in kernels and r["variant"].get("param", r["variant"].get("out")) in dtypes]
    if args.set == "default":
        out = [r for r in out if r["default"]]
    if args.worst:
        out = report.worst(out)
    out.sort(key=lambda r: (r["source"] != "triton", r["kernel"], r["arch"], r["label"]))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
    warnings.filterwarnings("ignore", message=".*create_graph=True.*")
    records = collect(args)
    if args.json:
        text = json.dumps(records, indent=1)
        if args.json == "-":
            print(text)
            return 0
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(report.table(records, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
