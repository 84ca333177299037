import math

import mup.infshape as mup_infshape
import mup.init as mup_init
import pytest
import torch

import fastmup
import fastmup.init as finit
from fastmup.infshape import InfDim, InfShape, MissingInfShapeError

SQRT5 = math.sqrt(5)

# (name, args, kwargs, needs a mean-zero distribution)
SAMPLERS = [
    ("uniform_", (-0.1, 0.1), {}, False),
    ("uniform_", (), {}, True),  # U(0, 1)
    ("normal_", (0.0, 0.02), {}, False),
    ("normal_", (1.0, 0.5), {}, True),
    ("trunc_normal_", (0.0, 0.02, -0.04, 0.04), {}, False),
    ("trunc_normal_", (), {}, False),
    ("xavier_uniform_", (), {"gain": 1.3}, False),
    ("xavier_normal_", (), {}, False),
    ("kaiming_uniform_", (), {"a": SQRT5}, False),
    ("kaiming_uniform_", (), {"mode": "fan_out", "nonlinearity": "relu"}, False),
    ("kaiming_normal_", (), {"nonlinearity": "relu"}, False),
    ("kaiming_normal_", (), {"mode": "fan_out"}, False),
]
SAMPLER_IDS = [f"{n}{i}" for i, (n, *_) in enumerate(SAMPLERS)]
NEEDS_2D = {"xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_"}


def with_infshape(shape, base, lib=fastmup.infshape):
    """A tensor whose dim i is finite if base[i] is None, else infinite with base base[i]."""
    t = torch.empty(shape)
    t.infshape = lib.InfShape([lib.InfDim(b, d) for b, d in zip(base, shape)])
    return t


# shapes at their base size: inf pattern varies, width multipliers are all 1
BASE_CASES = [
    ((64, 32), (64, 32)),           # hidden, ninf 2
    ((10, 32), (None, 32)),         # readout-like, ninf 1
    ((32, 16), (32, None)),         # input-like, ninf 1
    ((10, 16), (None, None)),       # finite
    ((16, 8, 3, 3), (16, 8, None, None)),  # conv hidden
    ((16, 3, 5, 5), (16, None, None, None)),  # first conv
    ((48,), (48,)),                 # bias / norm
]


def test_all_matches_mup_public_api():
    expected = {
        "constant_std_init_", "uniform_", "normal_", "ones_", "eye_", "trunc_normal_",
        "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "calculate_gain",
    }
    assert set(finit.__all__) == expected
    for name in expected:
        assert hasattr(mup_init, name) and getattr(fastmup, name) is getattr(finit, name)


@pytest.mark.parametrize("shape, base", BASE_CASES, ids=[str(s) for s, _ in BASE_CASES])
@pytest.mark.parametrize("name, args, kwargs, noncentered", SAMPLERS, ids=SAMPLER_IDS)
def test_bit_identical_to_torch_at_base_shape(name, args, kwargs, noncentered, shape, base):
    t = with_infshape(shape, base)
    if name in NEEDS_2D and len(shape) < 2:
        pytest.skip("needs a matrix")
    if noncentered and t.infshape.ninf() == 2:
        pytest.skip("non-centered init is refused for hidden weights")
    ref = torch.empty(shape)
    torch.manual_seed(7)
    getattr(torch.nn.init, name)(ref, *args, **kwargs)
    torch.manual_seed(7)
    out = getattr(finit, name)(t, *args, **kwargs)
    assert out is t
    assert torch.equal(t, ref)


# larger widths: (shape, base) with multipliers 3, 4, 2 and uneven ones
SCALED_CASES = [
    ((96, 48), (32, 16)),            # m_out = m_in = 3
    ((128, 64), (32, 32)),           # m_out = 4, m_in = 2
    ((40, 200), (8, 24)),            # m_in = 25/3
    ((10, 96), (None, 32)),          # readout-like
    ((96, 16), (32, None)),          # input-like
    ((24, 12, 3, 3), (8, 4, None, None)),  # conv hidden
    ((24, 3, 3, 3), (8, None, None, None)),
    ((96,), (32,)),
    ((10, 16), (None, None)),
]


@pytest.mark.parametrize("shape, base", SCALED_CASES, ids=[str(s) for s, _ in SCALED_CASES])
@pytest.mark.parametrize("name, args, kwargs, noncentered", SAMPLERS, ids=SAMPLER_IDS)
def test_scaling_equals_mup(name, args, kwargs, noncentered, shape, base):
    ours = with_infshape(shape, base)
    theirs = with_infshape(shape, base, lib=mup_infshape)
    if name in NEEDS_2D and len(shape) < 2:
        pytest.skip("needs a matrix")
    if noncentered and ours.infshape.ninf() != 1:
        pytest.skip("mup only allows non-centered inits with exactly one infinite dim")
    torch.manual_seed(3)
    getattr(finit, name)(ours, *args, **kwargs)
    torch.manual_seed(3)
    getattr(mup_init, name)(theirs, *args, **kwargs)
    assert torch.equal(ours, theirs)


