r"""Architecture-aware initialisation and learning rates.

Chen, Wu, Wang & Hanin, *Principled Architecture-aware Scaling of
Hyperparameters* (ICLR 2024).  A network is a DAG whose nodes hold
activations and whose edges are parametrised layers (Linear/Conv + ReLU),
skip connections, or absent.  Two prescriptions follow from the topology:

* Initialisation (their eq. 4, as their code implements it): a layer edge
  leaving node :math:`s` is drawn from
  :math:`\mathcal{N}(0, \sigma^2)`,
  :math:`\sigma = \sqrt{2 / (\deg_{in}(s)\cdot\text{fan\_in})}`, with
  :math:`\deg_{in}(s)` the number of non-zero edges entering :math:`s`
  (at least 1), so that summing :math:`\deg_{in}` branches at a node keeps the
  pre-activation variance flat.  The readout is drawn with
  :math:`\sigma = 2/\text{fan\_out}` (degree 1, their ``std_power=2``).
  Biases are zero.
* Learning rate (their eqs. 8, 9): with :math:`L_p` the number of
  parametrised layers along input→output path :math:`p`,

  .. math::

      \eta = \eta_{base}\sqrt{\frac{\sum_{base} L^3}{\sum_p L_p^3}}

  For ``mlp``/``cnn`` the code uses :math:`L_p = d_p + 3` (stem, readout and
  an offset) against a base of :math:`[3]`, and ``cnn`` multiplies by
  :math:`3/k` for kernel size :math:`k`; for NAS-Bench-201 cells
  :math:`L_p = 1 + (\text{conv edges on } p)` against :math:`[1]`.  A DAG
  with no input→output path gets multiplier 1.

String encoding (the paper code's): groups separated by ``_``; group ``k``
(0-based) lists the edges into node ``k+1`` from nodes ``0..k``, one digit
each.  ``mlp``/``cnn``: 0 none, 1 skip, 2 layer.  ``nb201``: 0 none, 1 skip,
2 conv1×1, 3 conv3×3, 4 avg-pool 3×3; only the convolutions are parametrised.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "Edge",
    "Dag",
    "KINDS",
    "paths",
    "path_depths",
    "in_degrees",
    "lr_scale",
    "degree_init_",
    "arch_init_",
    "readout_init_",
    "init_dag_network_",
    "DagMLP",
]

KINDS = ("mlp", "cnn", "nb201")
_NUM_CODES = {"mlp": 3, "cnn": 3, "nb201": 5}
_PARAMETRIZED = {"mlp": frozenset({2}), "cnn": frozenset({2}), "nb201": frozenset({2, 3})}
# mlp and cnn strings share one alphabet, so a DAG parsed as one may be scored
# as the other; nb201 digits mean different operations.
_FAMILY = {"mlp": "layer", "cnn": "layer", "nb201": "nb201"}


class Edge(NamedTuple):
    """A non-zero edge ``src -> dst`` with its operation code."""

    src: int
    dst: int
    code: int


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


@dataclass(frozen=True)
class Dag:
    """A feed-forward cell: nodes ``0..num_nodes-1``, node 0 the input, the
    last node the output, and edges ``src < dst`` with non-zero codes.

    Build one with :meth:`from_string` or :meth:`from_edges`; ``edges`` is
    stored sorted by ``(dst, src)``, the order of the string encoding.
    """

    num_nodes: int
    edges: tuple[Edge, ...]
    kind: str = "mlp"

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        if isinstance(self.num_nodes, bool) or not isinstance(self.num_nodes, int) or self.num_nodes < 2:
            raise ValueError(f"num_nodes must be an int >= 2 (input and output), got {self.num_nodes!r}")
        seen: set[tuple[int, int]] = set()
        clean = []
        for e in self.edges:
            e = tuple(e)
            if len(e) != 3 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in e):
                raise TypeError(f"edge {e} must be three ints (src, dst, code)")
            e = Edge(*(int(v) for v in e))
            src, dst, code = e
            if not 0 <= src < self.num_nodes or not 0 <= dst < self.num_nodes:
                raise ValueError(f"edge {tuple(e)} refers to a node outside 0..{self.num_nodes - 1}")
            if src >= dst:
                raise ValueError(
                    f"edge {tuple(e)} goes backwards (or is a self-loop): edges must run from a lower to a higher node"
                )
            if not 1 <= code < _NUM_CODES[self.kind]:
                raise ValueError(
                    f"edge {tuple(e)} has code {code}; {self.kind} edges use codes 1..{_NUM_CODES[self.kind] - 1} "
                    "(0 means no edge and is not stored)"
                )
            if (src, dst) in seen:
                raise ValueError(f"duplicate edge {src} -> {dst}")
            seen.add((src, dst))
            clean.append(Edge(src, dst, code))
        object.__setattr__(self, "edges", tuple(sorted(clean, key=lambda e: (e.dst, e.src))))

    # -- construction ---------------------------------------------------

    @classmethod
    def from_string(cls, code: str, kind: str = "mlp") -> Dag:
        """Parse the paper code's encoding, e.g. ``"2_02_002_0002"``."""
        _check_kind(kind)
        if not isinstance(code, str):
            raise TypeError(f"DAG code must be a str, got {type(code).__name__}")
        if not code:
            raise ValueError("DAG code is empty; the smallest DAG is one group, e.g. '2'")
        bad = sorted({c for c in code if c != "_" and not ("0" <= c < str(_NUM_CODES[kind]))})
        if bad:
            raise ValueError(
                f"DAG code {code!r} contains invalid character(s) {''.join(bad)!r}; "
                f"{kind} codes are digits 0..{_NUM_CODES[kind] - 1} separated by '_'"
            )
        groups = code.split("_")
        edges = []
        for k, group in enumerate(groups):
            if len(group) != k + 1:
                raise ValueError(
                    f"DAG code {code!r}: group {k} ({group!r}) must have {k + 1} digit(s), one per "
                    f"incoming edge of node {k + 1} from nodes 0..{k}"
                )
            edges.extend(Edge(src, k + 1, int(c)) for src, c in enumerate(group) if c != "0")
        return cls(len(groups) + 1, tuple(edges), kind)

    @classmethod
    def from_edges(cls, num_nodes: int, edges: Iterable[tuple[int, int, int]], kind: str = "mlp") -> Dag:
        """Build from ``(src, dst, code)`` triples; code-0 triples are dropped."""
        edges = [Edge(*e) for e in edges]
        return cls(num_nodes, tuple(e for e in edges if e.code != 0), kind)

    def to_string(self) -> str:
        """The paper code's encoding; ``Dag.from_string(d.to_string(), d.kind) == d``."""
        table = {(e.src, e.dst): e.code for e in self.edges}
        return "_".join(
            "".join(str(table.get((src, dst), 0)) for src in range(dst)) for dst in range(1, self.num_nodes)
        )

    def __str__(self) -> str:
        return self.to_string()

    # -- structure ------------------------------------------------------

    @property
    def output_node(self) -> int:
        return self.num_nodes - 1

    def is_parametrized(self, edge: Edge) -> bool:
        return edge.code in _PARAMETRIZED[self.kind]

    @property
    def layer_edges(self) -> tuple[Edge, ...]:
        """Edges that carry weights (layers / convolutions)."""
        return tuple(e for e in self.edges if self.is_parametrized(e))

    def edge(self, src: int, dst: int) -> Edge | None:
        for e in self.edges:
            if e.src == src and e.dst == dst:
                return e
        return None

    def in_degrees(self) -> list[int]:
        """Number of non-zero incoming edges of every node (node 0 has 0)."""
        deg = [0] * self.num_nodes
        for e in self.edges:
            deg[e.dst] += 1
        return deg

    def paths(self) -> list[list[Edge]]:
        """Every input→output path through non-zero edges, in lexicographic
        order of node sequences."""
        out_edges: dict[int, list[Edge]] = {n: [] for n in range(self.num_nodes)}
        for e in sorted(self.edges, key=lambda e: (e.src, e.dst)):
            out_edges[e.src].append(e)
        found: list[list[Edge]] = []
        stack: list[Edge] = []

        # Depth is bounded by num_nodes, which strings keep small; recursion is
        # the clearest form.
        def walk(node: int) -> None:
            if node == self.output_node:
                found.append(list(stack))
                return
            for e in out_edges[node]:
                stack.append(e)
                walk(e.dst)
                stack.pop()

        walk(0)
        return found

    def path_depths(self) -> list[int]:
        """Parametrised layers on each path of :meth:`paths`."""
        return [sum(self.is_parametrized(e) for e in p) for p in self.paths()]


