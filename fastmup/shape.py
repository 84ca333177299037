"""Attach base shapes to a model: the entry point of μP.

For every parameter, comparing its shape with the same parameter in a *base*
model (and, to tell which dimensions scale, a *delta* model of another width)
yields an :class:`~fastmup.infshape.InfShape`.  :func:`set_base_shapes`
attaches it as ``p.infshape`` and rescales the standard PyTorch init into μP.

Base shapes can be stored in a ``.bsh`` file: YAML mapping each parameter
name to its list of base dims (``null`` = finite), keys sorted, after ``#``
comment lines.  The format is the one mup 1.0 reads and writes.
"""
from __future__ import annotations

import copy
import os
from typing import IO, Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import yaml
from torch import nn
from torch.nn.modules.conv import _ConvNd

from fastmup.depth import DEPTH_KEY, apply_depth_state, check_depth_state, depth_state
from fastmup.infshape import InfDim, InfShape, _is_dim_size, require_infshape, zip_infshape
from fastmup.infshape_registry import module_infshapes, record
from fastmup.layer import MuReadout, rescale_linear_bias

__all__ = [
    "get_shapes",
    "get_infshapes",
    "save_base_shapes",
    "load_base_shapes",
    "zip_infshapes",
    "clear_dims",
    "make_base_shapes",
    "apply_infshapes",
    "set_base_shapes",
    "assert_hidden_size_inf",
    "base_shapes_state",
]

PathLike = Union[str, "os.PathLike[str]"]
BaseSpec = Union[nn.Module, Mapping[str, Any], PathLike, None]

_BSH_HEADER = (
    "# This is a base shape file encoded in yaml\n"
    "# - `null` indicates a dimension is \"finite\", i.e. a non-\"width\" dimension\n"
    "# - a number indicates the base dimension of an \"infinite\" dimension, "
    "i.e. some notion of \"width\"\n"
)
_DP_PREFIX = "module."


class BaseShapesError(ValueError):
    """Base shapes that cannot be applied to a model (or read from a file)."""


class HiddenSizeError(BaseShapesError, AssertionError):
    """An ``nn.Linear`` maps an infinite fan-in to a finite fan-out (should be a MuReadout).

    Also an ``AssertionError``, which is what mup raises for it.
    """


# ---------------------------------------------------------------------------
# shapes of models and files


def get_shapes(model: nn.Module) -> Dict[str, torch.Size]:
    """``{name: p.shape}`` over ``model.named_parameters()``."""
    return {name: p.shape for name, p in model.named_parameters()}


def get_infshapes(model: nn.Module) -> Dict[str, InfShape]:
    """``{name: p.infshape}`` over ``model.named_parameters()``."""
    return {
        name: require_infshape(p, f"get_infshapes (parameter {name!r})")
        for name, p in model.named_parameters()
    }


def _as_base_shape_list(name: str, value: Any, where: str) -> List[Optional[int]]:
    if isinstance(value, InfShape):
        return [None if b is None else int(b) for b in value.base_shape()]
    if isinstance(value, (list, tuple)) and all(b is None or _is_dim_size(b) for b in value):
        return [None if b is None else int(b) for b in value]
    raise BaseShapesError(
        f"{where}: entry {name!r} must be an InfShape or a list of base dims (int or None), "
        f"got {value!r}"
    )


def save_base_shapes(model_or_shapes: Union[nn.Module, Mapping[str, Any]], file: Union[PathLike, IO[str]]) -> None:
    """Write base shapes to a ``.bsh`` file (readable by mup and fastmup).

    ``model_or_shapes`` is a model whose base shapes are set, or a mapping
    from parameter name to an ``InfShape`` or to a list of base dims (as
    returned by :func:`make_base_shapes` or :func:`base_shapes_state`).
    ``file`` is a path or an open text file.
    """
    if isinstance(model_or_shapes, nn.Module):
        entries = {k: v.base_shape() for k, v in get_infshapes(model_or_shapes).items()}
    elif isinstance(model_or_shapes, Mapping):
        # the depth record of base_shapes_state is not part of mup's format
        entries = {
            str(k): _as_base_shape_list(str(k), v, "save_base_shapes")
            for k, v in model_or_shapes.items()
            if k != DEPTH_KEY
        }
    else:
        raise TypeError(
            "save_base_shapes expects an nn.Module or a dict of base shapes, "
            f"got {type(model_or_shapes).__name__}"
        )
    # Plain ints/None only, so that yaml.safe_load (and mup) can read it back.
    entries = {k: [None if b is None else int(b) for b in v] for k, v in entries.items()}
    text = _BSH_HEADER + yaml.safe_dump(entries, indent=4, sort_keys=True, default_flow_style=False)
    if hasattr(file, "write"):
        file.write(text)
    else:
        with open(file, "w", encoding="utf-8") as f:
            f.write(text)


