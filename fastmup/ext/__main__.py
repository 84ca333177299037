"""``python -m fastmup.ext build [cpu|cuda|plan] [--archs sm_80,sm_90] [--force]`` and ``python -m fastmup.ext info``."""
from __future__ import annotations

import argparse
import sys

from fastmup.ext import build as b


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmup.ext", description="Build fastmup's C++/CUDA backends.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="build an extension module into the cache")
    p_build.add_argument("kind", nargs="?", choices=b.KINDS, default="cpu")
    p_build.add_argument("--archs", help="CUDA archs, e.g. sm_80,sm_90 (default: the visible GPUs, else sm_80,sm_90)")
    p_build.add_argument("--force", action="store_true", help="rebuild even when up to date")
    sub.add_parser("info", help="where the sources and builds are, and what is missing")
    args = parser.parse_args(argv)

    if args.command == "info":
        print(f"sources:   {b.csrc_dir()}")
        print(f"cache:     {b.cache_root()}")
        print(f"compiler:  {b.find_cxx()}")
        print(f"nvcc:      {b.find_nvcc()}")
        print(f"ninja:     {b.find_ninja()}")
        for kind in b.KINDS:
            missing = b.missing_requirements(kind)
            print(f"{kind:5s}:     built={b.built_path(kind)}  missing={missing or 'nothing'}")
        return 0

    archs = [a for a in args.archs.replace(";", ",").split(",") if a] if args.archs else None
    try:
        path = b.build_extension(args.kind, archs=archs, force=args.force)
        b.import_module(args.kind, path)  # importing needs no GPU
    except b.BuildError as e:
        print(e, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
