"""Helpers for training μP models under DDP, FSDP2 and torch.compile.

μP needs each parameter's ``infshape`` (its base shape) to compute the
optimizer's per-tensor multipliers.  ``infshape`` is a Python attribute of
the parameter object, so anything that *replaces* parameters loses it:

* ``DistributedDataParallel`` keeps the module's parameters: nothing to do.
* FSDP2 (``torch.distributed.fsdp.fully_shard``) swaps every parameter for a
  new ``nn.Parameter`` wrapping a ``DTensor``.  :func:`fastmup.set_base_shapes`
  records the infshapes on the modules (:mod:`fastmup.infshape_registry`),
  and a DTensor's ``shape`` is its *global* shape, so the optimizer finds
  each new parameter's infshape and the multipliers of the unsharded model
  without any extra call.  :func:`reattach_infshapes` re-attaches them
  explicitly (e.g. from a checkpoint's base shapes) and
  :func:`shard_with_mup` shards and re-attaches in one call.

Typical FSDP2 use::

    model = MyModel(width)
    fastmup.set_base_shapes(model, base, delta=delta)
    mesh = init_device_mesh("cuda", (world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = fastmup.MuAdamW(model.parameters(), lr=1e-3)

Checkpoints: save ``fastmup.base_shapes_state(model)`` next to the model and
optimizer state (:func:`checkpoint_extras`) and call
:func:`reattach_infshapes` with it on the freshly built model.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from fastmup.depth import DEPTH_KEY
from fastmup.shape import BaseShapesError, base_shapes_state, set_base_shapes

__all__ = ["reattach_infshapes", "shard_with_mup", "require_base_shapes", "checkpoint_extras", "graph_step"]


def require_base_shapes(model: nn.Module, base_shapes: Optional[Mapping[str, Any]] = None) -> dict:
    """The base shapes of ``model`` (``{name: [base dim or None, ...]}``).

    ``base_shapes`` (e.g. from a checkpoint) wins; else they are read from
    the parameters' infshapes or from what :func:`fastmup.set_base_shapes`
    recorded on the modules.  Raises :class:`fastmup.shape.BaseShapesError`
    with instructions when neither is available.
    """
    if base_shapes is not None:
        return {
            # the depth record (fastmup.set_depth) is plain data already
            k: dict(v) if k == DEPTH_KEY else list(v) if not hasattr(v, "base_shape") else list(v.base_shape())
            for k, v in base_shapes.items()
        }
    try:
        return base_shapes_state(model)
    except BaseShapesError as e:
        raise BaseShapesError(
            f"{e}. μP base shapes must be attached before the model is wrapped or sharded "
            "(fastmup.set_base_shapes(model, base, delta=delta) before fully_shard), or passed "
            "explicitly, e.g. reattach_infshapes(model, checkpoint['base_shapes']) with the dict "
            "saved by fastmup.base_shapes_state(model)"
        ) from None


def reattach_infshapes(model: nn.Module, base_shapes: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """Re-attach ``p.infshape`` to every parameter of ``model`` (no rescaling).

    Call after ``fully_shard`` (or anything else that replaced the parameter
    objects) and before building the optimizer.  Equivalent to
    ``set_base_shapes(model, base_shapes_state(model), rescale_params=False)``;
    DTensor parameters report their global shapes, so the multipliers and
    every ``MuReadout`` width multiplier equal the unsharded model's.
    """
    shapes = require_base_shapes(model, base_shapes)
    set_base_shapes(model, shapes, rescale_params=False)
    return model


def shard_with_mup(
    model: nn.Module,
    *,
    mesh: Any = None,
    submodules: Optional[Iterable[nn.Module]] = None,
    base_shapes: Optional[Mapping[str, Any]] = None,
    **fully_shard_kwargs: Any,
) -> nn.Module:
    """``fully_shard`` each of ``submodules`` then ``model``, keeping μP.

    The base shapes are read *before* sharding (so a model whose infshapes
    are missing fails here, not in the optimizer) and re-attached after.
    Extra keyword arguments go to every ``fully_shard`` call.
    """
    from torch.distributed.fsdp import fully_shard

    shapes = require_base_shapes(model, base_shapes)
    for sub in submodules or ():
        fully_shard(sub, mesh=mesh, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, **fully_shard_kwargs)
    set_base_shapes(model, shapes, rescale_params=False)
    return model


def checkpoint_extras(model: nn.Module) -> dict:
    """What a checkpoint needs besides the state dicts to rebuild μP:
    ``{"base_shapes": base_shapes_state(model)}`` (plain lists, safe for
    ``torch.load(weights_only=True)`` and for DCP)."""
    return {"base_shapes": require_base_shapes(model)}



# ----------------------------------------------------------------------
# torch.compile: an optimizer step as one opaque op (no graph break)
# ----------------------------------------------------------------------
_OPTIMIZERS: dict[int, "weakref.ref"] = {}
_HANDLES = itertools.count()


def _step_tensors(opt) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(params with a grad, their grads, their tensor state) in a fixed order."""
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    grads = [p.grad for p in params]
    state: list[Tensor] = []
    for p in params:
        # opt.state.get, not opt.state[p]: under dynamo an insert into the
        # defaultdict would be replayed after the graph and wipe the state
        # the step just created.
        st = opt.state.get(p)
        if st:
            state += [st[k] for k in sorted(st) if isinstance(st[k], Tensor)]
    return params, grads, state


