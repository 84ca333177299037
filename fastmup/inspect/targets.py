"""The GPUs the compiled code is built for and judged against.

Every kernel is compiled for ``ARCHS`` (sm_80: A100-class; sm_90:
H100/H200).  The issue estimate asks: streaming at the GPU's HBM bandwidth,
what fraction of the chip's instruction issue would the loop need?

    elements/s   = bandwidth / bytes_per_element
    warp instr/s = elements/s · instructions_per_element / 32
    fraction     = warp instr/s / (SMs · 4 schedulers · clock)

(each of an SM's 4 schedulers issues at most one warp instruction per
cycle).  Well below 100% a memory-bound kernel keeps up with memory; near it,
issue is the bound instead.  The figures are the vendors' datasheet values
for the SXM parts at boost clock.  It is an estimate: some instructions
(MUFU, conversions) issue at lower rates, and memory latency also needs
enough warps in flight.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ARCHS", "GPU", "GPUS", "issue_fraction"]

#: compute capabilities every kernel is compiled for
ARCHS = (80, 90)


@dataclass(frozen=True)
class GPU:
    name: str
    sms: int
    clock_hz: float  # boost clock
    bandwidth: float  # bytes/s of HBM

    @property
    def issue_rate(self) -> float:
        """Warp instructions per second over the whole chip."""
        return self.sms * 4 * self.clock_hz


#: the GPUs the estimate is given for (both run sm_90 code)
GPUS = (
    GPU("H100", sms=132, clock_hz=1.98e9, bandwidth=3.35e12),
    GPU("H200", sms=132, clock_hz=1.98e9, bandwidth=4.8e12),
)


def issue_fraction(gpu: GPU, instructions_per_element: float, bytes_per_element: float) -> float:
    """Fraction of ``gpu``'s instruction issue a loop needs at HBM bandwidth."""
    if bytes_per_element <= 0:
        return 0.0
    elements_per_s = gpu.bandwidth / bytes_per_element
    return elements_per_s * instructions_per_element / 32 / gpu.issue_rate
