import copy
import math
import pickle

import mup
import pytest
import torch
from torch import nn

import fastmup
from fastmup.infshape import InfDim, InfShape, MissingInfShapeError
from fastmup.layer import MuReadout, MuSharedReadout, rescale_linear_bias

try:
    from tests.models import (BASE_WIDTH, VOCAB, lm_batch, make_mlp, make_mup_mlp, make_transformer, mlp_batch,
                              set_shapes)
except ImportError:
    from models import (BASE_WIDTH, VOCAB, lm_batch, make_mlp, make_mup_mlp, make_transformer, mlp_batch,
                        set_shapes)

WIDTH = 32
M = WIDTH / BASE_WIDTH


def readout_model(width=WIDTH, **kw):
    return set_shapes(lambda w: make_mlp(w, **kw), width)


def test_all_matches_mup_public_api():
    assert set(fastmup.layer.__all__) == {"MuReadout", "MuSharedReadout", "rescale_linear_bias"}


def test_init_and_state_dict_like_nn_linear():
    torch.manual_seed(0)
    lin = nn.Linear(12, 5)
    torch.manual_seed(0)
    ro = MuReadout(12, 5)
    assert torch.equal(lin.weight, ro.weight) and torch.equal(lin.bias, ro.bias)
    assert list(ro.state_dict()) == list(lin.state_dict())
    assert ro._width_mult is None and ro._has_rescaled_params is False
    # positional bias/device/dtype as in nn.Linear, and mup's keyword arguments
    ro = MuReadout(12, 5, False, None, torch.float64, output_mult=2.0, readout_zero_init=True)
    assert ro.bias is None and ro.weight.dtype == torch.float64 and ro.output_mult == 2.0


def test_readout_zero_init():
    ro = MuReadout(12, 5, readout_zero_init=True)
    assert not ro.weight.any() and not ro.bias.any()
    ro.reset_parameters()
    assert not ro.weight.any()


def test_forward_before_set_base_shapes_is_a_clear_error():
    ro = MuReadout(12, 5)
    with pytest.raises(RuntimeError, match=r"MuReadout\(in_features=12, out_features=5\).*set_base_shapes"):
        ro(torch.ones(2, 12))
    with pytest.raises(RuntimeError, match="set_base_shapes"):
        ro.width_mult()


def test_forward_formula_and_parity_with_mup():
    torch.manual_seed(0)
    ours = readout_model(output_mult=3.0)
    torch.manual_seed(0)
    theirs = set_shapes(lambda w: make_mup_mlp(w, output_mult=3.0), WIDTH, lib=mup)
    x = torch.randn(4, WIDTH)
    ro = ours.readout
    assert isinstance(ro._width_mult, float) and ro._width_mult == M == ro.width_mult()
    expected = nn.functional.linear(3.0 * x / M, ro.weight, ro.bias)
    assert torch.equal(ro(x), expected)
    assert torch.equal(ro(x), theirs.readout(x))


def test_rescale_parameters_multiplies_by_sqrt_width_mult_once():
    torch.manual_seed(0)
    ro = MuReadout(WIDTH, 5)
    w0, b0 = ro.weight.detach().clone(), ro.bias.detach().clone()
    ro._set_width_mult(4.0)
    ro._rescale_parameters()
    assert torch.equal(ro.weight, w0 * 2.0) and torch.equal(ro.bias, b0 * 2.0)
    with pytest.raises(RuntimeError, match="already rescaled.*rescale_params=False"):
        ro._rescale_parameters()
    assert torch.equal(ro.weight, w0 * 2.0)
    ro._has_rescaled_params = False  # documented bypass
    ro._rescale_parameters()
    assert torch.equal(ro.weight, w0 * 4.0)


def test_set_width_mult_validates():
    ro = MuReadout(4, 2)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive finite"):
            ro._set_width_mult(bad)
    assert ro._width_mult is None


def test_width_mult_falls_back_to_hand_set_infshape():
    ro = MuReadout(8, 3)
    ro.weight.infshape = InfShape([InfDim(None, 3), InfDim(2, 8)])
    assert ro.width_mult() == 4.0
    assert ro(torch.ones(1, 8)).shape == (1, 3)


