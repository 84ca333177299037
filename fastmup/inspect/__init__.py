"""Compile every fused kernel for real GPUs, without one, and read the code.

``python -m fastmup.inspect`` (also ``fastmup-inspect``) builds every kernel
variant the launchers can request, for sm_80 and sm_90, and prints a table
per variant: registers, spills, shared memory, the main loop's global
accesses by width, its shared-memory accesses and barriers, SASS
instructions and bytes per element, the fraction of an H100's and an H200's
instruction issue that streaming at their HBM bandwidth would need, and
floating-point contraction.  ``--json`` writes the records instead.  See
``docs/compiled_kernels.md`` for the table of the current kernels and the
targets the CI checks (``tests/inspect/``).

* Triton kernels (:mod:`.triton_kernels`): the optimizers run on CPU tensors
  with the kernel launch intercepted; each launch is specialised as the JIT
  would and compiled ahead of time with ``triton.compile(ASTSource(...),
  target=GPUTarget("cuda", arch, 32))``, then disassembled with the
  ``cuobjdump`` bundled in the Triton wheel.
* ``csrc/`` CUDA kernels (:mod:`.csrc`): :func:`inspect_csrc` compiles them
  with nvcc and the extension build's flags (:func:`nvcc_command`).

Both produce the records of :mod:`.records` (schema in its docstring);
:mod:`.sass` reads SASS and PTX, :mod:`.targets` holds the GPUs and the issue
estimate, :mod:`.report` the table.  Nothing here needs a GPU.
"""
from .csrc import inspect_csrc, nvcc_command
from .triton_kernels import inspect_all as inspect_triton

__all__ = ["inspect_csrc", "inspect_triton", "nvcc_command"]
