""""clip + step" cases: an optimizer step preceded by a global gradient-norm clip.

:class:`ClipThenStep` wraps any implementation's optimizer.  fastmup's
optimizers clip with their deferred clip (``opt.clip_grad_norm_``: one fused
reduction reads the gradients, the step applies the coefficient while it
reads them anyway); torch's and mup's with ``torch.nn.utils.clip_grad_norm_
(foreach=True)``, which reads the gradients for the norm and then rewrites
them in place before the step reads them again.

Bytes per parameter each path moves (fp32; Adam/AdamW: the step reads p, g,
m, v and writes p, m, v = 28 bytes):

* fastmup: norm 4 (read g) + step 28 = **32**;
* torch: norm 4 + clip 8 (read and write g) + step 28 = **40**.

The runner's GB/s figures count the 32 (what a clip + step must move).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["ClipThenStep", "bytes_per_param"]


def bytes_per_param(element_size: int, deferred: bool, state_buffers: int = 2) -> int:
    """Bytes one clip + step moves per parameter (see the module docstring)."""
    step = element_size * (2 + 1 + 2 * state_buffers)  # p read+write, g read, each state read+write
    return element_size + step + (0 if deferred else 2 * element_size)


class ClipThenStep:
    """``clip; optimizer.step()`` as one ``step()`` (duck-types the optimizer
    for the benchmark runner: ``state``, ``param_groups``, ``zero_grad``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], max_norm: float, *, deferred: bool) -> None:
        self.optimizer = optimizer
        self.params = list(params)
        self.max_norm = float(max_norm)
        self.deferred = deferred
        self.backend = getattr(optimizer, "backend", None)

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @property
    def param_groups(self) -> list:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def step(self) -> None:
        if self.deferred:
            self.optimizer.clip_grad_norm_(self.max_norm)
        else:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)
        self.optimizer.step()
