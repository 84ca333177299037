"""Shapes that know which of their dimensions scale with width.

μP needs, for every parameter, to know which dimensions are "width-like"
(they grow when the model is scaled up, e.g. ``d_model``) and which are
fixed (e.g. the vocabulary size).  A width-like dimension of size ``n`` whose
size in the base model is ``n_0`` has width multiplier ``m = n / n_0``; all μP
scalings are powers of such multipliers.  A fixed dimension has ``m = 1``.

:class:`InfDim` is one such dimension and :class:`InfShape` the tuple of them
attached to a parameter as ``p.infshape`` by :func:`fastmup.set_base_shapes`.
"""
from __future__ import annotations

import copy
import numbers
from typing import Any, Iterable, Optional, Sequence, Union

from fastmup.infshape_registry import explain_missing, find_infshape

__all__ = ["InfDim", "InfShape", "zip_infshape"]

# Distinguishes "not given" from an explicit ``main_idx=None`` (no main dim).
_AUTO: Any = object()


class MissingInfShapeError(ValueError):
    """A tensor that μP code needs to scale has no ``infshape`` attribute."""


def require_infshape(tensor: Any, purpose: str = "this operation") -> "InfShape":
    """Return the infshape of ``tensor`` or raise a :class:`MissingInfShapeError`.

    Shared by the initializers, the layers and the optimizers so that a
    tensor without base shapes fails with the same actionable message
    everywhere.  A parameter put in the place of one that had an infshape
    (FSDP2, ``to_empty``, ``load_state_dict(assign=True)``, ``copy.deepcopy``)
    gets it back from the module's record (:mod:`fastmup.infshape_registry`);
    otherwise the message says which case the tensor looks like.
    """
    infshape = find_infshape(tensor)
    if infshape is None:
        shape = tuple(getattr(tensor, "shape", ()))
        raise MissingInfShapeError(
            f"tensor of shape {shape} has no `infshape` attribute, which {purpose} needs: "
            + explain_missing(tensor)
        )
    return infshape


def _is_dim_size(x: Any) -> bool:
    # bool is an Integral but a YAML `true` is never a meaningful dimension.
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


class InfDim:
    """One dimension of a tensor together with its base (width-1) size.

    ``base_dim is None`` marks a finite dimension (width multiplier 1);
    otherwise the dimension is infinite and its width multiplier is
    ``m = dim / base_dim``.  ``dim`` may be ``None`` for base shapes that are
    not yet attached to a concrete model (see :func:`fastmup.make_base_shapes`).
    """

    __slots__ = ("base_dim", "dim")

    def __init__(self, base_dim: Optional[int], dim: Optional[int]) -> None:
        self.base_dim = base_dim
        self.dim = dim

    def isinf(self) -> bool:
        """Whether this dimension scales with width."""
        return self.base_dim is not None

    def width_mult(self) -> float:
        """``dim / base_dim`` for an infinite dimension, 1 for a finite one."""
        if not self.isinf():
            return 1.0
        if self.dim is None:
            raise ValueError(
                f"{self!r} has no concrete size yet (dim=None): attach the base shapes "
                "to a model with fastmup.set_base_shapes before asking for width_mult()"
            )
        return self.dim / self.base_dim

    def __repr__(self) -> str:
        return f"InfDim({self.base_dim}, {self.dim})"

    def __str__(self) -> str:
        return repr(self) if self.isinf() else f"FinDim({self.dim})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, InfDim):
            return False
        return self.base_dim == other.base_dim and self.dim == other.dim

    # Consistent with __eq__; the fields are only mutated while an InfDim is
    # being built (zip_infshape), never once it sits inside a hashed InfShape.
    def __hash__(self) -> int:
        return hash((self.base_dim, self.dim))

    def __getstate__(self) -> tuple:
        return (self.base_dim, self.dim)

    def __setstate__(self, state: tuple) -> None:
        self.base_dim, self.dim = state


def _default_main_idx(dims: Sequence[InfDim]) -> Optional[int]:
    # The last infinite dimension: fan-in for an (out, in) weight with two
    # infinite dims, the only infinite dim otherwise.
    for i in range(len(dims) - 1, -1, -1):
        if dims[i].isinf():
            return i
    return None


def _rebuild_infshape(cls: type, dims: tuple) -> "InfShape":
    # Pickle/deepcopy entry point: the state dict (main_idx, ...) is applied
    # afterwards by the default __setstate__.
    return tuple.__new__(cls, dims)