def _parse_base_shapes(data: Any, where: str) -> Dict[str, InfShape]:
    if data is None:
        raise BaseShapesError(f"{where} is empty: expected a mapping of parameter name -> list of base dims")
    if not isinstance(data, Mapping):
        raise BaseShapesError(
            f"{where} must contain a mapping of parameter name -> list of base dims, "
            f"got a {type(data).__name__}"
        )
    out = {}
    for name, dims in data.items():
        if not isinstance(name, str):
            raise BaseShapesError(f"{where}: parameter names must be strings, got {name!r}")
        if not isinstance(dims, (list, tuple)):
            raise BaseShapesError(
                f"{where}: entry {name!r} must be a list of base dims (int or null), got {dims!r}"
            )
        for b in dims:
            if b is not None and (not _is_dim_size(b) or b <= 0):
                raise BaseShapesError(
                    f"{where}: entry {name!r} has base dim {b!r}; base dims must be positive "
                    "integers or null"
                )
        out[name] = InfShape.from_base_shape(None if b is None else int(b) for b in dims)
    return out


def load_base_shapes(filename: PathLike) -> Dict[str, InfShape]:
    """Read a ``.bsh`` file into ``{name: InfShape}`` (sizes unknown, ``dim=None``).

    Raises ``FileNotFoundError`` naming a missing file and
    :class:`BaseShapesError` (a ``ValueError``) naming the file and the entry
    when the content is not YAML or not a mapping of lists of int/null.
    """
    path = os.fspath(filename)
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(
            e.errno, f"base shape file {path!r} does not exist", path
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise BaseShapesError(f"base shape file {path!r} is not valid YAML: {e}") from None
    return _parse_base_shapes(data, f"base shape file {path!r}")


# ---------------------------------------------------------------------------
# combining base/delta/target shapes

# Either InfShapes (base dims known: a .bsh file, make_base_shapes output,
# base_shapes_state) or plain shapes (a model's, compared by equality).
_Shapes = Dict[str, Union[InfShape, Tuple[int, ...]]]


def _extract_shapes(x: Any, role: str) -> Tuple[_Shapes, str]:
    """Normalise a model / dict / path into shapes, plus a label for messages."""
    if isinstance(x, nn.Module):
        return {k: tuple(v) for k, v in get_shapes(x).items()}, f"the {role} model"
    if isinstance(x, (str, os.PathLike)):
        path = os.fspath(x)
        return dict(load_base_shapes(path)), f"base shape file {path!r}"
    if isinstance(x, Mapping):
        where = f"the {role} shapes dict"
        # base_shapes_state's depth record is read by set_base_shapes itself
        x = {k: v for k, v in x.items() if k != DEPTH_KEY}
        # A list containing None can only be a base shape (None = finite), so
        # such a dict is read like a .bsh file; without any None it is read as
        # mup does, as the shapes of a model.
        has_none = any(
            isinstance(v, (list, tuple)) and not isinstance(v, InfShape) and any(b is None for b in v)
            for v in x.values()
        )
        out: _Shapes = {}
        for name, v in x.items():
            if not isinstance(name, str):
                raise BaseShapesError(f"{where}: parameter names must be strings, got {name!r}")
            if isinstance(v, InfShape):
                out[name] = copy.deepcopy(v)
            elif callable(getattr(v, "base_shape", None)):
                # An InfShape of another implementation (e.g. mup's).
                out[name] = InfShape.from_base_shape(v.base_shape())
            elif isinstance(v, (list, tuple)) and all(b is None or _is_dim_size(b) for b in v):
                if has_none:
                    out[name] = InfShape.from_base_shape(None if b is None else int(b) for b in v)
                else:
                    out[name] = tuple(int(b) for b in v)
            else:
                raise BaseShapesError(
                    f"{where}: entry {name!r} must be a shape, a list of base dims (int or "
                    f"None) or an InfShape, got {v!r}"
                )
        return out, where
    raise TypeError(
        f"{role} must be an nn.Module, a dict of shapes, a path to a .bsh file or None, "
        f"got {type(x).__name__}"
    )


def _match_dp_prefix(base: _Shapes, names: Iterable[str]) -> _Shapes:
    # (Distributed)DataParallel prefixes every name with "module."; follow the
    # target's convention.  The prefix is removed by slicing, not str.strip,
    # which would also eat leading/trailing 'm', 'o', 'd', ... characters.
    names = list(names)
    target_prefixed = all(n.startswith(_DP_PREFIX) for n in names)
    target_plain = all(not n.startswith(_DP_PREFIX) for n in names)
    base_prefixed = all(k.startswith(_DP_PREFIX) for k in base)
    base_plain = all(not k.startswith(_DP_PREFIX) for k in base)
    if target_prefixed and base_plain:
        return {_DP_PREFIX + k: v for k, v in base.items()}
    if target_plain and base_prefixed:
        return {k[len(_DP_PREFIX):]: v for k, v in base.items()}
    return base


def _fmt_names(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return "[" + shown + "]"


def _zip_shapes(base: _Shapes, base_label: str, shapes: Mapping[str, Tuple[int, ...]], target_label: str) -> Dict[str, InfShape]:
    """Validated, side-effect free ``zip_infshape`` over two name -> shape dicts."""
    base = _match_dp_prefix(base, shapes.keys())
    missing = set(shapes) - set(base)
    extra = set(base) - set(shapes)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} parameter(s) of {target_label} missing from {base_label}: {_fmt_names(missing)}")
        if extra:
            parts.append(f"{len(extra)} name(s) in {base_label} that {target_label} does not have: {_fmt_names(extra)}")
        raise BaseShapesError(
            f"parameter names differ between {target_label} and {base_label}: " + "; ".join(parts)
        )
    out = {}
    for name, shape in shapes.items():
        b = base[name]
        if len(b) != len(shape):
            raise BaseShapesError(
                f"parameter {name!r}: {base_label} gives a base shape of rank {len(b)} "
                f"({list(b.base_shape()) if isinstance(b, InfShape) else list(b)}) but it has "
                f"shape {list(shape)} (rank {len(shape)}) in {target_label}"
            )
        out[name] = zip_infshape(b, shape)
    return out


def zip_infshapes(base: Any, target: Any) -> Dict[str, InfShape]:
    """``{name: InfShape}`` pairing the shapes of ``base`` with those of ``target``.

    Each argument is a model, a dict of shapes / base shapes, or a ``.bsh`` path.
    """
    base_shapes, base_label = _extract_shapes(base, "base")
    target_shapes, target_label = _extract_shapes(target, "target")
    sizes = {}
    for k, v in target_shapes.items():
        sizes[k] = tuple(v.shape()) if isinstance(v, InfShape) else v
    return _zip_shapes(base_shapes, base_label, sizes, target_label)


def clear_dims(infshape_dict: Mapping[str, InfShape]) -> Dict[str, InfShape]:
    """Copy of ``infshape_dict`` with every size forgotten (``dim = None``).

    What remains, the base dims, is what a ``.bsh`` file stores.
    """
    out = {}
    for name, s in infshape_dict.items():
        cleared = InfShape(InfDim(d.base_dim, None) for d in s)
        cleared.main_idx = s.main_idx
        out[name] = cleared
    return out


def make_base_shapes(base_shapes: Any, delta_shapes: Any, savefile: Optional[PathLike] = None) -> Dict[str, InfShape]:
    """Base shapes from a base model/shapes and a delta model/shapes.

    A dimension is infinite iff its size differs between base and delta; its
    base dim is the base model's size.  The result (sizes cleared) can be
    given to :func:`set_base_shapes`; with ``savefile`` it is also written as
    a ``.bsh`` file.
    """
    bsh = clear_dims(zip_infshapes(base_shapes, delta_shapes))
    if savefile is not None:
        save_base_shapes(bsh, savefile)
    return bsh


def _readout_modules(model: nn.Module) -> Iterable[MuReadout]:
    return (m for m in model.modules() if isinstance(m, MuReadout))


def _sync_readouts(model: nn.Module) -> None:
    # MuReadout.forward reads a plain float; refresh it from the infshapes.
    for m in _readout_modules(model):
        infshape = getattr(m.weight, "infshape", None)
        if infshape is not None:
            m._set_width_mult(infshape.width_mult())


def _check_names(model: nn.Module, infshapes: Mapping[str, InfShape]) -> None:
    names = [n for n, _ in model.named_parameters()]
    missing = set(names) - set(infshapes)
    if missing:
        raise BaseShapesError(f"apply_infshapes: no InfShape for parameter(s) {_fmt_names(missing)}")
    for n, p in model.named_parameters():
        s = infshapes[n]
        if not isinstance(s, InfShape):
            raise BaseShapesError(f"apply_infshapes: entry {n!r} is a {type(s).__name__}, not an InfShape")
        if len(s) != p.dim():
            raise BaseShapesError(
                f"apply_infshapes: InfShape {s!r} for parameter {n!r} has rank {len(s)} "
                f"but the parameter has shape {tuple(p.shape)}"
            )


def apply_infshapes(model: nn.Module, infshapes: Mapping[str, InfShape]) -> None:
    """Attach ``infshapes[name]`` to every parameter as ``p.infshape``.

    Also sets each :class:`MuReadout`'s width multiplier and records the
    infshapes on the modules (:mod:`fastmup.infshape_registry`), so that
    parameters put in their place later (FSDP2, ``to_empty``,
    ``load_state_dict(assign=True)``, ``copy.deepcopy``) find them again.
    Every name is checked before anything is changed.
    """
    _check_names(model, infshapes)
    for name, p in model.named_parameters():
        new = infshapes[name]
        # a depth declaration (fastmup.set_depth) outlives new base shapes
        old_depth = getattr(getattr(p, "infshape", None), "depth", None)
        if old_depth is not None and getattr(new, "depth", None) is None:
            new.depth = old_depth
        p.infshape = new
    _sync_readouts(model)
    record(model)


def _hidden_size_violations(model: nn.Module, infshape_of) -> List[str]:
    bad = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not isinstance(module, MuReadout):
            w = getattr(module, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() != 2:
                continue
            s = infshape_of(w)
            if s is not None and not s[0].isinf() and s[1].isinf():
                bad.append(name)
    return bad


def _hidden_size_error(names: List[str]) -> HiddenSizeError:
    return HiddenSizeError(
        f"nn.Linear module(s) {_fmt_names(names)} have an infinite fan-in and a finite "
        "fan-out but are not MuReadout: make them MuReadout (an output layer) or make "
        "their fan-out scale with width in the delta model (pass do_assert=False to skip "
        "this check)"
    )


def assert_hidden_size_inf(model: nn.Module) -> None:
    """Raise if an ``nn.Linear`` other than :class:`MuReadout` has infinite fan-in and finite fan-out.

    Such a layer is an output layer in disguise: without MuReadout's ``1/m``
    multiplier its output grows with width.  The error names the modules.
    """
    bad = _hidden_size_violations(
        model, lambda w: require_infshape(w, "assert_hidden_size_inf")
    )
    if bad:
        raise _hidden_size_error(bad)


def _rescale_conflicts(model: nn.Module) -> List[str]:
    bad = []
    for name, module in model.named_modules():
        if isinstance(module, MuReadout):
            if getattr(module, "_has_rescaled_params", False):
                bad.append(name or "<model>")
        elif isinstance(module, (nn.Linear, _ConvNd)):
            if getattr(module, "_has_rescaled_params", False) and module.bias is not None:
                bad.append(name or "<model>")
    return bad


def set_base_shapes(
    model: nn.Module,
    base: BaseSpec,
    rescale_params: bool = True,
    delta: Optional[BaseSpec] = None,
    savefile: Optional[PathLike] = None,
    do_assert: bool = True,
) -> nn.Module:
    """Attach ``p.infshape`` to every parameter of ``model`` and switch it to μP.

    Args:
        model: the model to train, freshly initialized by PyTorch.
        base: where the base shapes come from: a base model (same depth, base
            width), a dict (``{name: shape}`` of a base model; ``{name:
            InfShape}`` from :func:`make_base_shapes`; ``{name: [base_dim or
            None, ...]}`` as in a ``.bsh`` file or from
            :func:`base_shapes_state`), a ``str``/``os.PathLike`` path to a
            ``.bsh`` file, or ``None`` (``model`` itself: plain SP).
        rescale_params: turn PyTorch's default init into μP: every
            :class:`MuReadout` gets ``W, b ← √m·W, √m·b``
            (``_rescale_parameters``) and every other ``nn.Linear``/``_ConvNd``
            ``b ← √m_in·b`` (:func:`rescale_linear_bias`).  Refused (before
            anything changes) on modules rescaled already; pass ``False``
            when restoring a checkpoint.
        delta: a model/shapes of another width, compared with ``base`` to find
            which dimensions are infinite (those whose sizes differ).  Needed
            when ``base`` is a model or plain shapes.
        savefile: also write the resulting base shapes to this ``.bsh`` path.
        do_assert: check that every ``nn.Linear`` with an infinite fan-in and a
            finite fan-out is a :class:`MuReadout` (error naming the modules).

    Returns:
        ``model``.  With ``m = dim/base_dim`` the model equals its SP self
        exactly where every ``m == 1``.

    Every input is validated before the model is touched: mismatched
    parameter names (the error lists the missing and the extra ones), a
    missing or malformed ``.bsh`` file, ranks that differ from the model's,
    the hidden-size check and a second rescale all raise with the model
    unchanged.  Tensors with more than two infinite dimensions get an
    infshape, but the μP optimizers and initializers refuse them.

    Checkpoints: ``infshape`` and MuReadout's width multiplier are Python
    attributes, not part of ``state_dict``.  Save::

        torch.save({"model": model.state_dict(),
                    "base_shapes": fastmup.base_shapes_state(model)}, path)

    and restore into a freshly built model with::

        ckpt = torch.load(path)
        model = MyModel(width)
        fastmup.set_base_shapes(model, ckpt["base_shapes"], rescale_params=False)
        model.load_state_dict(ckpt["model"])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"set_base_shapes expects an nn.Module, got {type(model).__name__}")
    if base is None:
        base = model
    depth_record = base.get(DEPTH_KEY) if isinstance(base, Mapping) else None
    base_shapes, base_label = _extract_shapes(base, "base")
    if delta is not None:
        delta_shapes, delta_label = _extract_shapes(delta, "delta")
        delta_sizes = {
            k: (tuple(v.shape()) if isinstance(v, InfShape) else v) for k, v in delta_shapes.items()
        }
        base_shapes = _zip_shapes(base_shapes, base_label, delta_sizes, delta_label)
        base_label = f"{base_label} (with {delta_label})"
    shapes = {k: tuple(v) for k, v in get_shapes(model).items()}
    infshapes = _zip_shapes(base_shapes, base_label, shapes, "the model")

    if do_assert:
        by_id = {id(p): infshapes[n] for n, p in model.named_parameters()}
        bad = _hidden_size_violations(model, lambda w: by_id.get(id(w)))
        if bad:
            raise _hidden_size_error(bad)
    if rescale_params:
        done = _rescale_conflicts(model)
        if done:
            raise RuntimeError(
                f"set_base_shapes: module(s) {_fmt_names(done)} were already rescaled to μP; "
                "rescaling again would apply the factor twice. Pass rescale_params=False when "
                "re-setting base shapes or restoring a checkpoint."
            )

    if depth_record is not None:
        check_depth_state(model, depth_record, f"entry {DEPTH_KEY!r} of the base shapes")
    if savefile is not None:
        save_base_shapes(infshapes, savefile)
    apply_infshapes(model, infshapes)
    if depth_record is not None:
        apply_depth_state(model, depth_record, f"entry {DEPTH_KEY!r} of the base shapes")
    if rescale_params:
        for module in model.modules():
            if isinstance(module, MuReadout):
                module._rescale_parameters()
            elif isinstance(module, (nn.Linear, _ConvNd)):
                rescale_linear_bias(module)
    return model


def base_shapes_state(model: nn.Module) -> Dict[str, List[Optional[int]]]:
    """Base shapes of ``model`` as plain data: ``{name: [base_dim or None, ...]}``.

    Serialisable with ``torch.save`` (loadable with ``weights_only=True``),
    JSON or YAML, and accepted by ``set_base_shapes(new_model, state,
    rescale_params=False)``, which restores every ``infshape`` and every
    MuReadout width multiplier.  A model with a depth declaration
    (:func:`fastmup.set_depth`) also gets the entry
    ``"__depth__": {"depth", "base_depth", "alpha", "blocks"}``, which
    ``set_base_shapes`` restores too (``save_base_shapes`` leaves it out of
    ``.bsh`` files, whose format is mup's).  Parameters that lost their ``infshape``
    (e.g. replaced by a wrapper) are taken from what ``set_base_shapes``
    recorded on the model.
    """
    records: Dict[str, List[Optional[int]]] = {}
    for n, infshape in module_infshapes(model):
        records.setdefault(n, [None if b is None else int(b) for b in infshape.base_shape()])
    out: Dict[str, List[Optional[int]]] = {}
    unknown = []
    for name, p in model.named_parameters():
        infshape = getattr(p, "infshape", None)
        if infshape is not None:
            out[name] = [None if b is None else int(b) for b in infshape.base_shape()]
        elif name in records:
            out[name] = list(records[name])
        else:
            unknown.append(name)
    if unknown:
        raise BaseShapesError(
            f"base_shapes_state: no base shape known for parameter(s) {_fmt_names(unknown)}; "
            "call fastmup.set_base_shapes on the model first"
        )
    depth = depth_state(model)
    if depth is not None:
        out[DEPTH_KEY] = depth
    return out
