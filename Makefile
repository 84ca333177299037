# Two entry points, each doing all set-up on a fresh machine with python3:
#   make bench   the main job: benchmark suite + comparison against the eager reference
#   make test    the test suite (what CI runs)
# The virtualenv reuses a torch >= 2.4 already installed system-wide (e.g. a CUDA
# build on a GPU machine); otherwise it installs torch's CPU build.
#
# And one for a GPU machine that has torch, triton, pybind11, ninja, pytest and
# nvcc already (no network, no virtualenv, nothing installed: the source tree on
# PYTHONPATH):
#   make gpu-check   build the CUDA backend, run the GPU tests, benchmark GPT-2
#                    small / XL-like / 500 small tensors, write
#                    benchmarks/results/<device>-<date>.json (under 8 minutes)
#   make gpu-check GPU_CHECK_ARGS=--dry-run   the same on the CPU, tiny sets

PYTHON ?= python3
VENV_FLAGS ?= --system-site-packages
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIP ?= torch==2.13.0+cpu --extra-index-url https://download.pytorch.org/whl/cpu
BENCH_ARGS ?= --json benchmarks/results/latest.json --plot benchmarks/results/latest.png
PYTEST_ARGS ?=
GPU_CHECK_ARGS ?=

.PHONY: bench bench-quick test env clean gpu-check

env: $(VENV)/.ready

$(VENV)/.ready: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import sys, torch; sys.exit(tuple(int(x) for x in torch.__version__.split('.')[:2]) < (2, 4))" 2>/dev/null \
		|| $(PY) -m pip install $(TORCH_PIP)
	$(PY) -m pip install --no-deps mup==1.0.0
	$(PY) -m pip install -e ".[test,bench,ext,hf]"
	touch $@

bench: env
	$(PY) -m fastmup.bench $(BENCH_ARGS)

bench-quick: env
	$(PY) -m fastmup.bench --quick $(BENCH_ARGS)

test: env
	$(PY) -m pytest tests benchmarks -q $(PYTEST_ARGS)

gpu-check:
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -m fastmup.bench.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
