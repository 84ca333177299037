"""ESGD-M with μP: equilibrated SGD with quasi-hyperbolic momentum.

ESGD-M (Crowson) preconditions SGD-with-momentum by ``sqrt(d)``, an
estimate of ``diag(H²)`` (the equilibration preconditioner, the row norms of
the Hessian) built from occasional Hessian-vector products with Rademacher
probes: ``E[(Hz)_i²] = Σ_j H_ij²``.  The user calls::

    loss.backward(create_graph=opt.should_create_graph())
    opt.step()

The math (ALGORITHMS.md §2)
---------------------------
Global, per optimizer: ``steps`` and ``steps_since_d``;
``should_create_graph() = steps < d_warmup or steps_since_d >= update_d_every``
(with the defaults the HVP runs on calls 0..19, 29, 39, ...).  On an HVP step
one probe ``z`` (±1, the grads' dtype) is drawn for every parameter with a
gradient and ``hvp = autograd.grad(grads, params, grad_outputs=z)`` is ONE
call over all of them (the full Hessian, cross-parameter blocks included).

Per tensor, with ``lr`` and ``wd`` already multiplied by its μP factors, the
``variant="ema"`` step (the seed, the default) is::

    m   = β1·m + (1-β1)·g ;                       bc1 = bc1·β1
    if HVP step:  d = β2·d + (1-β2)·hvp² ;          bc2 = bc2·β2
    denom = sqrt(d) / sqrt(1 - bc2) + eps
    cum = cum·lr_warmup ;                         step_size = lr·(1 - cum)
    m̃   = v·m + (1-v)·g ;                         qhm = 1 - bc1·v
    p   = p·(1 - wd·step_size)
    p   = p - (step_size / qhm) · m̃ / denom

``variant="max"`` (the original's later version): ``d = max(β2·d, hvp²)``
with no bias correction (``denom = sqrt(d) + eps``), Nesterov momentum only
(``v = β1``; another ``v`` is an error) and ``cum`` advanced on HVP steps
only.

**A tensor that has not seen an HVP yet does not move** (neither the step nor
the weight decay; its ``m``, ``bc1`` and ``cum`` advance as usual).  The seed
divides ``0/0`` there (``bc2 = 1``): a parameter whose first gradient comes
on a non-HVP step (a branch unused during the warm-up, a param group added
later) turned into NaN.  "Has seen an HVP" is ``exp_avg_d_bias_corr != 1``,
so the rule needs no extra state; in the max variant that column is kept
(``β2^k``) for this purpose only.

Probes come from the counter-based generator of
:mod:`fastmup.optim.rademacher`, never from the global torch RNG: the sign of
element ``e`` of parameter number ``k`` (its position in the optimizer's
parameter list) on the ``c``-th HVP step is a hash of ``(seed, c, k, e)``,
computed identically by the eager path (torch integer ops) and the Triton
kernel.  ``seed`` (constructor) and ``c`` (``probe_counter``) are saved in
``state_dict()["esgd"]`` with ``steps`` and ``steps_since_d``, so a resumed
run is bit-identical.

μP: how ESGD-M's learning rate scales with width
-------------------------------------------------
The preconditioned update is invariant to a constant multiplier on a
parameter (``g ∝ a``, ``H ∝ a²``), so only the sizes of ``g`` and of the
Hessian rows matter.  In μP every gradient entry of a width-``n`` tensor is
``Θ(1/n)`` (as for Adam), but the Hessian row norm ``sqrt(d_ij)`` is not:
besides the Gauss-Newton part (``Θ(1/n)``) each row has a cross-layer block
coupling ``W_ij`` to the ``n`` weights of the neighbouring layer through the
activation (``∂²L/∂W2_ij ∂W1_jl = δ_i·φ'(h_j)·x_l``): ``n`` entries of size
``Θ(1/n)``, a row norm of ``Θ(1/√n)``.  It dominates at large width, so
``g/sqrt(d) = Θ(1/√n)`` per entry: halfway between SGD (``Θ(1/n)``) and Adam
(``Θ(1)``).  Keeping every layer's feature change ``Θ(1)`` then needs

===============================  ==================  =================
tensor (by ``ninf``)             lr                  weight decay
===============================  ==================  =================
0 (finite, e.g. readout bias)    η                   λ
1 (vectors, input, readout)      η·√m                λ/√m
2 (hidden matrices)              η/√m_in             λ·√m_in
===============================  ==================  =================

the geometric mean of mup's SGD and Adam rules (``family = "esgd"`` in
:mod:`fastmup.optim.multipliers`; η·√m_out/m_in for non-square matrices),
with weight decay scaled inversely so that the decay per step
``wd·step_size`` is width-independent.  The coordinate check behind it
(``docs/esgd_mup.md``, ``tests/optim/test_esgd.py``): an MLP with two hidden
matrices trained 5 steps with the default hyperparameters keeps every
layer's coordinates and their change from init within 1.7x and 2x from width
64 to 2048, where Adam's rule lets the changes vanish (5x) and SGD's makes
them explode (45x).  Caveat: a tensor whose Hessian row has no width-sized
block (the single hidden matrix of a one-hidden-matrix MLP; the last hidden
bias of a ReLU net) has Adam-like Θ(1/n) curvature and is over-updated by
√m under this rule; give it ``param_lr_scales`` of ``m ** -0.5``.

The per-tensor table and state
------------------------------
Columns of ``batch.rows`` (float64, μP applied): ``SPEC.columns``.  State
buffers: ``exp_avg`` (m), ``exp_avg_d`` (d), in ``state_dtype``.  Per-tensor
scalar state (``MuOptimizer.scalar_state`` columns, ``state[p][key]`` are
0-d views):

* ``step`` — float32, torch's convention (exact to 2**24 steps);
* ``exp_avg_bias_corr`` (β1^t), ``exp_avg_d_bias_corr`` (β2^k) and
  ``lr_warmup_cumprod`` — **float64**: all three enter as ``1 - x`` with
  ``x`` close to 1 early on (``1 - 0.999^k``, ``1 - 0.99^t``), where a float32
  running product would lose 3-4 significant digits to cancellation (more
  with long warm-ups such as ``lr_warmup = 0.9999``) and accumulate one
  rounding per step.  In float64 the running product is exact to ~1e-15,
  every backend multiplies the same doubles, and the single rounding to
  float32 happens when the per-step factors are formed.

:func:`tensor_scalars` turns a row and the old scalars into the new scalars
and the float32 factors of the element update; both backends (and a C++
functor: ``prepare(row, scalars, hvp_step) -> Scalars``) compute exactly this,
then run the element update of :func:`_single_tensor_esgd`.

Unlike Adam's entry point, :func:`esgd` advances the per-tensor scalar state
itself (the optimizer does not ``steps.add_(1)`` first): the fused kernel
reads the old values and writes the new ones in the same launch (see
``fastmup.kernels.esgd``), so a step is one launch per dtype signature.

Backends: ``eager`` (this module, any device), ``triton`` (CUDA), and the
csrc functor ``EsgdOp`` (``csrc/esgd_math.h``) as ``cpu`` (host threads; the
scalar state advances after the parallel pass) and ``cuda`` (one launch; the
last block of each tensor writes its new scalar state back, as the Triton
kernel).  ``backend="auto"`` resolves as for Adam: ``triton`` on CUDA,
``cpu`` on CPU when the host extension can be built, else ``eager``.  The
csrc backends draw the probes with the Triton kernel (CUDA) or the eager
generator: the same signs either way.
:func:`esgd_per_tensor_torch` is the seed's step as plain per-tensor torch
ops in the storage dtype: the unfused baseline for benchmarks.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor
from typing_extensions import Unpack

from fastmup.optim import backend as backends
from fastmup.optim import rademacher
from fastmup.optim.multipliers import ONE, Multiplier
from fastmup.optim.checks import check_betas, check_lr, check_nonnegative
from fastmup.optim.clip import clipped
from fastmup.optim.optimizer import MuOptimizer, MuOptions, group_defaults
from fastmup.optim.reference import skips_step, store, unscaled
from fastmup.plan.batch import TensorBatch, math_dtype
from fastmup.plan.spec import AlgorithmSpec, ReadOnlyInput, ScalarState

__all__ = ["MuESGD", "ESGD", "esgd", "draw_probes", "tensor_scalars", "esgd_per_tensor_torch", "SPEC", "VARIANTS"]

VARIANTS = ("ema", "max")
#: ESGD-M's contract with every backend (``fastmup.kernels.esgd``, ``EsgdOp``
#: of ``csrc/esgd_math.h``, the reference below); see the module docstring
#: for the float64 running products.
SPEC = AlgorithmSpec(
    name="esgd",
    columns=("lr", "weight_decay", "beta1", "beta2", "v", "lr_warmup", "eps", "variant"),
    state=("exp_avg", "exp_avg_d"),
    scalars=(
        ScalarState("step", 0.0, torch.float32),
        ScalarState("exp_avg_bias_corr", 1.0, torch.float64),
        ScalarState("exp_avg_d_bias_corr", 1.0, torch.float64),
        ScalarState("lr_warmup_cumprod", 1.0, torch.float64),
    ),
    inputs=(ReadOnlyInput("hvp", like="grad"),),
    kernel="esgd",
    functor="EsgdOp",
    advances_scalars=True,
)
PRODUCTS = ("exp_avg_bias_corr", "exp_avg_d_bias_corr", "lr_warmup_cumprod")


# ----------------------------------------------------------------------
# per-tensor scalars: the part a C++ functor's prepare() mirrors
# ----------------------------------------------------------------------
class TensorScalars(NamedTuple):
    """One tensor's step, from its row and old scalar state (float64 math).

    ``bc1``, ``bc2``, ``cum``, ``step``: the new scalar state.  ``started``:
    the tensor has seen an HVP (``bc2 != 1``); if not, ``p`` is left alone.
    The rest are the factors of the element update, each rounded once to
    float32 by the consumer.
    """

    bc1: float
    bc2: float
    cum: float
    step: float
    started: bool
    is_max: bool
    lerp_m: float  # 1 - β1: m = lerp(m, g, 1-β1)
    beta2: float
    one_minus_beta2: float
    bc2_sqrt: float  # sqrt(1 - bc2) (ema), 1 (max)
    eps: float
    lerp_qhm: float  # 1 - v: m̃ = lerp(m, g, 1-v)
    decay: float  # 1 - wd·step_size
    coef: float  # -step_size / (1 - bc1·v)


def tensor_scalars(row: Sequence[float], bc1: float, bc2: float, cum: float, step: float, hvp_step: bool) -> TensorScalars:
    """Advance one tensor's scalar state and form its update factors."""
    lr, wd, beta1, beta2, v, lr_warmup, eps, variant = (float(x) for x in row)
    is_max = variant != 0.0
    if is_max:
        v = beta1
    bc1 = bc1 * beta1
    if hvp_step:
        bc2 = bc2 * beta2
    if hvp_step or not is_max:
        cum = cum * lr_warmup
    started = bc2 != 1.0
    step_size = lr * (1.0 - cum)
    bc2_sqrt = 1.0 if is_max else math.sqrt(1.0 - bc2)
    return TensorScalars(
        bc1=bc1,
        bc2=bc2,
        cum=cum,
        step=step + 1.0,
        started=started,
        is_max=is_max,
        lerp_m=1.0 - beta1,
        beta2=beta2,
        one_minus_beta2=1.0 - beta2,
        bc2_sqrt=bc2_sqrt,
        eps=eps,
        lerp_qhm=1.0 - v,
        decay=1.0 - wd * step_size,
        coef=-(step_size / (1.0 - bc1 * v)),
    )