def test_works_after_deepcopy_and_pickle():
    model = readout_model()
    x = torch.randn(3, 16)
    ref = model(x)
    clone = copy.deepcopy(model)
    # torch's Parameter.__deepcopy__ drops `infshape`: the forward does not read
    # it, and the module's record gives it back to the copy
    assert clone.readout.weight.infshape == model.readout.weight.infshape
    assert clone.readout.width_mult() == M
    assert torch.equal(clone(x), ref)
    clone2 = pickle.loads(pickle.dumps(model))
    assert torch.equal(clone2(x), ref)


def test_works_after_parameters_are_replaced():
    # what FSDP / parameter-flattening wrappers do: new Parameter objects, no attributes
    model = readout_model()
    x = torch.randn(3, 16)
    ref = model(x)
    ro = model.readout
    ro.weight = nn.Parameter(ro.weight.detach().clone())
    ro.bias = nn.Parameter(ro.bias.detach().clone())
    assert not hasattr(ro.weight, "infshape")
    assert torch.equal(model(x), ref)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = readout_model()
    x, y = mlp_batch()
    eager = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    out = compiled(x)
    assert torch.equal(out, eager)
    nn.functional.cross_entropy(out, y).backward()
    assert model.readout.weight.grad is not None
    # the width multiplier is a constant of the graph: a deepcopy compiles too
    clone = copy.deepcopy(model)
    assert torch.equal(torch.compile(clone, fullgraph=True, backend="eager")(x), eager)


def test_shared_readout_ties_weight_and_has_vocab_sized_bias():
    torch.manual_seed(0)
    model = make_transformer(WIDTH, readout_bias=True)
    ro = model.readout
    assert ro.weight is model.embed.weight
    assert ro.bias.shape == (VOCAB,) == (model.embed.weight.shape[0],)
    assert (ro.in_features, ro.out_features) == (WIDTH, VOCAB)
    bound = 1 / math.sqrt(WIDTH)
    assert ro.bias.abs().max() <= bound and ro.bias.abs().max() > bound / 4
    assert [n for n, _ in model.named_parameters()].count("readout.bias") == 1
    assert "readout.weight" not in dict(model.named_parameters())
    fastmup.set_base_shapes(model, make_transformer(BASE_WIDTH, readout_bias=True),
                            delta=make_transformer(2 * BASE_WIDTH, readout_bias=True))
    x, y = lm_batch()
    logits = model(x)
    assert logits.shape == (*x.shape, VOCAB)
    assert ro.width_mult() == M
    # mup's version cannot even run a forward pass with its bias
    bad = mup.MuSharedReadout(nn.Embedding(VOCAB, WIDTH).weight, bias=True)
    assert bad.bias.shape == (WIDTH,)


def test_shared_readout_options():
    emb = nn.Embedding(11, 6)
    before = emb.weight.detach().clone()
    ro = MuSharedReadout(emb.weight, readout_zero_init=True, output_mult=0.5)
    assert not ro.bias.any() and torch.equal(emb.weight, before)  # embedding not zeroed
    ro.reset_parameters()
    assert torch.equal(emb.weight, before)
    ro = MuSharedReadout(emb.weight, bias=False)
    assert ro.bias is None
    # with readout_zero_init nothing is drawn (as in mup)
    state = torch.get_rng_state()
    MuSharedReadout(emb.weight, readout_zero_init=True)
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(TypeError, match="nn.Parameter"):
        MuSharedReadout(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="2-D"):
        MuSharedReadout(nn.Parameter(torch.zeros(3)))
    with pytest.raises(TypeError, match="unexpected keyword"):
        MuSharedReadout(emb.weight, bogus=1)


# ---------------------------------------------------------------------------
# the random stream: building a readout draws what mup's draws


def _next_draws(build, seed=0):
    torch.manual_seed(seed)
    layer = build()
    return layer, torch.rand(8), torch.randn(3, dtype=torch.float64)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("zero", [False, True])
def test_readout_consumes_the_rng_as_mup(bias, zero):
    ours, a, b = _next_draws(lambda: MuReadout(WIDTH, 7, bias=bias, readout_zero_init=zero))
    theirs, c, d = _next_draws(lambda: mup.MuReadout(WIDTH, 7, bias=bias, readout_zero_init=zero))
    assert torch.equal(a, c) and torch.equal(b, d)
    assert torch.equal(ours.weight, theirs.weight)


