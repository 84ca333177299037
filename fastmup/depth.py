"""Depth scaling: CompleteP and depth-μP on top of μP's width scaling.

μP makes the best hyperparameters independent of the width.  Across depth
the residual stream of a network with ``L`` residual blocks needs its own
rules (Yang et al., "Tensor Programs VI", arXiv 2310.02244; Dey et al.,
"Don't be lazy: CompleteP enables compute-efficient deep transformers",
arXiv 2505.01618, Table 1).  With ``L_base`` the depth the hyperparameters
were tuned at, ``m_L = L / L_base`` and ``α`` the depth exponent:

* forward: every residual branch is scaled, ``x ← x + m_L^(-α) · F(x)``
  (attention and MLP branch alike); the init is unchanged;
* the optimizers scale the learning rate (and weight decay, Adam's ε) of
  every tensor inside the residual blocks: the table is in
  :mod:`fastmup.optim.multipliers`.  Embeddings, the final norm and the
  readout keep μP's width rule.

``α = 1`` is CompleteP, ``α = ½`` depth-μP; ``α = 0`` switches depth
scaling off (branch multiplier 1, no optimizer factor: exactly μP).  The
rules are stated for ``α ∈ [½, 1]``; below ½ the residual stream grows with
depth at init, so other values are refused.

Declaring depth::

    model = GPT(width, n_layers=24)
    fastmup.set_base_shapes(model, base, delta=delta)      # width, as always
    fastmup.set_depth(model, blocks=model.blocks, base_depth=4, alpha=1.0)
    opt = fastmup.MuAdamW(model.parameters(), lr=lr)        # depth rules applied

The base and delta models of ``set_base_shapes`` have the depth of the target
(their parameter names must match); the base *depth* is a number.

The change to a transformer block: put a :class:`BranchMultiplier` after each
branch (``set_depth`` sets every one inside the blocks to ``m_L^(-α)``)::

    class Block(nn.Module):
        def __init__(self, d):
            ...
            self.attn_scale = fastmup.BranchMultiplier()
            self.mlp_scale = fastmup.BranchMultiplier()

        def forward(self, x):
            x = x + self.attn_scale(self.attn(self.ln1(x)))
            return x + self.mlp_scale(self.mlp(self.ln2(x)))

or multiply by ``fastmup.branch_multiplier(self)`` in the forward.  Both are
1 until ``set_depth`` is called (so the model is its standard self), and a
multiplier of exactly 1 returns its input unchanged.

Where it is kept: every parameter inside the blocks gets ``p.infshape.depth``
(a :class:`DepthInfo`) on its infshape, which travels wherever the infshape
does (``copy.deepcopy``, pickling, FSDP2's new parameters via the module
records of :mod:`fastmup.infshape_registry`); each block module holds the same
record; :func:`fastmup.base_shapes_state` saves it under the key
:data:`DEPTH_KEY` and ``set_base_shapes(model, state, rescale_params=False)``
restores it.  ``.bsh`` files (mup's format) hold width only.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

from torch import Tensor, nn

from fastmup.infshape_registry import find_infshape

__all__ = [
    "DepthInfo",
    "BranchMultiplier",
    "set_depth",
    "branch_multiplier",
    "depth_info",
    "depth_state",
    "DEPTH_KEY",
]

#: Key of the depth record in :func:`fastmup.base_shapes_state` (never a
#: parameter name: those are dotted identifiers).
DEPTH_KEY = "__depth__"

# Attribute of a block module (in its __dict__, so it survives deepcopy and
# FSDP2's class swap) holding its DepthInfo.
_BLOCK_ATTR = "_fastmup_depth"


@dataclass(frozen=True)
class DepthInfo:
    """The depth of a model as the residual blocks see it.

    ``depth`` is the number of residual blocks ``L``, ``base_depth`` the depth
    ``L_base`` the hyperparameters were tuned at, ``alpha`` the exponent α.
    """

    depth: int
    base_depth: int
    alpha: float

    @property
    def mult(self) -> float:
        """``m_L = L / L_base``."""
        return self.depth / self.base_depth

    @property
    def branch_multiplier(self) -> float:
        """``m_L^(-α)``: the factor of every residual branch (exactly 1 when α = 0)."""
        return 1.0 if self.alpha == 0 else self.mult ** (-self.alpha)

    def state(self) -> Dict[str, Any]:
        return {"depth": int(self.depth), "base_depth": int(self.base_depth), "alpha": float(self.alpha)}


class BranchMultiplier(nn.Module):
    """``x ↦ m_L^(-α) · x``: the scale of one residual branch.

    ``multiplier`` is a plain float (1 until :func:`set_depth` sets it), so
    that ``torch.compile`` sees a constant and ``state_dict`` is unchanged.
    A multiplier of exactly 1 returns ``x`` itself.
    """

    def __init__(self) -> None:
        super().__init__()
        self.multiplier = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return x if self.multiplier == 1.0 else x * self.multiplier

    def extra_repr(self) -> str:
        return f"multiplier={self.multiplier:g}"


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"set_depth: alpha must be a real number, got {alpha!r}")
    alpha = float(alpha)
    if alpha != 0 and not 0.5 <= alpha <= 1:
        raise ValueError(
            f"set_depth: alpha={alpha:g} is outside [0.5, 1] (1: CompleteP, 0.5: depth-μP; 0 switches depth "
            "scaling off); below 0.5 the residual stream grows with depth at initialization"
        )
    return alpha


def _check_depth(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"set_depth: {name} must be a positive int, got {value!r}")
    return int(value)


def _block_names(model: nn.Module, blocks: Iterable[nn.Module]) -> List[str]:
    if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise TypeError(
            "set_depth: blocks must be the residual blocks (an nn.ModuleList, nn.Sequential or a list of "
            f"modules), got a single {type(blocks).__name__}"
        )
    blocks = list(blocks)
    if not blocks:
        raise ValueError("set_depth: blocks is empty; pass the model's residual blocks")
    names = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)
    out = []
    for i, b in enumerate(blocks):
        if not isinstance(b, nn.Module):
            raise TypeError(f"set_depth: blocks[{i}] is a {type(b).__name__}, not an nn.Module")
        if id(b) not in names:
            raise ValueError(f"set_depth: blocks[{i}] ({type(b).__name__}) is not a submodule of the model")
        out.append(names[id(b)])
    if len(set(out)) != len(out):
        raise ValueError("set_depth: a block appears twice in blocks")
    for a in out:
        for b in out:
            if a != b and (a == "" or b.startswith(a + ".")):
                raise ValueError(f"set_depth: block {b!r} lies inside block {a!r}; pass the residual blocks themselves")
    return out


def _inside(name: str, prefixes: List[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def set_depth(
    model: nn.Module,
    blocks: Union[Iterable[nn.Module], Iterable[str]],
    base_depth: int,
    alpha: float = 1.0,
) -> DepthInfo:
    """Declare the residual blocks of ``model`` and its base depth.

    Args:
        model: a model whose base shapes are set (:func:`fastmup.set_base_shapes`).
        blocks: its residual blocks, e.g. ``model.transformer.h`` (modules, or
            their names in ``model.named_modules()``); ``L = len(blocks)``.
        base_depth: the depth ``L_base`` whose hyperparameters are to transfer.
        alpha: the depth exponent α (1: CompleteP, 0.5: depth-μP; 0: off).

    Records ``DepthInfo(L, L_base, α)`` on the infshape of every parameter
    inside the blocks (``p.infshape.depth``) and on the blocks, and sets every
    :class:`BranchMultiplier` inside them to ``m_L^(-α)``.  A second call
    replaces the first.  Everything is checked before anything changes; a
    parameter without base shapes, or one that is shared between a block and
    the rest of the model, is an error naming it.  Build the optimizer after
    this call: it reads the records when its param groups are added.

    Returns the :class:`DepthInfo`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"set_depth expects an nn.Module, got {type(model).__name__}")
    alpha = _check_alpha(alpha)
    base_depth = _check_depth(base_depth, "base_depth")
    blocks = list(blocks) if not isinstance(blocks, nn.Module) else blocks
    if isinstance(blocks, list) and blocks and all(isinstance(b, str) for b in blocks):
        modules = dict(model.named_modules())
        missing = [b for b in blocks if b not in modules]
        if missing:
            raise ValueError(f"set_depth: no module named {missing[0]!r} in the model")
        blocks = [modules[b] for b in blocks]
    prefixes = _block_names(model, blocks)
    info = DepthInfo(len(prefixes), base_depth, alpha)
    _apply(model, prefixes, info)
    return info


