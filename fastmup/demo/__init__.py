"""Runnable demonstrations of fastmup.

``python -m fastmup.demo mutransfer [--quick] [--out DIR] ...``: μTransfer on
a CPU in minutes (see :mod:`fastmup.demo.mutransfer`).
``python -m fastmup.demo deptransfer [--quick] ...``: transfer across depth,
μP alone vs depth-μP vs CompleteP (see :mod:`fastmup.demo.deptransfer`).
``python -m fastmup.demo hf [--quick] ...``: the same on Hugging Face
transformers' GPT-2 and Llama (see :mod:`fastmup.demo.hf_mutransfer`; needs
``fastmup[hf]``).
``python -m fastmup.demo low-precision [--quick] ...``: bf16 parameters under
μP with round-to-nearest, stochastic rounding, 16-bit remainders and fp32
(see :mod:`fastmup.demo.low_precision`).

Importing this package imports nothing heavy; the demos need scikit-learn,
matplotlib, pandas and tqdm, imported when used.
"""

DEMOS = {
    "mutransfer": "fastmup.demo.mutransfer",
    "deptransfer": "fastmup.demo.deptransfer",
    "hf": "fastmup.demo.hf_mutransfer",
    "low-precision": "fastmup.demo.low_precision",
}

__all__ = ["DEMOS", "main"]


def main(argv=None) -> int:
    """Dispatch ``python -m fastmup.demo NAME [options]`` to the demo's ``main``."""
    import importlib
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in DEMOS:
        known = ", ".join(sorted(DEMOS))
        msg = (
            f"usage: python -m fastmup.demo {{{known}}} [options]\n"
            "  (python -m fastmup.demo NAME --help for the options)"
        )
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown demo {argv[0]!r}; known: {known}\n{msg}", file=sys.stderr)
            return 2
        print(msg)
        return 0 if argv else 2
    module = importlib.import_module(DEMOS[argv[0]])
    module.main(argv[1:], prog=f"python -m fastmup.demo {argv[0]}")
    return 0
