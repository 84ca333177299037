"""Triton kernels of fastmup, installed as ``fastmup.kernels``: one kernel per module, with its launcher beside it."""
