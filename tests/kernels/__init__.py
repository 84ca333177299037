"""Tests of the fused Triton kernels (fastmup.kernels), run under Triton's CPU interpreter."""