def _partition(model: nn.Module, prefixes: List[str]) -> tuple:
    """``(inside, outside)``: ``{id(p): (name, p)}`` of the parameters inside
    the blocks ``prefixes`` and of the others; a parameter in both is an error."""
    inside: Dict[int, tuple] = {}
    outside: Dict[int, tuple] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        (inside if _inside(name, prefixes) else outside).setdefault(id(p), (name, p))
    shared = [(name, outside[pid][0]) for pid, (name, _) in inside.items() if pid in outside]
    if shared:
        raise ValueError(
            f"set_depth: parameter {shared[0][0]!r} is shared between a residual block and {shared[0][1]!r} "
            "outside the blocks; depth scaling has no rule for such a tensor"
        )
    return inside, outside


def _apply(model: nn.Module, prefixes: List[str], info: DepthInfo) -> None:
    """Check, then record ``info`` on the blocks ``prefixes`` of ``model``."""
    inside, outside = _partition(model, prefixes)
    infshapes = []
    for pid, (name, p) in list(inside.items()) + list(outside.items()):
        s = find_infshape(p)
        if s is None:
            raise ValueError(
                f"set_depth: parameter {name!r} has no μP base shapes; call fastmup.set_base_shapes(model, base, "
                "delta=...) first (base and delta of the same depth as the model)"
            )
        infshapes.append((pid in inside, s))
    # all checked: clear an earlier declaration, then record this one
    for is_inside, s in infshapes:
        if is_inside:
            s.depth = info
        elif "depth" in s.__dict__:
            del s.depth
    for name, module in model.named_modules():
        if _inside(name, prefixes):
            if name in prefixes:
                module.__dict__[_BLOCK_ATTR] = info
            else:
                module.__dict__.pop(_BLOCK_ATTR, None)
            if isinstance(module, BranchMultiplier):
                module.multiplier = info.branch_multiplier
        else:
            module.__dict__.pop(_BLOCK_ATTR, None)
            if isinstance(module, BranchMultiplier):
                module.multiplier = 1.0


