"""set_depth: the depth record, where it is kept, and the branch multiplier."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import fastmup
from fastmup.depth import DEPTH_KEY, DepthInfo, branch_multiplier, depth_info


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(2 * d, d)
        self.scale = fastmup.BranchMultiplier()

    def forward(self, x):
        return x + self.scale(self.proj(torch.relu(self.fc(self.norm(x)))))


class Net(nn.Module):
    def __init__(self, d: int, depth: int) -> None:
        super().__init__()
        self.emb = nn.Linear(3, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.out = fastmup.MuReadout(d, 2)

    def forward(self, x):
        x = self.emb(x)
        for b in self.blocks:
            x = b(x)
        return self.out(self.norm(x))


def net(d: int = 16, depth: int = 6, **depth_kw) -> Net:
    torch.manual_seed(0)
    model = Net(d, depth)
    fastmup.set_base_shapes(model, Net(8, depth), delta=Net(12, depth))
    if depth_kw:
        fastmup.set_depth(model, **{"blocks": model.blocks, **depth_kw})
    return model


def records(model: nn.Module) -> dict:
    return {n: getattr(p.infshape, "depth", None) for n, p in model.named_parameters()}


def test_records_on_the_block_parameters_only():
    model = net(base_depth=2, alpha=0.5)
    info = DepthInfo(6, 2, 0.5)
    for name, rec in records(model).items():
        assert rec == (info if name.startswith("blocks.") else None), name
    assert info.mult == 3.0 and info.branch_multiplier == 3.0**-0.5
    assert all(b.scale.multiplier == 3.0**-0.5 for b in model.blocks)
    assert branch_multiplier(model.blocks[2]) == 3.0**-0.5 and branch_multiplier(model) == 1.0
    assert depth_info(model.blocks[0].fc.weight) == info and depth_info(model.out.weight) is None


def test_branch_multiplier_scales_the_forward():
    plain, scaled = net(), net(base_depth=6, alpha=1.0)  # m_L = 1: the same model
    x = torch.randn(4, 3)
    assert torch.equal(plain(x), scaled(x))
    deep = net(base_depth=2, alpha=1.0)
    assert not torch.equal(plain(x), deep(x))
    b = plain.blocks[0]
    h = torch.randn(4, 16)
    branch = b.proj(torch.relu(b.fc(b.norm(h))))
    deep.blocks[0].load_state_dict(b.state_dict())
    torch.testing.assert_close(deep.blocks[0](h), h + branch / 3.0, rtol=0, atol=1e-6)


def test_alpha_zero_multiplies_by_exactly_one():
    model = net(base_depth=2, alpha=0.0)
    assert all(b.scale.multiplier == 1.0 for b in model.blocks)
    x = torch.randn(2, 16)
    assert model.blocks[0].scale(x) is x


def test_second_call_replaces_the_first():
    model = net(base_depth=2, alpha=0.5)
    fastmup.set_depth(model, blocks=model.blocks[:3], base_depth=1, alpha=1.0)
    for name, rec in records(model).items():
        expected = DepthInfo(3, 1, 1.0) if name.split(".")[:2] in (["blocks", "0"], ["blocks", "1"], ["blocks", "2"]) else None
        assert rec == expected, name
    assert [b.scale.multiplier for b in model.blocks] == [1 / 3] * 3 + [1.0] * 3


def test_blocks_by_name():
    model = net()
    fastmup.set_depth(model, blocks=[f"blocks.{i}" for i in range(6)], base_depth=3, alpha=1.0)
    assert records(model)["blocks.5.fc.weight"] == DepthInfo(6, 3, 1.0)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(base_depth=0), "base_depth must be a positive int"),
        (dict(base_depth=2.5), "base_depth must be a positive int"),
        (dict(base_depth=2, alpha=0.3), "alpha=0.3 is outside"),
        (dict(base_depth=2, alpha=1.5), "alpha=1.5 is outside"),
        (dict(base_depth=2, alpha=float("nan")), "alpha must be a real number"),
        (dict(base_depth=2, alpha=True), "alpha must be a real number"),
        (dict(base_depth=2, blocks=[]), "blocks is empty"),
        (dict(base_depth=2, blocks=["blocks.9"]), "no module named 'blocks.9'"),
        (dict(base_depth=2, blocks=[nn.Linear(2, 2)]), "not a submodule"),
    ],
)
def test_bad_arguments_leave_the_model_unchanged(kw, match):
    model = net(base_depth=2, alpha=0.5)
    before = records(model)
    with pytest.raises(ValueError, match=match):
        fastmup.set_depth(model, **{"blocks": model.blocks, **kw})
    assert records(model) == before
    assert all(b.scale.multiplier == 3.0**-0.5 for b in model.blocks)


def test_nested_and_single_blocks_are_refused():
    model = net()
    with pytest.raises(ValueError, match="lies inside block"):
        fastmup.set_depth(model, blocks=[model.blocks[0], model.blocks[0].fc], base_depth=1)
    with pytest.raises(TypeError, match="single Block"):
        fastmup.set_depth(model, blocks=model.blocks[0], base_depth=1)


def test_needs_base_shapes_first():
    model = Net(16, 4)
    with pytest.raises(ValueError, match="has no μP base shapes.*set_base_shapes"):
        fastmup.set_depth(model, blocks=model.blocks, base_depth=2)


def test_parameter_shared_with_the_outside_is_refused():
    def tied(d):
        m = Net(d, 6)
        m.blocks[0].norm.weight = m.norm.weight  # tied across the block boundary
        return m

    model = tied(16)
    fastmup.set_base_shapes(model, tied(8), delta=tied(12))
    with pytest.raises(ValueError, match="shared between a residual block"):
        fastmup.set_depth(model, blocks=model.blocks, base_depth=2)
    assert all(getattr(p.infshape, "depth", None) is None for p in model.parameters())


def test_survives_deepcopy_and_pickle():
    model = net(base_depth=2, alpha=0.5)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert records(clone) == records(model)
        assert [b.scale.multiplier for b in clone.blocks] == [b.scale.multiplier for b in model.blocks]
    clone = copy.deepcopy(model)
    assert fastmup.depth.depth_state(clone) == fastmup.depth.depth_state(model)


def test_survives_replaced_parameters():
    """A parameter object put in the place of a recorded one (FSDP2, to_empty,
    load_state_dict(assign=True)) finds its infshape, with the depth record."""
    model = net(base_depth=2, alpha=1.0)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert getattr(model.blocks[1].fc.weight, "infshape", None) is None  # a new Parameter
    assert depth_info(model.blocks[1].fc.weight) == DepthInfo(6, 2, 1.0)
    opt = fastmup.MuSGD(model.parameters(), lr=0.1)
    table = opt.tensor_hyperparameters()
    assert table[model.blocks[1].fc.weight]["lr"] == pytest.approx(0.1 * 3.0)  # SGD, α = 1: m_L^(2α-1)


def test_base_shapes_state_round_trip_through_torch_save():
    model = net(base_depth=2, alpha=0.5)
    state = fastmup.base_shapes_state(model)
    assert state[DEPTH_KEY] == {"depth": 6, "base_depth": 2, "alpha": 0.5, "blocks": [f"blocks.{i}" for i in range(6)]}
    buf = io.BytesIO()
    torch.save({"base_shapes": state, "model": model.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    fresh = Net(16, 6)
    fastmup.set_base_shapes(fresh, ckpt["base_shapes"], rescale_params=False)
    fresh.load_state_dict(ckpt["model"])
    assert records(fresh) == records(model)
    x = torch.randn(3, 3)
    assert torch.equal(fresh(x), model(x))
    a = fastmup.MuAdamW(model.parameters(), lr=1e-3, eps_scaling=True).tensor_hyperparameters()
    b = fastmup.MuAdamW(fresh.parameters(), lr=1e-3, eps_scaling=True).tensor_hyperparameters()
    assert [a[p] for p in model.parameters()] == [b[p] for p in fresh.parameters()]


def test_state_without_depth_is_unchanged_and_bsh_files_stay_mups(tmp_path):
    plain = net()
    assert DEPTH_KEY not in fastmup.base_shapes_state(plain)
    model = net(base_depth=2, alpha=0.5)
    path = tmp_path / "m.bsh"
    fastmup.save_base_shapes(fastmup.base_shapes_state(model), path)
    assert DEPTH_KEY not in path.read_text()
    assert set(fastmup.load_base_shapes(path)) == {n for n, _ in model.named_parameters()}


def test_bad_depth_record_leaves_the_model_unchanged():
    model = net(base_depth=2, alpha=0.5)
    state = fastmup.base_shapes_state(model)
    fresh = Net(16, 6)
    bad = {**state, DEPTH_KEY: {**state[DEPTH_KEY], "blocks": ["nope"] * 6}}
    with pytest.raises(ValueError, match="no module named 'nope'"):
        fastmup.set_base_shapes(fresh, bad, rescale_params=False)
    assert all(getattr(p, "infshape", None) is None for p in fresh.parameters())


def test_new_base_shapes_keep_the_depth_declaration():
    model = net(base_depth=2, alpha=0.5)
    fastmup.set_base_shapes(model, Net(8, 6), delta=Net(12, 6), rescale_params=False)
    assert records(model)["blocks.0.fc.weight"] == DepthInfo(6, 2, 0.5)


def test_reattach_infshapes_passes_the_depth_record():
    from fastmup.distributed import reattach_infshapes

    model = net(base_depth=2, alpha=0.5)
    state = fastmup.base_shapes_state(model)
    fresh = Net(16, 6)
    reattach_infshapes(fresh, state)
    assert records(fresh) == records(model)


def test_compiles_without_graph_breaks():
    model = net(base_depth=2, alpha=0.5)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(3, 3)
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
