import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fastmup.arch import (
    Dag,
    DagMLP,
    Edge,
    arch_init_,
    degree_init_,
    in_degrees,
    init_dag_network_,
    lr_scale,
    path_depths,
    paths,
    readout_init_,
)
from fastmup.layer import MuReadout
from fastmup.shape import set_base_shapes

DIAMOND = "2_10_022"  # 0 -layer-> 1 -layer-> 3,  0 -skip-> 2 -layer-> 3


@pytest.mark.parametrize(
    "code, kind, kernel_size, want",
    [
        ("2_02_002_0002", "mlp", 3, 0.28057),
        ("2_01_001_0001", "mlp", 3, 0.64952),
        ("1_01_001_0001", "mlp", 3, 1.0),
        ("2_02_002_0002", "cnn", 5, 0.16834),
        ("2_02_002", "nb201", 3, 0.125),
    ],
)
def test_lr_scale_golden(code, kind, kernel_size, want):
    assert lr_scale(code, kind, kernel_size=kernel_size) == pytest.approx(want, abs=1e-5)
    assert lr_scale(Dag.from_string(code, kind), kernel_size=kernel_size) == pytest.approx(want, abs=1e-5)


def test_lr_scale_formula_on_diamond_and_kinds():
    # Paths carry 2 and 1 layers: sqrt(27 / (5³ + 4³)).
    assert lr_scale(DIAMOND) == pytest.approx(math.sqrt(27 / 189), abs=1e-12)
    assert lr_scale(DIAMOND, "cnn", kernel_size=7) == pytest.approx(math.sqrt(27 / 189) * 3 / 7, abs=1e-12)
    # nb201: conv1x1 (2) and conv3x3 (3) count, skip (1) and avg-pool (4) do not.
    # "3_14_202": 0-3x3->1-pool->2-1x1->3 has 2 convs, 0-skip->2-1x1->3 and 0-1x1->3 one each.
    assert path_depths("3_14_202", "nb201") == [2, 1, 1]  # paths 0123, 023, 03
    assert lr_scale("3_14_202", "nb201") == pytest.approx(math.sqrt(1 / (2**3 + 3**3 + 2**3)), abs=1e-12)
    # An mlp DAG may be read as cnn (same alphabet) but not as nb201.
    assert lr_scale(Dag.from_string(DIAMOND), "cnn") == pytest.approx(math.sqrt(27 / 189), abs=1e-12)
    with pytest.raises(ValueError, match="nb201"):
        lr_scale(Dag.from_string(DIAMOND), "nb201")
    with pytest.raises(ValueError, match="kernel_size"):
        lr_scale(DIAMOND, "cnn", kernel_size=0)


@pytest.mark.parametrize(
    "code, kind", [("0_00_000", "mlp"), ("2_20_000", "mlp"), ("0_02", "cnn"), ("3_30_000", "nb201")]
)
def test_no_path_gives_one(code, kind):
    assert paths(code, kind) == []
    assert lr_scale(code, kind) == 1.0


@pytest.mark.parametrize(
    "code, kind",
    [("2", "mlp"), ("2_02_002_0002", "mlp"), ("1_21_000_1202", "cnn"), ("3_14_402", "nb201"), ("0_00", "mlp")],
)
def test_string_round_trip(code, kind):
    dag = Dag.from_string(code, kind)
    assert dag.to_string() == code
    assert str(dag) == code
    assert Dag.from_string(dag.to_string(), kind) == dag
    assert Dag.from_edges(dag.num_nodes, list(reversed(dag.edges)), kind) == dag


def test_from_edges_matches_string_and_drops_zero_codes():
    dag = Dag.from_edges(4, [(2, 3, 2), (0, 1, 2), (1, 3, 2), (0, 2, 1), (0, 3, 0)])
    assert dag == Dag.from_string(DIAMOND)
    assert dag.to_string() == DIAMOND
    assert dag.edges == (Edge(0, 1, 2), Edge(0, 2, 1), Edge(1, 3, 2), Edge(2, 3, 2))
    assert dag.layer_edges == (Edge(0, 1, 2), Edge(1, 3, 2), Edge(2, 3, 2))


def test_diamond_paths_depths_degrees():
    dag = Dag.from_string(DIAMOND)
    assert paths(dag) == [
        [Edge(0, 1, 2), Edge(1, 3, 2)],
        [Edge(0, 2, 1), Edge(2, 3, 2)],
    ]
    assert path_depths(DIAMOND) == [2, 1]
    assert in_degrees(DIAMOND) == [0, 1, 1, 2]
    # A direct input->output skip adds a third, parameter-free path.
    assert path_depths("2_10_122") == [2, 1, 0]
    assert in_degrees("2_10_122") == [0, 1, 1, 3]