def test_hidden_weight_std_scales_like_inverse_sqrt_fan_in():
    base, big = with_infshape((64, 64), (64, 64)), with_infshape((256, 256), (64, 64))
    torch.manual_seed(0)
    finit.normal_(base, 0, 1)
    finit.normal_(big, 0, 1)
    assert abs(base.std().item() - 1.0) < 0.05
    assert abs(big.std().item() - 0.5) < 0.02  # m = 4 -> std / 2
    # kaiming fan_in already scales like μP: identical to torch at every width
    t, ref = with_infshape((256, 128), (64, 32)), torch.empty(256, 128)
    torch.manual_seed(1)
    finit.kaiming_normal_(t)
    torch.manual_seed(1)
    torch.nn.init.kaiming_normal_(ref)
    assert torch.equal(t, ref)
    # ...while for a readout (finite fan-out) kaiming keeps the base std
    r = with_infshape((10, 4096), (None, 64))
    finit.kaiming_normal_(r, nonlinearity="linear")
    assert abs(r.std().item() - 1 / 8) < 0.005


def test_xavier_uses_base_fans():
    # vector-like: keeps the std torch would give at base size
    t = with_infshape((1024, 10), (64, None))
    finit.xavier_normal_(t)
    assert abs(t.std().item() - math.sqrt(2 / (64 + 10))) < 0.01
    # hidden: base std / sqrt(m_in)
    h = with_infshape((512, 512), (64, 64))
    finit.xavier_normal_(h)
    assert abs(h.std().item() - math.sqrt(2 / 128) / math.sqrt(8)) < 0.003


def test_ones_and_eye():
    for base in [(None, None), (8, None), (None, 8)]:
        t = with_infshape((8, 8), base)
        assert torch.equal(finit.ones_(t), torch.ones(8, 8))
        assert torch.equal(finit.eye_(t), torch.eye(8))
    h = with_infshape((8, 8), (4, 4))
    with pytest.raises(ValueError, match="at most one infinite dimension.*\\(8, 8\\)"):
        finit.ones_(h)
    with pytest.raises(ValueError, match="identity"):
        finit.eye_(h)


@pytest.mark.parametrize(
    "call",
    [
        lambda t: finit.uniform_(t, 0, 1),
        lambda t: finit.normal_(t, 1.0, 1.0),
        lambda t: finit.trunc_normal_(t, 0, 1, -1, 2),
    ],
    ids=["uniform", "normal", "trunc_normal"],
)
def test_non_centered_refused_for_hidden_weights(call):
    t = with_infshape((8, 8), (4, 4))
    before = t.clone()
    with pytest.raises(ValueError, match="zero-centered"):
        call(t)
    assert torch.equal(t, before) or torch.isnan(before).any()


@pytest.mark.parametrize("name", ["uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_",
                                  "kaiming_uniform_", "kaiming_normal_"])
def test_more_than_two_infinite_dims(name):
    t = with_infshape((4, 4, 4), (2, 2, 2))
    args = (-1, 1) if name == "uniform_" else ()
    with pytest.raises(NotImplementedError, match="3 infinite"):
        getattr(finit, name)(t, *args)


@pytest.mark.parametrize("name", ["uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_",
                                  "kaiming_uniform_", "kaiming_normal_", "ones_", "eye_"])
def test_missing_infshape_error(name):
    with pytest.raises(MissingInfShapeError, match=r"shape \(3, 5\).*set_base_shapes"):
        getattr(finit, name)(torch.empty(3, 5))
    assert issubclass(MissingInfShapeError, ValueError)


def test_constant_std_init_contract():
    calls = []

    def sampler(t, scale=1):
        calls.append(scale)
        t.fill_(scale)

    finit.constant_std_init_(with_infshape((4,), (2,)), sampler)
    finit.constant_std_init_(with_infshape((8, 8), (2, 2)), sampler)
    assert calls == [1, 4 ** -0.5]


def test_generator_argument():
    a, b = with_infshape((32, 32), (8, 8)), with_infshape((32, 32), (8, 8))
    finit.normal_(a, 0, 1, generator=torch.Generator().manual_seed(5))
    finit.normal_(b, 0, 1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    finit.kaiming_uniform_(a, generator=torch.Generator().manual_seed(6))
    ref = torch.empty(32, 32)
    torch.nn.init.kaiming_uniform_(ref, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, ref)


def test_zero_element_tensor_is_a_noop():
    t = with_infshape((0, 4), (None, 2))
    with pytest.warns(UserWarning, match="zero-element"):
        finit.kaiming_normal_(t)


def test_init_on_parameters_keeps_autograd_state():
    model = torch.nn.Linear(8, 8)
    model.weight.infshape = InfShape([InfDim(4, 8), InfDim(4, 8)])
    finit.xavier_uniform_(model.weight)
    assert model.weight.requires_grad and model.weight.grad_fn is None
