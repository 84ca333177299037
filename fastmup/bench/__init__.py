"""Benchmarks of fastmup's optimizers: ``python -m fastmup.bench`` (or
``fastmup-bench``) times every parameter set × optimizer × implementation,
checks each against the eager reference, and reports table / JSON / PNG.

Modules: :mod:`~fastmup.bench.models` (parameter sets),
:mod:`~fastmup.bench.optimizers` (the optimizer list),
:mod:`~fastmup.bench.impls` (implementations), :mod:`~fastmup.bench.timing`,
:mod:`~fastmup.bench.environment` (device, versions),
:mod:`~fastmup.bench.runner` (checking and timing a case),
:mod:`~fastmup.bench.report` (table, JSON, plot), :mod:`~fastmup.bench.cli`.
"""
from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m fastmup.bench`` and the ``fastmup-bench`` script."""
    from fastmup.bench.cli import main as cli_main

    return cli_main(argv)