# ----------------------------------------------------------------------
# the optimizers
# ----------------------------------------------------------------------
def _owners(batch: TensorBatch) -> list:
    """The optimizer's parameters of a batch (``batch.params`` may hold their local shards)."""
    return getattr(batch, "owners", None) or batch.params


try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch without distributed support
    _DTensor = None


def _is_dtensor(t: Tensor) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


class MuESGD(MuOptimizer):
    """ESGD-M with μP per-tensor learning rates (see the module docstring).

    Args:
        params: parameters (with ``infshape``: call ``fastmup.set_base_shapes``
            first) or param groups.
        lr, betas, v, lr_warmup, eps, weight_decay, update_d_every, d_warmup:
            as the original ESGD-M (``v=None``: ``β1``, Nesterov momentum).
        variant: ``"ema"`` (the seed: EMA of hvp² with bias correction) or
            ``"max"`` (decayed running max, no bias correction, Nesterov only,
            warm-up counted on HVP steps).  Per param group.
        seed: seed of the probes' counter-based generator (any int; the
            global torch RNG is never used).
        decoupled_wd: do not rescale weight decay with width (mup's switch).
        options: the fastmup options of :class:`~fastmup.optim.MuOptimizer`:
            ``backend`` (``"auto"``, ``"eager"``, ``"triton"``, ``"cpu"`` or
            ``"cuda"``), ``state_dtype`` (dtype of ``exp_avg`` / ``exp_avg_d``,
            default the param's), ``param_lr_scales`` (extra per-tensor lr
            factors).  The low-precision ones (``stochastic_rounding``,
            ``master_weights``, ``rounding_seed``) are not supported by ESGD-M
            (its fused kernels and HVP step read the parameters as stored);
            any value but the default raises ``NotImplementedError`` naming it.

    Depth: no depth rule is derived for ESGD-M (its Hessian preconditioner
    sees the branch multiplier of :func:`fastmup.set_depth` squared), so a
    tensor declared inside residual blocks with α > 0 raises
    ``NotImplementedError``; α = 0 (μP alone) works as without ``set_depth``.

    ``update_d_every`` and ``d_warmup`` are optimizer-wide (the HVP decision
    is global).  ``state_dict()`` adds a top-level ``"esgd"`` entry with the
    global counters and the probe generator's seed and counter, so a resumed
    run is bit-identical; a state dict of the original (``"global_state"``)
    loads too.
    """

    family = "esgd"
    spec = SPEC
    # the fused ESGD-M kernels advance every tensor's scalar state: a tensor
    # without a gradient leaves the plan instead
    _skips_tensors_without_grad = False
    _storage_modes = False

    def __init__(
        self,
        params: Iterable,
        lr: float = 1.0,
        betas: Tuple[float, float] = (0.9, 0.999),
        v: Optional[float] = None,
        lr_warmup: float = 0.99,
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        update_d_every: int = 10,
        d_warmup: int = 20,
        *,
        variant: str = "ema",
        seed: int = 0,
        decoupled_wd: bool = False,
        **options: Unpack[MuOptions],
    ) -> None:
        defaults = group_defaults(locals(), optimizer_wide=("update_d_every", "d_warmup", "seed"))
        for name, value in (("update_d_every", update_d_every), ("d_warmup", d_warmup)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}={value!r}: must be an int >= 1")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Invalid seed={seed!r}: must be an int")
        self.update_d_every = update_d_every
        self.d_warmup = d_warmup
        self.steps = 0
        self.steps_since_d = 0
        self.probe_seed = seed
        self.probe_counter = 0
        self._hvp_step = False
        super().__init__(params, defaults, **options)

    # ------------------------------------------------------------------
    # subclass interface of MuOptimizer
    # ------------------------------------------------------------------
    def _validate(self, group: Mapping[str, Any]) -> None:
        check_lr(group)
        check_nonnegative(group, "eps", "epsilon value")
        check_betas(group)
        check_nonnegative(group, "weight_decay", "weight_decay value")
        betas = group["betas"]
        v = group["v"]
        if v is not None and not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"Invalid v={v}: must be in [0, 1] (or None for v = beta1)")
        if not 0.0 <= group["lr_warmup"] < 1.0:
            raise ValueError(f"Invalid lr_warmup={group['lr_warmup']}: must be in [0, 1)")
        variant = group["variant"]
        if variant not in VARIANTS:
            raise ValueError(f"Invalid variant={variant!r}: must be one of {VARIANTS}")
        if variant == "max" and v is not None and float(v) != float(betas[0]):
            raise ValueError(f"variant='max' uses Nesterov momentum only (v = beta1 = {betas[0]}); got v={v}")

    def _group_values(self, group: Mapping[str, Any]) -> dict[str, float]:
        beta1, beta2 = group["betas"]
        v = group["v"]
        return dict(
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            beta1=beta1,
            beta2=beta2,
            v=beta1 if v is None or group["variant"] == "max" else v,
            lr_warmup=group["lr_warmup"],
            eps=group["eps"],
            variant=VARIANTS.index(group["variant"]),
        )

    def _update(self, batch: TensorBatch, grad_scale: Optional[Tensor], found_inf: Optional[Tensor], **inputs) -> None:
        esgd(batch, backend=batch.backend, grad_scale=grad_scale, found_inf=found_inf, **inputs)

    # ------------------------------------------------------------------
    # the HVP schedule
    # ------------------------------------------------------------------
    def should_create_graph(self) -> bool:
        """Whether the next :meth:`step` computes a Hessian-vector product, so
        the backward before it needs ``create_graph=True``::

            loss.backward(create_graph=opt.should_create_graph())
        """
        return self.steps < self.d_warmup or self.steps_since_d >= self.update_d_every

    def _check_step(self) -> None:
        """Every step, before anything is mutated: on an HVP step every
        gradient needs its autograd graph; sharded params are refused."""
        self._hvp_step = self.should_create_graph()
        for p, g, where in self._with_grads():
            if _is_dtensor(p):
                raise NotImplementedError(
                    f"{where()} is a DTensor: ESGD-M does not support sharded (FSDP2 / DTensor) parameters yet"
                )
            if self._hvp_step and g.grad_fn is None and g.layout == torch.strided:
                raise RuntimeError(
                    f"{where()}: its gradient has no autograd graph, but this step computes a Hessian-vector "
                    "product. Call loss.backward(create_graph=opt.should_create_graph()) (create_graph=True "
                    "on this step). Gradient accumulation is not supported on such steps: every backward "
                    "that contributes to the gradient needs create_graph=True. (A parameter the loss depends "
                    "on only linearly has a constant gradient with no graph even then: optimise it with "
                    "another optimizer.)"
                )

    def _step_inputs(self, batches: list[TensorBatch]) -> list[dict[str, Any]]:
        """On an HVP step: one probe launch per batch and one HVP over all
        params; each batch's update gets its tensors' HVPs."""
        if not self._hvp_step:
            return [{"hvps": None} for _ in batches]
        probes_of = {}
        for batch in batches:
            probes = draw_probes(batch, self.probe_seed, self.probe_counter, backend=batch.backend)
            probes_of.update(zip(map(id, _owners(batch)), probes))
        params = [p for p, _, _ in self._with_grads()]
        with torch.enable_grad():
            hvps = torch.autograd.grad(
                [p.grad for p in params], params, grad_outputs=[probes_of[id(p)] for p in params], allow_unused=True
            )
        hvps_of = {id(p): h for p, h in zip(params, hvps)}
        return [{"hvps": [hvps_of[id(p)] for p in _owners(batch)]} for batch in batches]

    def _after_step(self) -> None:
        if self._hvp_step:
            self.steps_since_d = 0
            self.probe_counter += 1
        self.steps += 1
        self.steps_since_d += 1

    # ------------------------------------------------------------------
    # state_dict: global counters and the probe generator
    # ------------------------------------------------------------------
    def _global_state(self) -> dict[str, int]:
        return {
            "steps": self.steps,
            "steps_since_d": self.steps_since_d,
            "probe_seed": self.probe_seed,
            "probe_counter": self.probe_counter,
            "update_d_every": self.update_d_every,
            "d_warmup": self.d_warmup,
        }

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["esgd"] = self._global_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get("esgd")
        if extra is None and "global_state" in state_dict:  # the original ESGD-M's format
            extra = dict(state_dict["global_state"])
        super().load_state_dict(state_dict)
        if extra is not None:
            for key in ("steps", "steps_since_d", "probe_seed", "probe_counter", "update_d_every", "d_warmup"):
                if key in extra:
                    setattr(self, key, int(extra[key]))