def depth_info(obj: Union[Tensor, nn.Module]) -> Optional[DepthInfo]:
    """The :class:`DepthInfo` of a parameter (via its infshape) or of a block; ``None`` outside the blocks."""
    if isinstance(obj, nn.Module):
        return obj.__dict__.get(_BLOCK_ATTR)
    s = find_infshape(obj)
    return None if s is None else getattr(s, "depth", None)


def branch_multiplier(block: nn.Module) -> float:
    """``m_L^(-α)`` of a residual block declared by :func:`set_depth` (1 for any other module)."""
    info = block.__dict__.get(_BLOCK_ATTR)
    return 1.0 if info is None else info.branch_multiplier


def depth_state(model: nn.Module) -> Optional[Dict[str, Any]]:
    """The depth declaration of ``model`` as plain data, or ``None`` without one.

    ``{"depth": L, "base_depth": L_base, "alpha": α, "blocks": [module names]}``:
    what :func:`fastmup.base_shapes_state` stores under :data:`DEPTH_KEY`.
    """
    blocks, info = [], None
    for name, module in model.named_modules():
        rec = module.__dict__.get(_BLOCK_ATTR)
        if rec is not None:
            blocks.append(name)
            info = rec
    if info is None:
        return None
    return {**info.state(), "blocks": blocks}


def check_depth_state(model: nn.Module, state: Any, where: str = "the depth record") -> tuple:
    """Validate a :func:`depth_state` record against ``model`` (changing
    nothing); returns ``(block names, DepthInfo)``."""
    if not isinstance(state, Mapping) or not {"depth", "base_depth", "alpha", "blocks"} <= set(state):
        raise ValueError(
            f"{where} must be a dict with keys depth, base_depth, alpha and blocks (from fastmup.base_shapes_state), "
            f"got {state!r}"
        )
    blocks = list(state["blocks"])
    if len(blocks) != state["depth"]:
        raise ValueError(f"{where}: depth={state['depth']!r} but {len(blocks)} block names")
    modules = dict(model.named_modules())
    missing = [b for b in blocks if b not in modules]
    if missing:
        raise ValueError(f"{where}: the model has no module named {missing[0]!r} (the blocks of the saved model)")
    info = DepthInfo(len(blocks), _check_depth(state["base_depth"], "base_depth"), _check_alpha(state["alpha"]))
    prefixes = _block_names(model, [modules[b] for b in blocks])
    _partition(model, prefixes)
    return prefixes, info


def apply_depth_state(model: nn.Module, state: Mapping[str, Any], where: str = "the depth record") -> DepthInfo:
    """Restore a :func:`depth_state` record on ``model`` (its infshapes set already)."""
    prefixes, info = check_depth_state(model, state, where)
    _apply(model, prefixes, info)
    return info
