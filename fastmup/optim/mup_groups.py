"""mup 1.0's param-group layout: every group split by μP multiplier.

mup turns a torch optimizer into a μP one by rewriting the param groups:
each group of the user is split into one group per multiplier, whose ``lr``
and ``weight_decay`` are pre-multiplied, and the torch optimizer is built on
those.  fastmup's own optimizers keep the user's groups and apply the same
multipliers per tensor (:mod:`fastmup.optim.multipliers`).  mup's layout
matters in three places, all here:

* ``MuAdam(params, impl=torch.optim.RMSprop, ...)`` and
  ``MuSGD(params, impl=...)``, mup's documented way to make other μP
  optimizers: :func:`build_with_impl` builds ``impl`` on the split groups,
  exactly as mup does (same groups, same order, same values);
* :func:`process_param_groups`, mup's normalisation of ``params``;
* a ``state_dict`` saved by a mup optimizer has the split layout:
  :func:`regroup_state_dict` maps it onto a fastmup optimizer built on the
  user's groups (``MuOptimizer.load_state_dict`` calls it), and
  :func:`regroup_scheduler_state_dict` does the same for the state of an LR
  scheduler saved beside it.

The split of one user group, in mup's order (``m``: width multiplier,
``r = m_in/m_out``):

==========  =========================================================
Adam-like   one group per ``m`` of the matrix-like tensors (``lr/m``,
            ``wd·m``), then one group for all others (values unchanged)
SGD-like    one group per ``r`` of the matrix-like tensors (``lr/r``,
            ``wd·r``), one per ``m`` of the vector-like ones (``lr·m``,
            ``wd/m``), then one for the finite ones
==========  =========================================================

The last group is always there, even empty (mup appends it unconditionally),
and holds the group's values unscaled.
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from fastmup.infshape_registry import explain_missing, find_infshape
from fastmup.optim.multipliers import ONE, Family, Multiplier, mup_multipliers

__all__ = [
    "process_param_groups",
    "mup_param_groups",
    "build_with_impl",
    "regroup_state_dict",
    "regroup_scheduler_state_dict",
]


def _tensor(entry: Any) -> Any:
    """The tensor of a group entry (``named_parameters()`` gives pairs)."""
    return entry[1] if isinstance(entry, tuple) else entry


def process_param_groups(params: Iterable, **kwargs: Any) -> list[dict[str, Any]]:
    """``params`` as a list of param groups, each with ``lr`` and ``weight_decay``.

    As mup's: ``params`` is an iterable of tensors (one group) or of group
    dicts; a group without ``lr`` takes ``kwargs["lr"]``, one without
    ``weight_decay`` takes ``kwargs.get("weight_decay", 0.0)``.  Unlike mup's,
    the given group dicts are copied, not modified.
    """
    groups = list(params)
    if not groups:
        raise ValueError("optimizer got an empty parameter list")
    if not isinstance(groups[0], Mapping):
        groups = [{"params": groups}]
    out = []
    for i, group in enumerate(groups):
        if not isinstance(group, Mapping):
            raise TypeError(f"param group {i} is a {type(group).__name__}: give either tensors or param group dicts")
        group = dict(group)
        entries = group["params"]
        group["params"] = [entries] if isinstance(entries, Tensor) else list(entries)
        if "lr" not in group:
            if "lr" not in kwargs:
                raise TypeError(f"param group {i} has no 'lr' and no lr= was given")
            group["lr"] = kwargs["lr"]
        if "weight_decay" not in group:
            group["weight_decay"] = kwargs.get("weight_decay", 0.0)
        out.append(group)
    return out


def _split(entries: list, family: Family, where: str) -> list[list[int]]:
    """Positions of ``entries`` in each group of mup's split (order as mup's)."""
    matrix: dict[float, list[int]] = {}
    vector: dict[float, list[int]] = {}
    rest: list[int] = []
    for position, entry in enumerate(entries):
        p = _tensor(entry)
        infshape = find_infshape(p)
        if infshape is None:
            raise ValueError(
                f"parameter #{position} of {where} (shape {tuple(p.shape)}) has no μP base shapes: {explain_missing(p)}"
            )
        ninf = infshape.ninf()
        if ninf > 2:
            raise NotImplementedError(
                f"parameter #{position} of {where}: μP has no rule for {ninf} infinite dimensions (infshape {infshape})"
            )
        if ninf == 2:
            key = infshape.width_mult() if family == "adam" else infshape.fanin_fanout_mult_ratio()
            matrix.setdefault(key, []).append(position)
        elif ninf == 1 and family == "sgd":
            vector.setdefault(infshape.width_mult(), []).append(position)
        else:
            rest.append(position)
    return [*matrix.values(), *vector.values(), rest]


def _scaled(value: Any, m: Multiplier) -> Any:
    return value if m == (1.0, 1.0) else m.apply(value)


def mup_param_groups(
    param_groups: Iterable[Mapping[str, Any]],
    family: Family,
    *,
    decoupled_wd: bool = False,
    param_lr_scales: Optional[Mapping[Tensor, float]] = None,
    decoupled_decay: bool = False,
) -> list[dict[str, Any]]:
    """mup's split of ``param_groups`` (each with ``lr`` and ``weight_decay``).

    ``family`` is ``"adam"`` (Adam-like optimizers: Adam, RMSprop, Adagrad,
    ...) or ``"sgd"`` (SGD-like).  ``decoupled_wd`` leaves weight decay
    unscaled; ``param_lr_scales`` (fastmup's extra per-tensor lr factors)
    further split a group by factor, and so do the depth factors of
    :func:`fastmup.set_depth` (``decoupled_decay``: the optimizer decays as
    AdamW does).  Values are scaled as mup scales them
    (``lr / m``, ``lr * m``), so they round alike.
    """
    if family not in ("adam", "sgd"):
        raise ValueError(f"mup's group split exists for 'adam' and 'sgd' optimizers, not {family!r}")
    scales = {} if param_lr_scales is None else param_lr_scales
    out = []
    for gi, group in enumerate(param_groups):
        entries = list(group["params"])
        if "param_names" in group and not any(isinstance(e, tuple) for e in entries):
            entries = list(zip(group["param_names"], entries))
        named = any(isinstance(e, tuple) for e in entries)
        for positions in _split(entries, family, f"param group {gi}"):
            # mup's groups hold tensors of one width multiplier; the extra
            # lr scales and the depth factors (fastmup.set_depth) split them
            # further (without either, each stays one group, as in mup)
            by_factors: dict[tuple, list] = {}
            for position in positions:
                t = _tensor(entries[position])
                mults = mup_multipliers(find_infshape(t), family, decoupled_wd, decoupled_decay=decoupled_decay)
                by_factors.setdefault((scales.get(t, 1.0), *mults), []).append(entries[position])
            for (scale, lr_m, wd_m), members in (by_factors or {(1.0, ONE, ONE): []}).items():
                new = {k: v for k, v in group.items() if k not in ("params", "param_names")}
                new["params"] = members
                if named and not members:  # torch wants names on every group or on none
                    new["param_names"] = []
                if members:
                    new["lr"] = _scaled(group["lr"], Multiplier(lr_m.num * scale, lr_m.den))
                    new["weight_decay"] = _scaled(group["weight_decay"], wd_m)
                out.append(new)
    return out


def _default_lr(impl: Callable) -> Optional[float]:
    try:
        default = inspect.signature(impl).parameters["lr"].default
    except (TypeError, ValueError, KeyError):
        return None
    return default if isinstance(default, numbers.Real) else None


def build_with_impl(impl: Callable[..., Optimizer], family: Family, params: Iterable, **kwargs: Any) -> Optimizer:
    """``impl(mup_param_groups(process_param_groups(params, **kwargs)), **kwargs)``:
    what mup 1.0's ``MuAdam(params, impl=impl, **kwargs)`` (``family="adam"``)
    and ``MuSGD(params, impl=impl, **kwargs)`` (``"sgd"``) build.

    ``lr`` defaults to ``impl``'s own default.  fastmup's ``decoupled_wd``
    and ``param_lr_scales`` shape the groups; ``backend`` and
    ``state_dtype`` belong to fastmup's own optimizers and are refused.
    """
    for key in ("backend", "state_dtype", "eps_scaling"):
        if key in kwargs:
            raise TypeError(
                f"{key}= applies to fastmup's own optimizers, not to impl={getattr(impl, '__name__', impl)!r}"
            )
    decoupled_wd = bool(kwargs.pop("decoupled_wd", False))
    param_lr_scales = kwargs.pop("param_lr_scales", None)
    lr = kwargs.get("lr", _default_lr(impl))
    group_kwargs = dict(kwargs) if lr is None else {**kwargs, "lr": lr}
    groups = process_param_groups(params, **group_kwargs)
    decoupled_decay = impl is torch.optim.AdamW or bool(kwargs.get("decoupled_weight_decay", False))
    split = mup_param_groups(
        groups, family, decoupled_wd=decoupled_wd, param_lr_scales=param_lr_scales, decoupled_decay=decoupled_decay
    )
    return impl(split, **kwargs)


def new_or_impl(cls: type, family: Family, natives: tuple, args: tuple, impl: Any, kwargs: dict) -> Any:
    """``__new__`` of the μP optimizers: a fastmup optimizer, or, for an
    ``impl`` that is not one of ``natives``, the ``impl`` optimizer on mup's
    split groups (Python then skips ``cls.__init__``)."""
    if impl is None and len(args) > 1 and _positional_impl(args[1]):
        raise TypeError(
            f"{cls.__name__}(params, {getattr(args[1], '__name__', args[1])!r}): pass the optimizer class as impl=... "
            "(the second positional argument is lr, as in torch.optim)"
        )
    if impl is None or impl in natives:
        return object.__new__(cls)
    if len(args) > 1:
        raise TypeError(
            f"{cls.__name__}(params, impl=...): give the other arguments by keyword "
            "(the second positional argument is lr, as in torch.optim)"
        )
    if not callable(impl):
        raise TypeError(f"impl must be a torch.optim.Optimizer class (or callable), got {impl!r}")
    if not args and "params" not in kwargs:
        raise TypeError(f"{cls.__name__}() missing the params argument")
    params = args[0] if args else kwargs.pop("params")
    return build_with_impl(impl, family, params, **kwargs)


class TakesImpl:
    """Mixin of the μP optimizers that take mup's ``impl=`` (``MuAdam``,
    ``MuSGD``): their ``__new__`` is :func:`new_or_impl` with the class's
    ``family`` and ``_native_impls`` (the torch optimizers it stands for)."""

    family: Family
    _native_impls: tuple = ()

    def __new__(cls, *args: Any, impl: Optional[Callable[..., Optimizer]] = None, **kwargs: Any):
        return new_or_impl(cls, cls.family, cls._native_impls, args, impl, kwargs)


def _positional_impl(lr: Any) -> bool:
    return isinstance(lr, type) or (callable(lr) and not isinstance(lr, (numbers.Real, Tensor)))


# ---------------------------------------------------------------------------
# checkpoints saved by mup optimizers


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return True  # a Tensor lr is not checked (no host sync for a sanity check)
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=0.0)


def regroup_state_dict(opt: Optimizer, state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """``state_dict`` in the layout of ``opt``'s param groups.

    Returned as is when it already has that layout (same number of groups,
    same sizes), and also when it has neither that layout nor mup's.  When it
    has the layout of mup 1.0's optimizer built on the same groups (each
    split by multiplier as above), it is translated: each parameter's state
    moves to its place in the user's groups, and each group takes its
    hyperparameters from the unscaled group of its split (``lr``,
    ``weight_decay``, a scheduler's ``initial_lr`` are base values there).
    The scaled groups' ``lr`` must agree with the multipliers (rel. 1e-6),
    else the groups are not those the mup optimizer was built on and a
    ``ValueError`` says so.
    """
    family = getattr(opt, "family", None)
    saved = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
    if family not in ("adam", "sgd") or not isinstance(saved, list):
        return state_dict
    ours = opt.param_groups
    if len(saved) == len(ours) and all(len(s["params"]) == len(g["params"]) for s, g in zip(saved, ours)):
        return state_dict
    splits = [_split(list(g["params"]), family, f"param group {gi}") for gi, g in enumerate(ours)]
    sizes = [len(positions) for split in splits for positions in split]
    if len(sizes) != len(saved) or any(n != len(s["params"]) for n, s in zip(sizes, saved)):
        return state_dict
    saved_state = state_dict.get("state", {})
    groups, state = [], {}
    first_id, k = 0, 0
    for gi, (group, split) in enumerate(zip(ours, splits)):
        subgroups = saved[k : k + len(split)]
        base = subgroups[-1]
        for j, (positions, sub) in enumerate(zip(split, subgroups)):
            if positions and sub is not base:
                lr_m, _ = mup_multipliers(find_infshape(group["params"][positions[0]]), family)
                expected = lr_m.apply(base["lr"]) if not isinstance(base["lr"], Tensor) else base["lr"]
                if not _close(sub["lr"], expected):
                    raise ValueError(
                        f"loaded state dict: param group {k + j} has lr={sub['lr']}, but as mup 1.0's split of the "
                        f"optimizer's param group {gi} it would have lr={expected}; build the optimizer on the "
                        "param groups (same parameters, same order) the mup optimizer was built on"
                    )
            for position, saved_id in zip(positions, sub["params"]):
                if saved_id in saved_state:
                    state[first_id + position] = saved_state[saved_id]
        new = {key: value for key, value in base.items() if key not in ("params", "param_names")}
        new["params"] = list(range(first_id, first_id + len(group["params"])))
        groups.append(new)
        first_id += len(group["params"])
        k += len(split)
    return {**{key: v for key, v in state_dict.items() if key not in ("state", "param_groups")}, "state": state, "param_groups": groups}


def regroup_scheduler_state_dict(opt: Optimizer, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The state of an LR scheduler saved beside a mup optimizer, for the
    same scheduler on ``opt`` (a fastmup optimizer on the user's groups).

    Schedulers keep some values per param group (``base_lrs``,
    ``_last_lr``, ``min_lrs``...).  Every list as long as mup's split keeps
    the entry of the unscaled group of each user group (the base values);
    other entries are kept.  Use as
    ``scheduler.load_state_dict(regroup_scheduler_state_dict(opt, saved))``.
    """
    family = getattr(opt, "family", None)
    if family not in ("adam", "sgd"):
        return dict(state_dict)
    splits = [_split(list(g["params"]), family, f"param group {gi}") for gi, g in enumerate(opt.param_groups)]
    total = sum(len(split) for split in splits)
    if total == len(opt.param_groups):
        return dict(state_dict)
    unscaled, k = [], 0
    for split in splits:
        k += len(split)
        unscaled.append(k - 1)
    return {
        key: [value[i] for i in unscaled] if isinstance(value, list) and len(value) == total else value
        for key, value in state_dict.items()
    }