class ESGD(MuESGD):
    """ESGD-M without μP: every tensor uses the group's ``lr`` and
    ``weight_decay`` (times ``param_lr_scales``); params need no ``infshape``.
    Same signature and behaviour as :class:`MuESGD` otherwise."""

    def _group_multipliers(self, tensors: list, group: Mapping[str, Any], group_index: int) -> dict:
        mults = {}
        for p in tensors:
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer params must be Tensors, got {type(p).__name__} in param group {group_index}")
            scale = self._lr_scales.get(p)
            mults[p] = (Multiplier(scale, 1.0) if scale is not None else ONE, ONE)
        return mults


# ----------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------
def draw_probes(batch: TensorBatch, seed: int, counter: int, *, backend: str = "eager") -> list[Tensor]:
    """The Rademacher probes of every tensor of ``batch`` for draw ``counter``.

    Tensor ``i`` gets ``fastmup.optim.rademacher`` signs with tensor id
    ``batch.index[i]`` (its position in the optimizer's parameter list), so
    the probes do not depend on how tensors are grouped into batches.  One
    contiguous tensor per param, in the grads' dtype.  ``triton``: one launch.
    """
    prefix = rademacher.draw_prefix(seed, counter)
    if backend in ("cpu", "cuda"):
        # the csrc backends have no probe kernel: the Triton one on CUDA when
        # it is there (one launch), else the eager generator (same signs)
        backend = "triton" if backend == "cuda" and backends.triton_available() else "eager"
    if backend == "eager":
        return [
            rademacher.fill_rademacher_(torch.empty(g.shape, dtype=g.dtype, device=g.device), seed, counter, tid, prefix=prefix)
            for g, tid in zip(batch.grads, batch.index)
        ]
    return backends.launcher(backend, "rademacher")(batch, prefix=prefix)