def _random_code(draw_digits, n_groups):
    return "_".join("".join(draw_digits[k * (k + 1) // 2 : (k + 1) * (k + 2) // 2]) for k in range(n_groups))


def _codes(n):
    size = n * (n + 1) // 2
    return st.tuples(st.just(n), st.lists(st.sampled_from("012"), min_size=size, max_size=size))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 6).flatmap(_codes))
def test_paths_against_path_count_recursion(case):
    n, digits = case
    code = _random_code(digits, n)
    dag = Dag.from_string(code)
    assert dag.to_string() == code
    # Count input->output paths by dynamic programming over the string itself.
    groups = code.split("_")
    count = [1] + [0] * n
    for dst in range(1, n + 1):
        count[dst] = sum(count[src] for src, c in enumerate(groups[dst - 1]) if c != "0")
    found = dag.paths()
    assert len(found) == count[n]
    assert len({tuple(p) for p in found}) == len(found)
    for p in found:
        assert p[0].src == 0 and p[-1].dst == n
        assert all(a.dst == b.src for a, b in zip(p, p[1:]))
    assert dag.path_depths() == [sum(e.code == 2 for e in p) for p in found]


@pytest.mark.parametrize(
    "code, kind, match",
    [
        ("", "mlp", "empty"),
        ("2_0x", "mlp", "invalid character"),
        ("2 _02", "mlp", "invalid character"),
        ("3_02", "mlp", "invalid character"),  # 3 is not an mlp code
        ("5", "nb201", "invalid character"),
        ("2_002", "mlp", "group 1"),
        ("22_002", "mlp", "group 0"),
        ("2__002", "mlp", "group 1"),
        ("_2", "mlp", "group 0"),
        ("2_02_", "mlp", "group 2"),
        ("2", "rnn", "kind"),
    ],
)
def test_bad_strings(code, kind, match):
    with pytest.raises(ValueError, match=match):
        Dag.from_string(code, kind)


@pytest.mark.parametrize(
    "num_nodes, edges, match",
    [
        (3, [(1, 0, 2)], "backwards"),
        (3, [(1, 1, 2)], "backwards"),
        (3, [(0, 3, 2)], "outside"),
        (3, [(-1, 2, 2)], "outside"),
        (3, [(0, 1, 2), (0, 1, 1)], "duplicate"),
        (3, [(0, 1, 3)], "code 3"),
        (1, [], "num_nodes"),
    ],
)
def test_bad_edges(num_nodes, edges, match):
    with pytest.raises(ValueError, match=match):
        Dag.from_edges(num_nodes, edges)


def test_bad_types():
    with pytest.raises(TypeError):
        Dag.from_string(2002)
    with pytest.raises(TypeError):
        lr_scale(["2", "02"])


def _empirical_std(t):
    return t.double().std().item()


def test_init_std_matches_formula():
    # Node 3 of "2_02_112" has in-degree 3 (0->3, 1->3 skips and 2->3 layer),
    # so an edge leaving node 3 would use degree 3.  Take "2_02_112_0002":
    # edge 3->4 leaves node 3.
    dag = Dag.from_string("2_02_112_0002")
    assert dag.in_degrees()[3] == 3
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(2048, 512)
    arch_init_(layer, dag, (3, 4), generator=gen)
    want = math.sqrt(2 / (3 * 2048))
    # n = 2**20 normal draws: the sample std has relative s.e. 1/sqrt(2n) ≈ 7e-4,
    # so 1% is a ~14σ band (cannot flake) that still separates degree 3 from 2 (22%).
    assert _empirical_std(layer.weight) == pytest.approx(want, rel=1e-2)
    assert abs(layer.weight.double().mean().item()) < 5 * want / 2**10
    assert torch.count_nonzero(layer.bias) == 0

    # Edge 0->1 leaves the input node: in-degree 0 is clamped to 1.
    arch_init_(layer, dag, Edge(0, 1, 2), generator=gen)
    assert _empirical_std(layer.weight) == pytest.approx(math.sqrt(2 / 2048), rel=1e-2)


def test_conv_and_readout_init_std():
    gen = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(64, 256, 3)
    degree_init_(conv, 2, generator=gen)
    # fan_in = 64·3·3 = 576, n = 147456 draws: s.e. ≈ 1.8e-3, band 2% ≈ 11σ.
    assert _empirical_std(conv.weight) == pytest.approx(math.sqrt(2 / (2 * 576)), rel=2e-2)
    assert torch.count_nonzero(conv.bias) == 0

    readout = nn.Linear(1024, 500)
    readout_init_(readout, generator=gen)
    # std = 2 / fan_out = 2 / 500; n = 512000: s.e. ≈ 1e-3, band 1% ≈ 10σ.
    assert _empirical_std(readout.weight) == pytest.approx(2 / 500, rel=1e-2)
    assert torch.count_nonzero(readout.bias) == 0


def test_init_is_deterministic_with_generator():
    a, b = nn.Linear(16, 16), nn.Linear(16, 16)
    arch_init_(a, DIAMOND, (2, 3), generator=torch.Generator().manual_seed(5))
    arch_init_(b, DIAMOND, (2, 3), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.weight, b.weight)


def test_arch_init_rejects_bad_edges():
    layer = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="no edge"):
        arch_init_(layer, DIAMOND, (0, 3))
    with pytest.raises(ValueError, match="no parameters"):
        arch_init_(layer, DIAMOND, (0, 2))  # a skip
    with pytest.raises(ValueError, match="code"):
        arch_init_(layer, DIAMOND, (0, 1, 1))
    with pytest.raises(TypeError, match="no Linear"):
        arch_init_(nn.ReLU(), DIAMOND, (0, 1))