def _as_dag(dag: Dag | str, kind: str | None) -> Dag:
    if isinstance(dag, str):
        return Dag.from_string(dag, kind or "mlp")
    if not isinstance(dag, Dag):
        raise TypeError(f"expected a Dag or a DAG code string, got {type(dag).__name__}")
    if kind is not None and _FAMILY[_check_kind(kind)] != _FAMILY[dag.kind]:
        raise ValueError(
            f"a {dag.kind} DAG cannot be read as kind={kind!r}: their edge codes mean different operations"
        )
    return dag


def paths(dag: Dag | str, kind: str | None = None) -> list[list[Edge]]:
    """Input→output paths of ``dag`` (see :meth:`Dag.paths`)."""
    return _as_dag(dag, kind).paths()


def path_depths(dag: Dag | str, kind: str | None = None) -> list[int]:
    """Parametrised layers per input→output path (see :meth:`Dag.path_depths`)."""
    return _as_dag(dag, kind).path_depths()


def in_degrees(dag: Dag | str, kind: str | None = None) -> list[int]:
    """Non-zero incoming edges per node (see :meth:`Dag.in_degrees`)."""
    return _as_dag(dag, kind).in_degrees()


def lr_scale(dag: Dag | str, kind: str | None = None, kernel_size: int = 3) -> float:
    r"""Architecture-aware learning-rate multiplier (eqs. 8, 9).

    ``mlp``: :math:`\sqrt{27 / \sum_p (d_p + 3)^3}`; ``cnn``: the same times
    :math:`3/k`; ``nb201``: :math:`\sqrt{1 / \sum_p (1 + d_p)^3}`, where
    :math:`d_p` counts parametrised edges on path :math:`p`.  1.0 when no path
    joins input and output.  ``kind`` defaults to the DAG's own kind (``mlp``
    for a string); ``kernel_size`` is used by ``cnn`` only.

    Unlike the paper's script, a DAG whose paths are all parameter-free (only
    skips) keeps one term per path instead of collapsing to a single
    ``L = 3``; the two agree whenever there is exactly one such path.
    """
    d = _as_dag(dag, kind)
    kind = kind or d.kind
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"kernel_size must be an int >= 1, got {kernel_size!r}")
    depths = d.path_depths()
    if not depths:
        return 1.0
    if kind == "nb201":
        return math.sqrt(1.0 / sum((1 + L) ** 3 for L in depths))
    scale = math.sqrt(27.0 / sum((L + 3) ** 3 for L in depths))
    if kind == "cnn":
        scale *= 3.0 / kernel_size
    return scale