@torch.library.custom_op("fastmup::optimizer_step", mutates_args=("params", "state"))
def _optimizer_step(handle: int, params: list[Tensor], grads: list[Tensor], state: list[Tensor]) -> None:
    ref = _OPTIMIZERS.get(handle)
    opt = ref() if ref is not None else None
    if opt is None:
        raise RuntimeError("fastmup.distributed.graph_step: the optimizer of this compiled step no longer exists")
    real_p, real_g, real_s = _step_tensors(opt)
    if (len(real_p), len(real_s)) != (len(params), len(state)):
        raise RuntimeError(
            "fastmup.distributed.graph_step: the compiled step was traced with "
            f"{len(params)} params / {len(state)} state tensors, the optimizer now has "
            f"{len(real_p)} / {len(real_s)}"
        )
    # AOTAutograd may hand the op functional copies of the mutated inputs:
    # step on the optimizer's own tensors (its cached plan) and copy in/out
    # where the op's arguments are not those very tensors.
    for r, t in zip(real_p + real_g + real_s, params + grads + state):
        if r is not t:
            r.copy_(t)
    opt.step()
    for r, t in zip(real_p + real_s, params + state):
        if r is not t:
            t.copy_(r)


@_optimizer_step.register_fake
def _(handle: int, params: list[Tensor], grads: list[Tensor], state: list[Tensor]) -> None:
    return None


def graph_step(opt) -> Callable[[], None]:
    """A callable running ``opt.step()`` that dynamo records as one op.

    ``opt.step()`` itself graph-breaks under ``torch.compile`` (it plans on
    the host).  ``step = graph_step(opt)`` can be called inside a function
    compiled with ``fullgraph=True``: the whole step is a single
    ``fastmup::optimizer_step`` custom op (params and state declared
    mutated), executed eagerly with the optimizer's fused backend.  No
    closure, no hooks: ``step()`` is ``opt.step()`` with its defaults.
    The first call and the first call after the optimizer state appears
    compile separately (dynamo guards on the state).  Under AOTAutograd
    the op may receive functional copies; it then copies them in and the
    results out (correct, but extra memory traffic)."""
    handle = next(_HANDLES)
    _OPTIMIZERS[handle] = weakref.ref(opt)

    def step() -> None:
        params, grads, state = _step_tensors(opt)
        torch.ops.fastmup.optimizer_step(handle, params, grads, state)

    return step
