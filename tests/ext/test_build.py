"""Building the csrc extensions: nvcc compiles every .cu (sm_80 and sm_90),
the host module builds and imports, and failures say what went wrong."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fastmup import ext
from fastmup.ext import build as b


@pytest.fixture(scope="session")
def cpu_module():
    missing = b.missing_requirements("cpu")
    if missing:
        pytest.skip("the host module cannot be built here: missing " + "; ".join(missing))
    return ext.load("cpu")


@pytest.mark.skipif(b.find_nvcc() is None, reason="nvcc is not installed: the CUDA sources cannot be compiled here")
def test_nvcc_compiles_every_cu_for_sm80_and_sm90(tmp_path):
    sources = sorted(b.csrc_dir().glob("*.cu"))
    assert {s.name for s in sources} >= {"adam_cuda.cu", "sgd_cuda.cu"}
    objects = b.compile_cuda_sources(archs=("sm_80", "sm_90"), out_dir=tmp_path)
    assert [o.name for o in objects] == [s.stem + ".cu.o" for s in sources]
    for obj in objects:
        assert obj.is_file() and obj.stat().st_size > 0
    cuobjdump = shutil.which("cuobjdump") or str(Path(b.find_nvcc()).with_name("cuobjdump"))
    if Path(cuobjdump).is_file():
        for obj in objects:
            listing = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True, text=True).stdout
            assert "sm_80" in listing and "sm_90" in listing, f"{obj.name}: {listing}"


def test_host_module_builds_and_imports(cpu_module):
    assert cpu_module.BLOCK > 0 and cpu_module.BLOCK % 16 == 0
    assert callable(cpu_module.adam) and callable(cpu_module.sgd)
    path = b.built_path("cpu")
    assert path is not None and path.is_file()
    assert (path.parent / "build.ninja").is_file() or b.find_ninja() is None
    assert ext.available("cpu")


def test_build_reports_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(b, "find_cxx", lambda: None)
    monkeypatch.setattr(b, "pybind11_available", lambda: False)
    with pytest.raises(b.BuildError, match=r"C\+\+ compiler.*pybind11"):
        b.build_extension("cpu", root=tmp_path)


@pytest.mark.parametrize("use_ninja", [True, False])
def test_failed_compile_carries_the_log(monkeypatch, tmp_path, use_ninja):
    if b.missing_requirements("cpu"):
        pytest.skip("no compiler/pybind11")
    if use_ninja and b.find_ninja() is None:
        pytest.skip("ninja is not installed")
    if not use_ninja:
        monkeypatch.setattr(b, "find_ninja", lambda: None)
    monkeypatch.setenv("FASTMUP_CXXFLAGS", "--fastmup-no-such-flag")
    with pytest.raises(b.BuildError) as info:
        b.build_extension("cpu", root=tmp_path)
    message = str(info.value)
    assert "fastmup-no-such-flag" in message and "build.log" in message


def test_cuda_archs_flags():
    flags = b.gencode_flags(["sm_90", "80", "9.0"])
    assert flags == [
        "-gencode", "arch=compute_80,code=sm_80",
        "-gencode", "arch=compute_90,code=sm_90",
        "-gencode", "arch=compute_90,code=compute_90",
    ]
    with pytest.raises(ValueError):
        b.gencode_flags(["hopper"])


def test_cuda_unavailable_without_gpu():
    import torch

    if not torch.cuda.is_available():
        assert not ext.available("cuda")
    assert not ext.available("tpu")


def test_a_build_says_when_it_starts_and_ends(monkeypatch, tmp_path, capsys):
    """A first-step build takes a minute: one line when it starts (with how to
    build ahead of time) and one when it is done; a cached module says nothing."""
    if b.missing_requirements("cpu"):
        pytest.skip("no compiler/pybind11")
    monkeypatch.setattr(b, "find_ninja", lambda: None)

    def fake_compile(cmds, cwd, log, parallel):
        for cmd in cmds:  # each command names its output after -o
            Path(cwd, cmd[cmd.index("-o") + 1]).write_bytes(b"")

    monkeypatch.setattr(b, "_run_logged", fake_compile)
    target = b.build_extension("cpu", root=tmp_path)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert "building the 'cpu' extension" in err[0] and "python -m fastmup.ext build cpu" in err[0]
    assert err[1].startswith("fastmup: built the 'cpu' extension in")
    assert b.build_extension("cpu", root=tmp_path) == target
    assert capsys.readouterr().err == ""