def esgd(
    batch: TensorBatch,
    *,
    backend: str = "eager",
    hvps: Optional[Sequence[Optional[Tensor]]] = None,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    """Apply one ESGD-M step to every tensor of ``batch``.

    ``hvps``: on an HVP step, the Hessian-vector product of each tensor
    (``None`` entries: zero, a tensor the gradients do not depend on);
    ``None`` on other steps.  Advances the per-tensor scalar state
    (``step`` and the three running products) itself.  ``grad_scale``
    divides grads and HVPs; a nonzero ``found_inf`` skips the whole step.
    """
    if hvps is not None:
        hvps = _hvp_inputs(batch, hvps)
    if backend == "eager":
        _single_tensor_esgd(batch, hvps=hvps, grad_scale=grad_scale, found_inf=found_inf)
    else:
        backends.launcher(backend, "esgd")(batch, hvps=hvps, grad_scale=grad_scale, found_inf=found_inf)


def _hvp_inputs(batch: TensorBatch, hvps: Sequence[Optional[Tensor]]) -> list[Tensor]:
    """Each tensor's HVP as every backend reads it: a contiguous tensor in
    the dtype ``SPEC`` declares for the ``hvp`` input, the grads' (autograd
    returns the HVP in it: the HVP is a gradient of ``<grad, z>``); zeros for a
    tensor the gradients do not depend on (``None``)."""
    if len(hvps) != len(batch):
        raise ValueError(f"esgd: {len(hvps)} HVPs for a batch of {len(batch)} tensors")
    dtype = batch.input_dtype("hvp")
    return [
        torch.zeros(p.shape, dtype=dtype, device=p.device) if h is None else h.to(dtype).contiguous()
        for p, h in zip(batch.params, hvps)
    ]


def _single_tensor_esgd(
    batch: TensorBatch,
    *,
    hvps: Optional[Sequence[Optional[Tensor]]],
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
) -> None:
    """The reference: one tensor at a time, plain torch ops.

    Math in float32 on float32 copies (float64 if any of param, grad or
    state is float64), one rounding per stored tensor; the scalars of
    :func:`tensor_scalars` in float64, rounded once to the math dtype by
    torch when they meet a tensor.
    """
    if skips_step(found_inf):
        return
    hvp_step = hvps is not None
    columns = {k: batch.scalars[k].tolist() for k in ("step",) + PRODUCTS}
    new = {k: list(v) for k, v in columns.items()}
    exp_avgs, exp_avg_ds = batch.state["exp_avg"], batch.state["exp_avg_d"]
    for i, (p, g) in enumerate(zip(batch.params, batch.grads)):
        s = tensor_scalars(
            batch.rows[i],
            columns["exp_avg_bias_corr"][i],
            columns["exp_avg_d_bias_corr"][i],
            columns["lr_warmup_cumprod"][i],
            columns["step"][i],
            hvp_step,
        )
        new["exp_avg_bias_corr"][i], new["exp_avg_d_bias_corr"][i] = s.bc1, s.bc2
        new["lr_warmup_cumprod"][i], new["step"][i] = s.cum, s.step
        dtype = math_dtype(p.dtype, g.dtype, exp_avgs[i].dtype)
        # a deferred clip scales the gradient only (the HVP comes from autograd, as with an in-place clip)
        param, grad = p.to(dtype), unscaled(clipped(g, batch.grad_clip), dtype, grad_scale)
        exp_avg, exp_avg_d = exp_avgs[i].to(dtype), exp_avg_ds[i].to(dtype)
        exp_avg.lerp_(grad, s.lerp_m)
        if hvp_step:
            hvp = unscaled(hvps[i], dtype, grad_scale)
            if s.is_max:
                torch.maximum(exp_avg_d.mul_(s.beta2), hvp * hvp, out=exp_avg_d)
            else:
                exp_avg_d.mul_(s.beta2).addcmul_(hvp, hvp, value=s.one_minus_beta2)
        if s.started:
            denom = (exp_avg_d.sqrt() / s.bc2_sqrt).add_(s.eps)
            m_est = torch.lerp(exp_avg, grad, s.lerp_qhm)
            param.mul_(s.decay).addcdiv_(m_est, denom, value=s.coef)
        store((p, param), (exp_avgs[i], exp_avg), (exp_avg_ds[i], exp_avg_d))
    for key, values in new.items():
        column = batch.scalars[key]
        column.copy_(torch.tensor(values, dtype=column.dtype))


# ----------------------------------------------------------------------
# the seed, as plain per-tensor torch ops (the benchmark's baseline)
# ----------------------------------------------------------------------
def esgd_per_tensor_torch(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_ds: Sequence[Tensor],
    scalars: Sequence[dict],
    hvps: Optional[Sequence[Tensor]] = None,
    **hyperparameters: Any,
) -> None:
    """One ESGD-M step written as the original does it: a Python loop over
    tensors, torch ops in the storage dtype, scalar state as Python floats.

    ``hyperparameters``: ``lr``, ``betas``, ``v``, ``lr_warmup``, ``eps``,
    ``weight_decay`` and ``variant``, as :class:`MuESGD` takes them and
    with its defaults.  ``scalars[i]`` is a dict with ``exp_avg_bias_corr``,
    ``exp_avg_d_bias_corr`` and ``lr_warmup_cumprod`` (start at 1.0),
    updated in place; ``hvps`` is given on HVP steps.  No μP (pass the
    per-tensor lr yourself), no AMP.  The only departure from the seed is
    the no-NaN rule (no update before a tensor's first HVP).  Meant as the
    unfused baseline of benchmarks; the optimizer does not use it.
    """
    hp = _baseline_defaults()
    unknown = sorted(set(hyperparameters) - set(hp))
    if unknown:
        raise TypeError(f"esgd_per_tensor_torch: unknown hyperparameters {unknown}; known: {sorted(hp)}")
    hp.update(hyperparameters)
    lr, v, lr_warmup, eps, weight_decay = hp["lr"], hp["v"], hp["lr_warmup"], hp["eps"], hp["weight_decay"]
    beta1, beta2 = hp["betas"]
    is_max = hp["variant"] == "max"
    if v is None or is_max:
        v = beta1
    for i, (p, grad) in enumerate(zip(params, grads)):
        st = scalars[i]
        exp_avg, exp_avg_d = exp_avgs[i], exp_avg_ds[i]
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        st["exp_avg_bias_corr"] *= beta1
        if hvps is not None:
            hvp = hvps[i]
            if is_max:
                torch.maximum(exp_avg_d.mul_(beta2), hvp * hvp, out=exp_avg_d)
            else:
                exp_avg_d.mul_(beta2).addcmul_(hvp, hvp, value=1 - beta2)
            st["exp_avg_d_bias_corr"] *= beta2
        if hvps is not None or not is_max:
            st["lr_warmup_cumprod"] *= lr_warmup
        if st["exp_avg_d_bias_corr"] == 1.0:
            continue
        if is_max:
            denom = exp_avg_d.sqrt().add_(eps)
        else:
            denom = (exp_avg_d.sqrt() / math.sqrt(1 - st["exp_avg_d_bias_corr"])).add_(eps)
        step_size = lr * (1 - st["lr_warmup_cumprod"])
        exp_avg_est = torch.lerp(exp_avg, grad, 1 - v)
        qhm_bias_corr = 1 - st["exp_avg_bias_corr"] * v
        p.mul_(1 - weight_decay * step_size)
        p.addcdiv_(exp_avg_est, denom, value=-step_size / qhm_bias_corr)


@functools.lru_cache(maxsize=None)
def _baseline_hyperparameters() -> tuple[tuple[str, Any], ...]:
    # MuESGD's signature is the one place the defaults are written
    names = ("lr", "betas", "v", "lr_warmup", "eps", "weight_decay", "variant")
    parameters = inspect.signature(MuESGD).parameters
    return tuple((name, parameters[name].default) for name in names)


def _baseline_defaults() -> dict[str, Any]:
    return dict(_baseline_hyperparameters())
