"""Tests of fastmup.inspect: the compiled code of the kernels, read without a GPU."""
