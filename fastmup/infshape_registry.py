"""Finding a parameter's infshape again after its Parameter object was replaced.

``p.infshape`` is a Python attribute of one ``nn.Parameter`` object, and
ordinary PyTorch operations put new parameter objects, without it, in the
place of the old ones:

* FSDP2's ``fully_shard`` (new parameters holding DTensors),
* ``load_state_dict(..., assign=True)``, ``Module.to_empty()`` (meta-device
  initialisation) and ``torch.utils.swap_tensors`` (which moves ``__dict__``
  too),
* ``copy.deepcopy`` (``Parameter.__deepcopy__`` copies the data only), and so
  ``torch.optim.swa_utils.AveragedModel`` and EMA copies.

The modules themselves survive all of these (a deep copy copies their
``__dict__``).  :func:`record` therefore leaves on every module of a model a
:class:`ModuleRecord` holding the infshapes of the module's own parameters
under their local names, and keeps the records in a weak registry.
:func:`find_infshape` asks which recorded module now holds a given parameter
object under a recorded name and, when the shapes agree (a DTensor's
``shape`` is its global shape), re-attaches the infshape recorded there.  A
deep copy of a recorded module registers the copied record and re-attaches
the infshapes to the copied parameters right away.

The registry holds records weakly and a record holds its module weakly, so
nothing here keeps a model alive.
"""
from __future__ import annotations

import copy
import sys
import weakref
from typing import Any, Iterator, Mapping, Optional

from torch import Tensor, nn

__all__ = ["ModuleRecord", "record", "find_infshape", "explain_missing", "module_infshapes"]

#: Attribute of a module holding its :class:`ModuleRecord`.
ATTR = "_fastmup_infshapes"


def _weak(obj: Any):
    return None if obj is None else weakref.ref(obj)


class ModuleRecord:
    """The infshapes of one module's own parameters, ``{local name: InfShape}``.

    ``owner`` is the module (held weakly); ``root`` the model that
    :func:`fastmup.set_base_shapes` was called on (to tell whether the module
    sits under an FSDP2 unit).
    """

    __slots__ = ("infshapes", "_owner", "_root", "__weakref__")

    def __init__(self, owner: Optional[nn.Module], infshapes: Mapping[str, Any], root: Optional[nn.Module] = None) -> None:
        self.infshapes = dict(infshapes)
        self._owner = _weak(owner)
        self._root = _weak(root)
        if owner is not None:
            _RECORDS.add(self)
            _INDEX.clear()

    @property
    def owner(self) -> Optional[nn.Module]:
        return None if self._owner is None else self._owner()

    @property
    def root(self) -> Optional[nn.Module]:
        return None if self._root is None else self._root()

    def __deepcopy__(self, memo: dict) -> "ModuleRecord":
        owner, root = self.owner, self.root
        new_owner = None if owner is None else memo.get(id(owner))
        new_root = None if root is None else memo.get(id(root))
        infshapes = copy.deepcopy(self.infshapes, memo)
        new = ModuleRecord(new_owner, infshapes, new_root if new_root is not None else new_owner)
        # A module's parameter dict is made in Module.__init__, before this
        # record joins its __dict__, so copy.deepcopy has copied it already:
        # give the copied parameters their infshapes now.
        copied = None if owner is None else memo.get(id(owner.__dict__.get("_parameters")))
        if isinstance(copied, dict):
            for name, infshape in infshapes.items():
                q = copied.get(name)
                if q is not None and getattr(q, "infshape", None) is None and _same_shape(q, infshape):
                    q.infshape = infshape
        return new

    def __reduce__(self):
        # A pickled model keeps its parameters' infshapes (Parameter pickles its
        # __dict__); the unpickled record has no module to point to.
        return (ModuleRecord, (None, self.infshapes))

    def __repr__(self) -> str:
        owner = self.owner
        where = type(owner).__name__ if owner is not None else "no module"
        return f"ModuleRecord({where}, {sorted(self.infshapes)})"


_RECORDS: "weakref.WeakSet[ModuleRecord]" = weakref.WeakSet()
# id(parameter) -> [(record, name)] for the parameters the recorded modules
# held when it was built; rebuilt when a lookup misses.  Entries are checked
# against the module before use, so a stale or reused id does no harm.
_INDEX: dict[int, list] = {}


def record(model: nn.Module) -> None:
    """Record on every module of ``model`` the infshapes its own parameters carry now."""
    for module in model.modules():
        infshapes = {
            name: p.infshape
            for name, p in module._parameters.items()
            if p is not None and getattr(p, "infshape", None) is not None
        }
        module.__dict__[ATTR] = ModuleRecord(module, infshapes, model)


