"""Backend names and the `auto` choice."""
import warnings

import pytest
import torch

from fastmup.optim import backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_picks_triton_for_cuda_tensors(monkeypatch):
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    assert backend.resolve("auto", [CUDA]) == "triton"


def test_auto_falls_back_to_eager_with_one_warning(monkeypatch):
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    monkeypatch.setattr(backend, "_warned", set())
    with pytest.warns(RuntimeWarning, match="Triton is not importable"):
        assert backend.resolve("auto", [CUDA]) == "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.resolve("auto", [CUDA]) == "eager"  # warned once only


def test_auto_on_cpu_uses_the_extension_when_built(monkeypatch):
    monkeypatch.setattr(backend, "extension_available", lambda t: True)
    assert backend.resolve("auto", [CPU]) == "cpu"
    monkeypatch.setattr(backend, "extension_available", lambda t: False)
    assert backend.resolve("auto", [CPU]) == "eager"


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.resolve("triton", [CPU])


def test_unknown_backend_name():
    from fastmup.optim import MuSGD

    with pytest.raises(ValueError, match="backend='tpu'"):
        MuSGD([], lr=0.1, backend="tpu")


# ----------------------------------------------------------------------------
# a compiled backend that cannot be built: auto falls back, a request raises
# ----------------------------------------------------------------------------
_FIRST_STEPS = r"""
import sys, warnings, torch
from fastmup.infshape import InfDim, InfShape
from fastmup.optim import MuAdam

def run(backend):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(33, 7))
    p.infshape = InfShape([InfDim(None, d) for d in p.shape])
    opt = MuAdam([p], lr=1e-2, backend=backend)
    for t in range(3):
        torch.manual_seed(t)
        p.grad = torch.randn_like(p)
        opt.step()
    return opt, p.detach()

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    opt, auto = run(sys.argv[1])
_, eager = run("eager")
print("BACKEND", opt.backend)
print("EQUAL", bool(torch.equal(auto, eager)))
print("WARNINGS", len(caught), "|".join(str(w.message) for w in caught))
"""


def _first_steps(tmp_path, backend, **env):
    import os
    import subprocess
    import sys

    from fastmup.ext import build as b

    if b.missing_requirements("cpu"):
        pytest.skip("no compiler/pybind11: the cpu backend is not chosen here")
    script = tmp_path / "first_steps.py"
    script.write_text(_FIRST_STEPS)
    run_env = {**os.environ, "PYTHONPATH": os.getcwd(), **env}
    return subprocess.run([sys.executable, str(script), backend], capture_output=True, text=True, env=run_env, timeout=300)


@pytest.mark.parametrize("fault", ["compile error", "unwritable cache directory"])
def test_failed_build_falls_back_to_eager_under_auto(tmp_path, fault):
    if fault == "compile error":
        env = dict(FASTMUP_EXT_DIR=str(tmp_path / "cache"), FASTMUP_CXXFLAGS="--fastmup-no-such-flag")
    else:
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("")
        env = dict(FASTMUP_EXT_DIR=str(blocker / "cache"))
    result = _first_steps(tmp_path, "auto", **env)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["BACKEND"] == "eager" and lines["EQUAL"] == "True"
    count, messages = lines["WARNINGS"].split(" ", 1)
    assert count == "1" and "could not be built" in messages and "eager reference instead" in messages, messages


def test_failed_build_raises_for_a_requested_backend(tmp_path):
    result = _first_steps(tmp_path, "cpu", FASTMUP_EXT_DIR=str(tmp_path / "cache"), FASTMUP_CXXFLAGS="--fastmup-no-such-flag")
    assert result.returncode != 0
    assert "BuildError" in result.stderr and "fastmup-no-such-flag" in result.stderr


def test_functional_entry_points_name_themselves():
    """adam and sgd are made by backend.entry_point: named and documented as
    functions of their modules, and a backend without a launcher is refused."""
    import inspect

    from fastmup.optim import adam as adam_module
    from fastmup.optim import sgd as sgd_module

    for module, name in ((adam_module, "adam"), (sgd_module, "sgd")):
        fn = getattr(module, name)
        assert (fn.__name__, fn.__module__) == (name, module.__name__)
        assert fn.__doc__.startswith(f"Apply one {name.capitalize() if name == 'adam' else 'SGD'} step")
        assert list(inspect.signature(fn).parameters) == ["batch", "backend", "grad_scale", "found_inf"]
        with pytest.raises(ValueError, match="no fused launcher"):
            fn(None, backend="nope")


def test_storage_modes_each_backend_implements():
    """Every fused backend implements every storage mode; the cuda storage
    kernels take gradients in the parameter's dtype (csrc/multi_tensor.cuh)."""
    p = torch.zeros(8, dtype=torch.bfloat16)
    for name in ("cuda", "triton", "cpu"):
        for storage in ("nearest", "stochastic", "master", "remainder"):
            assert backend.fused_refusal(p, p, torch.float32, storage, name) is None
    for storage in ("stochastic", "master"):
        mixed = backend.fused_refusal(p, p.float(), torch.float32, storage, "cuda")
        assert mixed.error is TypeError and storage in mixed.reason
    assert backend.fused_refusal(p, p.float(), torch.float32, "master", "cpu") is None
    assert backend.fused_refusal(p, p.float(), torch.float32, "nearest", "cuda") is None
