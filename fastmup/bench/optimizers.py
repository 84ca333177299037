"""The optimizers benchmarked: a data-driven list.

Each entry names the fastmup class, the mup function that splits param
groups for it, and torch's class (``None`` where torch/mup have no
equivalent: those implementations are skipped with a note).  An entry whose
fastmup class does not exist (``MuESGD`` before it is written) is skipped
for every implementation.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["OptimizerSpec", "OPTIMIZERS", "get", "fastmup_class"]


@dataclass(frozen=True)
class OptimizerSpec:
    name: str  # CLI / JSON name
    label: str  # table label
    fastmup_name: str  # class in fastmup (or fastmup.optim)
    mup_name: Optional[str]  # mup's optimizer function (the `mup` implementation)
    mup_splitter: Optional[str]  # mup function whose group splitting the torch impls reuse
    torch_name: Optional[str]  # torch.optim class
    hparams: dict[str, Any] = field(default_factory=dict)
    state_buffers: int = 2  # per-tensor state buffers, for the memory estimate only
    read_only_state: tuple[str, ...] = ()  # state buffers a timed step reads but does not write
    note: str = ""  # shown under the table when this optimizer ran
    baseline: str = "torch-fused"  # the implementation speed-ups are relative to
    #: "clip + step" cases: the gradient norm is clipped to this before every
    #: step (fastmup: the optimizer's deferred clip; torch and mup:
    #: torch.nn.utils.clip_grad_norm_(foreach=True) in place); see fastmup.bench.clipping
    clip_max_norm: Optional[float] = None
    #: max rel. error vs the eager reference allowed for this optimizer (None: the dtype's)
    tolerance: Optional[float] = None


CLIP_NOTE = (
    "+ clip: a global gradient-norm clip to 1.0 before each step (fastmup: deferred into the step, float64 norm; "
    "torch/mup: torch.nn.utils.clip_grad_norm_(foreach=True) in place).  The eager reference clips with torch's "
    "float32 norm, which is off by ~1e-4-1e-3 relative at 1e8 parameters (7.5e-4 on GPT-2 small), and Adam's "
    "sign-like first steps turn that coefficient difference into parameter differences where coef*g + wd*p "
    "cancels: the check's tolerance is 1e-2 here (bit-identity with the in-place clip is tested in tests/)"
)
CLIP_TOLERANCE = 1e-2

OPTIMIZERS: dict[str, OptimizerSpec] = {
    s.name: s
    for s in (
        OptimizerSpec("adam", "μAdam", "MuAdam", "MuAdam", "MuAdam", "Adam",
                      dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)),
        OptimizerSpec("adamw", "μAdamW", "MuAdamW", "MuAdamW", "MuAdam", "AdamW",
                      dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)),
        OptimizerSpec("sgd", "μSGD-M", "MuSGD", "MuSGD", "MuSGD", "SGD",
                      dict(lr=1e-2, momentum=0.9, weight_decay=1e-4), state_buffers=1),
        # clip + step: the benchmark's gradients (N(0, 1e-2) per element) have
        # norms far above 1, so every step clips
        OptimizerSpec("adam-clip", "μAdam + clip", "MuAdam", "MuAdam", "MuAdam", "Adam",
                      dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4), clip_max_norm=1.0,
                      tolerance=CLIP_TOLERANCE, note=CLIP_NOTE),
        OptimizerSpec("adamw-clip", "μAdamW + clip", "MuAdamW", "MuAdamW", "MuAdam", "AdamW",
                      dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1), clip_max_norm=1.0,
                      tolerance=CLIP_TOLERANCE, note=CLIP_NOTE),
        # One Hessian-vector product (on each input set's first, untimed step),
        # then plain steps: the timed step reads p, g, m, d and writes p, m.
        OptimizerSpec("esgd", "μESGD-M", "MuESGD", None, None, None,
                      dict(lr=0.1, betas=(0.9, 0.999), weight_decay=1e-4, d_warmup=1, update_d_every=10**9),
                      read_only_state=("exp_avg_d",), baseline="esgd-per-tensor-torch",
                      note="μESGD-M: timed steps are the plain (non-HVP) steps; the one HVP step per input set "
                           "(grads p·a with a random diagonal 'Hessian' a) is untimed"),
    )
}


def get(name: str) -> OptimizerSpec:
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise KeyError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}") from None


def fastmup_class(spec: OptimizerSpec):
    """fastmup's class for ``spec``, or ``None`` when fastmup does not have it."""
    for module in ("fastmup", "fastmup.optim"):
        try:
            cls = getattr(importlib.import_module(module), spec.fastmup_name, None)
        except ImportError:
            cls = None
        if cls is not None:
            return cls
    return None
