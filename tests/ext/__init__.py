"""Tests of fastmup.ext and the compiled sources of csrc/."""
import pytest

from fastmup.ext import build as _build

#: skips a module whose tests need the host build (compiler and pybind11)
needs_cpu_build = pytest.mark.skipif(
    bool(_build.missing_requirements("cpu")),
    reason="the cpu backend cannot be built here: missing " + "; ".join(_build.missing_requirements("cpu")),
)
