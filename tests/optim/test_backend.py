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