class InfShape(tuple):
    """A tuple of :class:`InfDim`, attached to a parameter ``p`` as ``p.infshape``.

    Let ``ninf`` be the number of infinite dimensions.  μP treats a tensor
    with ``ninf == 0`` as scalar-like, ``ninf == 1`` as vector-like and
    ``ninf == 2`` as matrix-like (a hidden weight); the optimizers reject
    ``ninf > 2``.

    ``main`` is the dimension whose multiplier is *the* width multiplier of
    the tensor: by default the last infinite dimension, which for a torch
    ``(fan_out, fan_in)`` weight is the fan-in.  It is derived from
    ``main_idx``, which may be overridden, e.g. for a weight stored as
    ``(fan_in, fan_out)``::

        W.infshape.main_idx = 0          # or, as with mup:
        W.infshape.main = W.infshape[0]

    Equality and hashing are elementwise over the dims (``main_idx`` is not
    part of the value).  Copies, deep copies and pickles keep ``main_idx``.
    """

    def __new__(cls, dims: Iterable[InfDim] = (), *, main_idx: Optional[int] = _AUTO) -> "InfShape":
        self = tuple.__new__(cls, dims)
        for d in self:
            if not isinstance(d, InfDim):
                raise TypeError(
                    f"InfShape elements must be InfDim, got {type(d).__name__} ({d!r})"
                )
        self._main_idx = _default_main_idx(self)
        if main_idx is not _AUTO:
            self.main_idx = main_idx
        return self

    # tuple.__init__ would reject the keyword argument.
    def __init__(self, dims: Iterable[InfDim] = (), *, main_idx: Optional[int] = _AUTO) -> None:
        pass

    @property
    def main_idx(self) -> Optional[int]:
        """Index of the main dimension, or ``None`` when every dim is finite."""
        return self._main_idx

    @main_idx.setter
    def main_idx(self, idx: Optional[int]) -> None:
        if idx is not None:
            if not _is_dim_size(idx) or not -len(self) <= idx < len(self):
                raise IndexError(
                    f"main_idx {idx!r} is not a valid index for an InfShape of length {len(self)}"
                )
            idx = int(idx) % len(self)
        self._main_idx = idx

    @property
    def main(self) -> Optional[InfDim]:
        """The main dimension (``self[self.main_idx]``) or ``None``."""
        return None if self._main_idx is None else self[self._main_idx]

    @main.setter
    def main(self, dim: Optional[InfDim]) -> None:
        if dim is None:
            self._main_idx = None
            return
        # Prefer the current index, then the same object, then an equal dim,
        # so ``main_idx = i; main = self[i]`` never moves the index.
        cur = self._main_idx
        if cur is not None and self[cur] is dim:
            return
        for i, d in enumerate(self):
            if d is dim:
                self._main_idx = i
                return
        if cur is not None and self[cur] == dim:
            return
        for i, d in enumerate(self):
            if d == dim:
                self._main_idx = i
                return
        raise ValueError(f"{dim!r} is not a dimension of {self!r}; set main_idx instead")

    def fanin_fanout(self) -> tuple:
        """``(fan_in, fan_out) = (self[1], self[0])`` for the torch ``(out, in, ...)`` layout."""
        if len(self) < 2:
            raise ValueError(f"fan-in/fan-out are undefined for a tensor of rank {len(self)}")
        return self[1], self[0]

    def fanin_fanout_mult_ratio(self) -> float:
        """``m_in / m_out``, the factor by which μSGD divides a hidden weight's lr."""
        fanin, fanout = self.fanin_fanout()
        return fanin.width_mult() / fanout.width_mult()

    def ninf(self) -> int:
        """Number of infinite (width-scaled) dimensions."""
        return sum(1 for d in self if d.isinf())

    def width_mult(self) -> float:
        """Width multiplier of the main dimension (1 if there is none)."""
        main = self.main
        return 1.0 if main is None else main.width_mult()

    def base_shape(self) -> list:
        """Base size of each dimension, ``None`` for finite ones (the ``.bsh`` format)."""
        return [d.base_dim for d in self]

    def shape(self) -> list:
        return [d.dim for d in self]

    def serialize(self) -> dict:
        return {"base_shape": self.base_shape(), "shape": self.shape()}

    @classmethod
    def deserialize(cls, d: dict) -> "InfShape":
        return cls(InfDim(b, s) for b, s in zip(d["base_shape"], d["shape"]))

    @classmethod
    def from_base_shape(cls, bsh: Iterable[Optional[int]]) -> "InfShape":
        """Base shape (list of base dims, ``None`` = finite) with unknown sizes."""
        return cls(InfDim(b, None) for b in bsh)

    def __repr__(self) -> str:
        return "InfShape([" + ", ".join(repr(d) for d in self) + "])"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, InfShape) or len(self) != len(other):
            return False
        return all(a == b for a, b in zip(self, other))

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __reduce__(self) -> tuple:
        return (_rebuild_infshape, (type(self), tuple(self)), dict(self.__dict__))

    def __getnewargs__(self) -> tuple:
        return (tuple(self),)


def zip_infshape(
    base_dims: Sequence[Union[InfDim, int, None]],
    dims: Sequence[int],
    fin_if_same: bool = True,
) -> InfShape:
    """Pair base dimensions with concrete sizes into an :class:`InfShape`.

    Each element of ``base_dims`` is either an :class:`InfDim` (its
    ``base_dim``, hence its finiteness, is kept and its size replaced by the
    matching entry of ``dims``), ``None`` (finite), or an int ``b``: the
    dimension is infinite with base ``b``, except that with ``fin_if_same`` a
    size equal to ``b`` is read as finite.  A user-set ``main_idx`` on an
    ``InfShape`` passed as ``base_dims`` is kept.
    """
    base_dims = base_dims if isinstance(base_dims, InfShape) else tuple(base_dims)
    dims = tuple(dims)
    if len(base_dims) != len(dims):
        raise ValueError(
            f"base shape {list(base_dims)} has rank {len(base_dims)} but the shape "
            f"{list(dims)} has rank {len(dims)}"
        )
    out = []
    for bd, d in zip(base_dims, dims):
        if isinstance(bd, InfDim):
            infdim = copy.copy(bd)
            infdim.dim = d
        elif bd is None:
            infdim = InfDim(None, d)
        elif _is_dim_size(bd):
            bd = int(bd)
            infdim = InfDim(None, d) if (fin_if_same and bd == d) else InfDim(bd, d)
        else:
            raise ValueError(f"unhandled base dimension {bd!r} of type {type(bd).__name__}")
        out.append(infdim)
    result = InfShape(out)
    if isinstance(base_dims, InfShape) and base_dims.main_idx != _default_main_idx(base_dims):
        result.main_idx = base_dims.main_idx
    return result
