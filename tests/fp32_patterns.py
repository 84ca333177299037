"""fp32 values of every class, for the tests of the rounding helpers."""
from __future__ import annotations

import torch

#: bit patterns that single out the corner cases of the roundings: ±0, ±inf,
#: quiet and signalling NaNs (CUDA's canonical 0x7FFFFFFF, the two NaN ranges
#: the remainder split swaps), the largest finite values and the bf16 / fp16
#: overflow ties, the smallest subnormals, fp16's subnormal boundary
SPECIAL_BITS = (
    0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FFF8000,
    0xFFFF8000, 0x7F808000, 0xFF80FFFF, 0x7F800001, 0x7F807FFF, 1, 0x807FFFFF, 0x00008000, 0x00018000,
    0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0x38800000, 0x387FFFFF, 0x33800000, 0x477FE000, 0x477FF000, 0x47800000,
)


def from_bits(bits: torch.Tensor) -> torch.Tensor:
    """fp32 values of int64 bit patterns in ``[0, 2^32)`` (or their int32 forms)."""
    bits = bits & 0xFFFFFFFF
    return (bits - ((bits >> 31) << 32)).to(torch.int32).view(torch.float32)


def fp32_patterns(n: int, seed: int = 0) -> torch.Tensor:
    """About ``4n`` fp32 values: random bit patterns (NaNs, infs, subnormals
    among them), exact bf16 ties (low 16 bits 0x8000) and fp16 ties (low 13
    bits 0x1000), values across the whole exponent range, and the
    :data:`SPECIAL_BITS`."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(-(2**31), 2**31, (n,), dtype=torch.int64, generator=g)
    scaled = torch.randn(n, generator=g) * torch.exp2(torch.randint(-150, 128, (n,), generator=g).float())
    ties16 = (u & ~0xFFFF) | 0x8000
    ties13 = (u & ~0x1FFF) | 0x1000
    special = torch.tensor(SPECIAL_BITS, dtype=torch.int64)
    return torch.cat([from_bits(torch.cat([u, ties16, ties13, special])), scaled])