# -- initialisation -------------------------------------------------------

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _weighted_layers(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, _WEIGHTED):
        return [module]
    found = [m for m in module.modules() if isinstance(m, _WEIGHTED)]
    if not found:
        raise TypeError(f"{type(module).__name__} holds no Linear or Conv1d/2d/3d layer to initialise")
    return found


def _normal_(layer: nn.Module, std: float, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        layer.weight.normal_(0.0, std, generator=generator)
        if layer.bias is not None:
            layer.bias.zero_()


def degree_init_(module: nn.Module, degree: int = 1, *, generator: torch.Generator | None = None) -> nn.Module:
    r"""He-normal init divided among ``degree`` summed branches:
    :math:`\sigma = \sqrt{2 / (\max(1, \text{degree}) \cdot \text{fan\_in})}`,
    biases zero.  Applies to ``module`` itself if it is a Linear/Conv, else to
    every Linear/Conv inside it.  ``fan_in`` is ``in_features`` or
    ``in_channels / groups · prod(kernel_size)``."""
    degree = max(int(degree), 1)
    for layer in _weighted_layers(module):
        w: Tensor = layer.weight
        fan_in = w[0].numel()
        _normal_(layer, math.sqrt(2.0 / (degree * fan_in)), generator)
    return module


def arch_init_(
    layer: nn.Module,
    dag: Dag | str,
    edge: Edge | tuple[int, int] | tuple[int, int, int],
    *,
    kind: str | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    r"""Eq. 4 init of the layer(s) on ``edge`` of ``dag``:
    :math:`\sigma = \sqrt{2 / (\deg_{in}(\text{src}) \cdot \text{fan\_in})}`.

    ``edge`` is ``(src, dst)`` or ``(src, dst, code)``; it must be a
    parametrised edge of ``dag``.  The degree is that of the *source* node,
    as in the paper's main text and code (its appendix writes the target).
    """
    d = _as_dag(dag, kind)
    src, dst = int(edge[0]), int(edge[1])
    found = d.edge(src, dst)
    if found is None:
        raise ValueError(f"{d.to_string()!r} has no edge {src} -> {dst}")
    if len(edge) > 2 and int(edge[2]) != found.code:
        raise ValueError(f"edge {src} -> {dst} has code {found.code} in {d.to_string()!r}, not {edge[2]}")
    if not d.is_parametrized(found):
        raise ValueError(f"edge {src} -> {dst} (code {found.code}) has no parameters to initialise")
    return degree_init_(layer, d.in_degrees()[src], generator=generator)


def readout_init_(module: nn.Module, *, generator: torch.Generator | None = None) -> nn.Module:
    r"""Readout init of the paper's code: :math:`\sigma = 2/\text{fan\_out}`
    (the squared He std at degree 1; ``fan_out`` = ``out_features`` for a
    Linear), biases zero."""
    for layer in _weighted_layers(module):
        w: Tensor = layer.weight
        fan_out = w.shape[0] * w[0, 0].numel() if w.dim() > 2 else w.shape[0]
        _normal_(layer, 2.0 / fan_out, generator)
    return module


def init_dag_network_(
    dag: Dag | str,
    edge_layers: Mapping[Any, nn.Module],
    *,
    stem: nn.Module | None = None,
    readout: nn.Module | None = None,
    kind: str | None = None,
    generator: torch.Generator | None = None,
) -> None:
    """Initialise a whole DAG network in place.

    ``edge_layers`` maps every parametrised edge, as ``(src, dst)`` or an
    :class:`Edge`, to its module (a Linear/Conv or a block containing them).
    The stem (into node 0, degree 1) and readout are optional.
    """
    d = _as_dag(dag, kind)
    wanted = {(e.src, e.dst) for e in d.layer_edges}
    given = {}
    for key, module in edge_layers.items():
        pair = (int(key[0]), int(key[1]))
        if pair not in wanted:
            raise ValueError(f"edge_layers has {pair}, which is not a parametrised edge of {d.to_string()!r}")
        given[pair] = module
    missing = sorted(wanted - given.keys())
    if missing:
        raise ValueError(f"edge_layers lacks a module for parametrised edge(s) {missing}")
    if stem is not None:
        degree_init_(stem, 1, generator=generator)
    for (src, dst), module in sorted(given.items()):
        arch_init_(module, d, (src, dst), generator=generator)
    if readout is not None:
        readout_init_(readout, generator=generator)


# -- example network ------------------------------------------------------


class DagMLP(nn.Module):
    """An MLP whose hidden topology is a DAG.

    ``x -> Linear(d_in, width) + ReLU`` gives node 0; every layer edge is
    ``Linear(width, width) + ReLU``, every skip edge the identity; a node is
    the sum of its incoming edges (zero if it has none); the output node feeds
    a :class:`fastmup.layer.MuReadout`.  Inputs with more than two dimensions
    are flattened after the batch dimension.

    With ``arch_init=True`` (default) the weights follow eq. 4 (see
    :func:`init_dag_network_`); the readout keeps its zeros when
    ``readout_zero_init=True``.  This is the standard-parametrisation init at
    the width it is built with; ``set_base_shapes`` then applies the μP
    rescaling as for any other model.
    """

    def __init__(
        self,
        dag: Dag | str,
        d_in: int,
        width: int,
        d_out: int,
        *,
        bias: bool = True,
        readout_zero_init: bool = False,
        output_mult: float = 1.0,
        arch_init: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        # Imported here so that the DAG maths above does not depend on the
        # layer module being importable.
        from fastmup.layer import MuReadout

        self.dag = _as_dag(dag, "mlp")
        self.stem = nn.Sequential(nn.Linear(d_in, width, bias=bias), nn.ReLU())
        self.edge_layers = nn.ModuleDict(
            {self._key(e): nn.Sequential(nn.Linear(width, width, bias=bias), nn.ReLU()) for e in self.dag.layer_edges}
        )
        self.readout = MuReadout(width, d_out, bias=bias, readout_zero_init=readout_zero_init, output_mult=output_mult)
        self._incoming: list[list[Edge]] = [[] for _ in range(self.dag.num_nodes)]
        for e in self.dag.edges:
            self._incoming[e.dst].append(e)
        if arch_init:
            init_dag_network_(
                self.dag,
                {(e.src, e.dst): self.edge_layers[self._key(e)] for e in self.dag.layer_edges},
                stem=self.stem,
                readout=None if readout_zero_init else self.readout,
                generator=generator,
            )

    @staticmethod
    def _key(e: Edge) -> str:
        return f"{e.src}_{e.dst}"

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() > 2:
            x = x.flatten(1)
        nodes = [self.stem(x)]
        for dst in range(1, self.dag.num_nodes):
            value: Tensor | None = None
            for e in self._incoming[dst]:
                term = self.edge_layers[self._key(e)](nodes[e.src]) if self.dag.is_parametrized(e) else nodes[e.src]
                value = term if value is None else value + term
            nodes.append(value if value is not None else torch.zeros_like(nodes[0]))
        return self.readout(nodes[-1])

    def depth_lr_scales(self, kind: str = "mlp", kernel_size: int = 3) -> dict[nn.Parameter, float]:
        """Per-parameter lr multipliers for ``param_lr_scales`` of the fastmup
        optimizers, where they multiply the μP per-tensor multiplier.

        The paper's rule is one global multiplier, :func:`lr_scale` of the
        DAG, so every parameter (stem, layers and readout alike) gets the same
        value; the mapping form leaves room for per-layer rules.
        """
        scale = lr_scale(self.dag, kind, kernel_size)
        return {p: scale for p in self.parameters()}