def test_init_dag_network_checks_edges():
    layers = {(0, 1): nn.Linear(8, 8), (1, 3): nn.Linear(8, 8)}
    with pytest.raises(ValueError, match=r"lacks.*\(2, 3\)"):
        init_dag_network_(DIAMOND, layers)
    with pytest.raises(ValueError, match="not a parametrised edge"):
        init_dag_network_(DIAMOND, {**layers, (2, 3): nn.Linear(8, 8), (0, 2): nn.Linear(8, 8)})
    gen = torch.Generator().manual_seed(2)
    block = nn.Sequential(nn.Linear(512, 512), nn.ReLU())
    init_dag_network_(DIAMOND, {**layers, Edge(2, 3, 2): block}, generator=gen)
    assert _empirical_std(block[0].weight) == pytest.approx(math.sqrt(2 / 512), rel=2e-2)


def test_dag_mlp_forward_matches_topology():
    torch.manual_seed(0)
    model = DagMLP(DIAMOND, d_in=6, width=32, d_out=3, generator=torch.Generator().manual_seed(0))
    set_base_shapes(model, None)  # MuReadout needs a width multiplier (here 1)
    assert isinstance(model.readout, MuReadout)
    assert set(model.edge_layers.keys()) == {"0_1", "1_3", "2_3"}
    x = torch.randn(5, 2, 3)  # flattened to 6 features
    with torch.no_grad():
        h0 = model.stem(x.flatten(1))
        h1 = model.edge_layers["0_1"](h0)
        h2 = h0  # skip
        h3 = model.edge_layers["1_3"](h1) + model.edge_layers["2_3"](h2)
        want = model.readout(h3)
        got = model(x)
    assert got.shape == (5, 3)
    assert torch.allclose(got, want, rtol=0, atol=1e-6)
    # eq. 4: 2->3 leaves node 2 (in-degree 1); all hidden biases are zero.
    assert all(torch.count_nonzero(m[0].bias) == 0 for m in model.edge_layers.values())


def test_dag_mlp_node_without_inputs_is_zero():
    model = set_base_shapes(DagMLP("2_00", d_in=4, width=8, d_out=2), None)
    with torch.no_grad():
        out = model(torch.randn(3, 4))
    # The output node has no incoming edge: the readout sees zeros, so only its bias remains.
    assert torch.allclose(out, model.readout.bias.expand(3, 2))
    assert model.depth_lr_scales() and set(model.depth_lr_scales().values()) == {1.0}


def test_dag_mlp_depth_lr_scales_and_readout_zero_init():
    model = DagMLP("2_02_002_0002", d_in=4, width=16, d_out=2, readout_zero_init=True)
    assert torch.count_nonzero(model.readout.weight) == 0
    scales = model.depth_lr_scales()
    params = list(model.parameters())
    assert len(scales) == len(params) and all(any(p is q for q in scales) for p in params)
    assert len(set(scales.values())) == 1  # the paper's rule is one global multiplier
    assert next(iter(scales.values())) == pytest.approx(0.28057, abs=1e-5)
    cnn = model.depth_lr_scales("cnn", kernel_size=5)
    assert len(set(cnn.values())) == 1 and next(iter(cnn.values())) == pytest.approx(0.16834, abs=1e-5)
    with pytest.raises(ValueError):
        model.depth_lr_scales("nb201")
    with pytest.raises(ValueError, match="nb201"):
        DagMLP(Dag.from_string("2", "nb201"), 4, 8, 2)


def test_dag_mlp_composes_with_mup_base_shapes():
    base = DagMLP(DIAMOND, d_in=6, width=8, d_out=3)
    delta = DagMLP(DIAMOND, d_in=6, width=16, d_out=3)
    model = DagMLP(DIAMOND, d_in=6, width=64, d_out=3)
    set_base_shapes(model, base, delta=delta)
    assert model.readout.width_mult() == 8.0
    out = model(torch.randn(4, 6))
    assert out.shape == (4, 3) and torch.isfinite(out).all()
    assert set(map(id, model.depth_lr_scales())) == set(map(id, model.parameters()))
