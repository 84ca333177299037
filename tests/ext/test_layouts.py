"""The C++ functors read the table and the state slots in the order each
algorithm's AlgorithmSpec declares: a column or buffer added on one side
only fails here."""
import subprocess

import pytest

from fastmup.ext import build as b
from fastmup.optim import adam, esgd, sgd

SPECS = [adam.SPEC, sgd.SPEC, esgd.SPEC]


@pytest.fixture(scope="module")
def cpu_module():
    if b.missing_requirements("cpu"):
        pytest.skip("the host module cannot be built here")
    from fastmup import ext

    return ext.load("cpu")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_functor_layout_is_the_spec(cpu_module, spec):
    layout = cpu_module.LAYOUTS[spec.functor]
    assert tuple(layout["columns"]) == spec.columns
    assert tuple(layout["states"]) == spec.buffers + tuple(i.name for i in spec.inputs)


def test_cuda_bindings_declare_the_same_layouts():
    """The CUDA module's bindings compile (syntax) against the same headers
    on a host compiler; the layouts they export are the host module's."""
    cxx = b.find_cxx()
    if cxx is None or not b.pybind11_available():
        pytest.skip("no C++ compiler / pybind11")
    import pybind11
    import sysconfig

    src = b.csrc_dir() / "cuda_bindings.cpp"
    cmd = [cxx, "-std=c++17", "-fsyntax-only", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
           f"-I{b.csrc_dir()}", str(src)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if "cuda_runtime" in result.stderr:
        pytest.skip("the CUDA runtime headers are not on the host compiler's path")
    assert result.returncode == 0, result.stderr[-3000:]