@pytest.mark.parametrize("chunk", [None, 50, 1], ids=["one-chunk", "rows-of-50", "row-by-row"])
@pytest.mark.parametrize("dtype", [None, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("vocab,width", [(VOCAB, WIDTH), (3, 5), (7, 1)])
def test_shared_readout_consumes_the_rng_as_mup(monkeypatch, vocab, width, zero, bias, dtype, chunk):
    """mup draws a throwaway (width, vocab) weight and a width-sized bias; the
    next draws after building the layer are the same with fastmup, also when
    fastmup makes them in row chunks (CPU)."""
    if chunk is not None:
        monkeypatch.setattr(fastmup.layer, "RNG_CHUNK", chunk)

    def build(lib):
        def f():
            emb = nn.Embedding(vocab, width)
            return lib.MuSharedReadout(emb.weight, bias=bias, readout_zero_init=zero, dtype=dtype)
        return f

    ours, a, b = _next_draws(build(fastmup))
    theirs, c, d = _next_draws(build(mup))
    assert torch.equal(a, c) and torch.equal(b, d)
    assert torch.equal(ours.weight, theirs.weight)
    if bias:
        assert ours.bias.shape == (vocab,) and ours.bias.dtype == (dtype or torch.float32)
        bound = 1 / math.sqrt(width)
        assert ours.bias.abs().max() <= bound
        assert zero == (not ours.bias.any())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bias", [True, False])
def test_shared_readout_consumes_the_cuda_rng_as_mup(bias):
    """On CUDA the draws are one weight-sized launch, as mup's (the Philox
    offset advances per launch, not per element)."""

    def draws(lib):
        torch.manual_seed(0)
        emb = nn.Embedding(VOCAB, WIDTH, device="cuda")
        lib.MuSharedReadout(emb.weight, bias=bias, device="cuda")
        return torch.rand(8, device="cuda"), torch.randn(1000, device="cuda")

    for ours, theirs in zip(draws(fastmup), draws(mup)):
        assert torch.equal(ours, theirs)


def test_shared_readout_on_meta_draws_nothing():
    emb = nn.Embedding(11, 6, device="meta")
    state = torch.get_rng_state()
    ro = MuSharedReadout(emb.weight, device="meta")
    assert ro.bias.is_meta and torch.equal(state, torch.get_rng_state())


def test_tied_model_with_dropout_trains_as_mup():
    """What a different stream breaks: the layer built after the readout and
    the dropout masks.  Same seed, same model, same steps: bit-identical."""

    class Tied(nn.Module):
        def __init__(self, width, layer):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, width)
            self.readout = layer.MuSharedReadout(self.embed.weight, bias=False)
            self.mix = nn.Linear(width, width)  # its init follows the readout's draws
            self.drop = nn.Dropout(0.2)

        def forward(self, idx):
            return self.readout(self.drop(torch.relu(self.mix(self.embed(idx)))))

    def run(lib):
        torch.manual_seed(0)
        model = Tied(WIDTH, lib)
        lib.set_base_shapes(model, Tied(BASE_WIDTH, lib), delta=Tied(2 * BASE_WIDTH, lib))
        opt = lib.MuAdam(model.parameters(), lr=1e-2, **({"backend": "eager"} if lib is fastmup else {}))
        x, y = lm_batch()
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1)).backward()
            opt.step()
        return model

    ours, theirs = run(fastmup), run(mup)
    for (n, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(p, q), n


def test_rescale_linear_bias():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    b0 = lin.bias.detach().clone()
    with pytest.raises(MissingInfShapeError, match="set_base_shapes"):
        rescale_linear_bias(lin)
    lin.weight.infshape = InfShape([InfDim(4, 16), InfDim(8, 32)])  # m_in = 4
    rescale_linear_bias(lin)
    assert torch.equal(lin.bias, b0 * 2.0)
    with pytest.raises(RuntimeError, match="already rescaled"):
        rescale_linear_bias(lin)
    assert torch.equal(lin.bias, b0 * 2.0)
    conv = nn.Conv2d(8, 4, 3)
    conv.weight.infshape = InfShape([InfDim(1, 4), InfDim(2, 8), InfDim(None, 3), InfDim(None, 3)])
    c0 = conv.bias.detach().clone()
    rescale_linear_bias(conv)
    assert torch.equal(conv.bias, c0 * 2.0)
    nobias = nn.Linear(4, 4, bias=False)
    rescale_linear_bias(nobias)  # nothing to do, no flag
    assert not getattr(nobias, "_has_rescaled_params", False)


def test_state_dict_interchanges_with_mup():
    torch.manual_seed(0)
    theirs = set_shapes(make_mup_mlp, WIDTH, lib=mup)
    ours = readout_model()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 16)
    assert torch.equal(ours(x), theirs(x))
