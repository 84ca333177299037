"""Session-wide test set-up.

Triton decides between its CPU interpreter and the compiler when a kernel
module is imported, so the choice must be made before any test module
imports ``fastmup.kernels``: without a CUDA device the kernels run under the
interpreter (``TRITON_INTERPRET=1``); with one, the environment decides
(``TRITON_INTERPRET=0`` compiles them for the GPU).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for the module (``pytest.mark.usefixtures``), restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