def module_infshapes(model: nn.Module) -> Iterator[tuple[str, Any]]:
    """``(full name, recorded infshape)`` for every recorded parameter of ``model``."""
    for prefix, module in model.named_modules():
        rec = module.__dict__.get(ATTR)
        if isinstance(rec, ModuleRecord):
            for name, infshape in rec.infshapes.items():
                yield (f"{prefix}.{name}" if prefix else name), infshape


def _same_shape(t: Tensor, infshape: Any) -> bool:
    return list(t.shape) == list(infshape.shape())


def _rebuild_index() -> None:
    _INDEX.clear()
    for rec in list(_RECORDS):
        owner = rec.owner
        if owner is None:
            continue
        params = owner.__dict__.get("_parameters", {})
        for name in rec.infshapes:
            p = params.get(name)
            if p is not None:
                _INDEX.setdefault(id(p), []).append((weakref.ref(rec), name))


def _holders(t: Tensor) -> list[tuple[ModuleRecord, str]]:
    """The recorded modules that hold ``t`` under a recorded name."""

    def current() -> list:
        out = []
        for ref, name in _INDEX.get(id(t), ()):
            rec = ref()
            owner = None if rec is None else rec.owner
            if owner is not None and owner.__dict__.get("_parameters", {}).get(name) is t:
                out.append((rec, name))
        return out

    found = current()
    if not found:
        _rebuild_index()
        found = current()
    return found


def _is_dtensor(t: Tensor) -> bool:
    if "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _under_fsdp(rec: ModuleRecord) -> bool:
    """Whether the record's module is managed by an FSDP2 unit (so that its
    sharded parameters are DTensors)."""
    if "torch.distributed.fsdp" not in sys.modules:
        return False
    from torch.distributed.fsdp import FSDPModule

    owner = rec.owner
    root = rec.root if rec.root is not None else owner
    for m in root.modules():
        if isinstance(m, FSDPModule) and any(sub is owner for sub in m.modules()):
            return True
    return False


def _usable(t: Tensor, rec: ModuleRecord, name: str) -> bool:
    # A plain tensor where FSDP2 keeps DTensors is the all-gathered copy the
    # root holds between a forward and the backward: an optimizer built on it
    # would update a buffer that FSDP frees.
    return _same_shape(t, rec.infshapes[name]) and (_is_dtensor(t) or not _under_fsdp(rec))


def find_infshape(t: Any) -> Optional[Any]:
    """``t.infshape``, or the infshape recorded for the module slot now holding ``t``.

    A recovered infshape is attached to ``t`` (later lookups are plain
    attribute reads).  ``None`` when neither exists; :func:`explain_missing`
    then says why.
    """
    infshape = getattr(t, "infshape", None)
    if infshape is not None or not isinstance(t, Tensor):
        return infshape
    for rec, name in _holders(t):
        if _usable(t, rec, name):
            infshape = rec.infshapes[name]
            t.infshape = infshape
            return infshape
    return None


def explain_missing(t: Tensor) -> str:
    """Which case a tensor without a findable infshape looks like, and the fix."""
    for rec, name in _holders(t):
        owner = rec.owner
        where = f"{type(owner).__name__}.{name}"
        recorded = rec.infshapes[name]
        if not _same_shape(t, recorded):
            return (
                f"it replaced {where}, whose infshape recorded by set_base_shapes has shape "
                f"{list(recorded.shape())}: call fastmup.set_base_shapes again after changing the model's sizes"
            )
        return (
            f"it is the unsharded copy of {where} that FSDP2 keeps between a forward and the backward: "
            "call model.reshard() before building the optimizer, so that model.parameters() are the "
            "sharded DTensor parameters (set_base_shapes was called, nothing else is missing)"
        )
    if _is_dtensor(t):
        return (
            "it is a DTensor parameter (FSDP2) held by no module of a model on which set_base_shapes was "
            "called: call fastmup.set_base_shapes(model, base, delta=...) before fully_shard, or "
            "fastmup.distributed.reattach_infshapes(model, base_shapes) after it"
        )
    if not any(rec.owner is not None for rec in list(_RECORDS)):
        return "fastmup.set_base_shapes(model, base, delta=...) has not been called on any model alive in this process"
    return (
        "it is held by no module of a model on which fastmup.set_base_shapes was called (a model built, or "
        "copied, before set_base_shapes? a tensor made outside a module?): call "
        "fastmup.set_base_shapes(model, base, delta=...) on the model that holds it"
    )
