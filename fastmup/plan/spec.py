"""``AlgorithmSpec``: an optimizer's contract with every backend, declared once.

Each algorithm module of :mod:`fastmup.optim` declares one spec; the
optimizer, the eager reference, the Triton launchers and the compiled
extension all read that declaration:

* ``columns`` — the per-tensor hyperparameters, in the order of the rows of
  :class:`~fastmup.plan.batch.TensorBatch` (``lr`` and ``weight_decay``
  carry the μP multipliers).  Kernels take a column's index from here.
* ``state`` — the per-element buffers every tensor has, in the order of the
  kernels' state pointers; ``optional`` — a buffer only tensors whose
  ``gate`` column is nonzero have (address 0 elsewhere).
* ``scalars`` — per-tensor scalar state (one device column per batch,
  ``state[p][key]`` a 0-d view into it), with initial value and dtype.
* ``inputs`` — read-only per-element inputs of some steps (ESGD-M's HVP)
  and the dtype they are read in.
* ``kernel`` / ``functor`` — the Triton module (``fastmup.kernels.<kernel>``)
  and the C++ functor of ``csrc/`` that implement the update.

How a parameter itself is stored (:class:`ParamStorage`: rounding to
nearest, stochastic rounding, an fp32 master weight, a 16-bit remainder) is
common to every algorithm: it is part of a batch's signature, and the
modes with extra state add the buffer :data:`STORAGE_BUFFERS` names, after
the algorithm's own (see :mod:`fastmup.optim.precision`).

This module imports nothing of fastmup: the backends read specs from the
batches they are handed, never from :mod:`fastmup.optim`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = [
    "AlgorithmSpec",
    "MASTER_BUFFER",
    "OptionalBuffer",
    "ParamStorage",
    "REMAINDER_BUFFER",
    "ReadOnlyInput",
    "STORAGE_BUFFERS",
    "ScalarState",
]


class ParamStorage:
    """How an update's fp32 result becomes the stored parameter (the names
    of the modes; the math is in :mod:`fastmup.optim.precision`)."""

    #: round to nearest even (torch's ``.to(dtype)``): the default
    NEAREST = "nearest"
    #: stochastic rounding with counter-based bits (bf16, fp16 parameters)
    STOCHASTIC = "stochastic"
    #: an fp32 master weight in the state, the parameter its rounded copy (bf16, fp16)
    MASTER = "master"
    #: an int16 remainder in the state: bf16 parameter + remainder = the fp32 value
    REMAINDER = "remainder"
    ALL = (NEAREST, STOCHASTIC, MASTER, REMAINDER)


#: the fp32 master weight of ``ParamStorage.MASTER``
MASTER_BUFFER = "master_weight"
#: the int16 remainder of ``ParamStorage.REMAINDER``
REMAINDER_BUFFER = "weight_remainder"
#: storage mode -> (its state buffer, the buffer's dtype), for the modes that have one
STORAGE_BUFFERS: dict[str, tuple[str, torch.dtype]] = {
    ParamStorage.MASTER: (MASTER_BUFFER, torch.float32),
    ParamStorage.REMAINDER: (REMAINDER_BUFFER, torch.int16),
}


@dataclass(frozen=True)
class OptionalBuffer:
    """A state buffer that exists only where ``gate`` (a column) is nonzero."""

    name: str
    gate: str


@dataclass(frozen=True)
class ScalarState:
    """Per-tensor scalar state: ``name`` starts at ``initial``, stored in ``dtype``."""

    name: str
    initial: float
    dtype: torch.dtype


@dataclass(frozen=True)
class ReadOnlyInput:
    """A per-element input of some steps, read in the dtype of ``like``
    (``"param"``, ``"grad"`` or ``"state"``)."""

    name: str
    like: str


@dataclass(frozen=True)
class AlgorithmSpec:
    """What an element-wise optimizer update reads and writes (see the module docstring)."""

    name: str
    columns: tuple[str, ...]
    state: tuple[str, ...]
    kernel: str
    functor: str
    optional: Optional[OptionalBuffer] = None
    scalars: tuple[ScalarState, ...] = (ScalarState("step", 0.0, torch.float32),)
    inputs: tuple[ReadOnlyInput, ...] = ()
    #: the update advances the scalar state itself (in the same launch);
    #: otherwise the optimizer counts ``step`` before the update runs
    advances_scalars: bool = False
    _index: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for required in ("lr", "weight_decay"):
            if required not in self.columns:
                raise ValueError(f"{self.name}: columns must include {required!r} (it carries the μP multiplier)")
        if self.optional is not None and self.optional.gate not in self.columns:
            raise ValueError(f"{self.name}: the gate {self.optional.gate!r} of {self.optional.name!r} is not a column")
        if not self.scalars or self.scalars[0].name != "step":
            raise ValueError(f"{self.name}: the first scalar state must be 'step'")
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.columns)})

    def col(self, name: str) -> int:
        """The index of column ``name``."""
        return self._index[name]

    @property
    def buffers(self) -> tuple[str, ...]:
        """Every per-element state buffer: ``state``, then the optional one."""
        return self.state + ((self.optional.name,) if self.optional is not None else ())

    @property
    def scalar_state(self) -> dict[str, tuple[float, torch.dtype]]:
        """``key -> (initial value, dtype)`` of the per-tensor scalar state."""
        return {s.name: (s.initial, s.dtype) for s in self.scalars}

    def state_keys(self, gate_value: float) -> tuple[str, ...]:
        """The buffers a tensor has when its ``gate`` column is ``gate_value``."""
        if self.optional is not None and gate_value:
            return self.buffers
        return self.state
