"""Golden depth multipliers: the optimizers' table against the papers' formulas.

The model is GPT-like: token and position embeddings, ``L`` pre-norm blocks
(LayerNorm, attention ``c_attn: d → 3d`` without bias, ``c_proj: d → d``,
LayerNorm, MLP ``c_fc: d → 4d``, ``c_proj: 4d → d``, with biases, each branch
followed by a :class:`fastmup.BranchMultiplier`), a final LayerNorm and a
``MuReadout``.  Base width ``d_0 = 32``, base depth ``L_0 = 2``; ``m_N = d / d_0``,
``m_L = L / L_0``.  With η, λ, ε the group's values, the expected table is
(the width part from ALGORITHMS.md §1, the depth part from §6 and
:mod:`fastmup.optim.multipliers`):

Adam / AdamW (CompleteP, Dey et al. 2025, Table 1 and Eq. 40)::

    tensor                      lr                      λ coupled            λ decoupled   ε (eps_scaling)
    wte, wpe, ln_f, lm_head.W   η                       λ                    λ             ε / m_N
    lm_head.b (finite)          η                       λ                    λ             ε
    block matrices              η / m_N · m_L^(α-1)     λ · m_N · m_L^(-α)   λ · m_N       ε / m_N · m_L^(-α)
    block norms and biases      η · m_L^(α-1)           λ · m_L^(-α)         λ             ε / m_N · m_L^(-α)

SGD (depth-μP, Yang et al. 2023, Tensor Programs VI; the general-α rule of
:mod:`fastmup.optim.multipliers`)::

    wte, wpe, ln_f, lm_head.W   η · m_N                 λ / m_N
    lm_head.b                   η                       λ
    block matrices              η · m_L^(2α-1)          λ · m_L^(-α)      (square in width: m_out/m_in = 1)
    block norms and biases      η · m_N · m_L^(2α-1)    λ / m_N · m_L^(-α)

``decoupled_wd=True``: λ everywhere.  α = 0: no depth factor at all.

The expected values are computed here in another order than the optimizer
computes them (``η / m_N · f`` against ``η · f / m_N``): each is a product of
the same three factors, so they agree to a few units in the last place
(``rel=1e-15`` is about 4.5 ulp).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmup
from fastmup.optim import MuAdam, MuAdamW, MuESGD, MuSGD

BASE_WIDTH, BASE_DEPTH, VOCAB, SEQ = 32, 2, 11, 5
LR, WD, EPS = 0.01, 0.1, 1e-8
REL = 1e-15


class Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        # No bias: the key part of a bias has a zero gradient up to rounding
        # noise (softmax ignores a shift shared by all keys), which Adam would
        # normalise into O(lr) updates that differ between backends.
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.c_proj = nn.Linear(d, d)
        self.n_heads = 4

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=8.0 / d)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = Attention(d)
        self.attn_scale = fastmup.BranchMultiplier()
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d)
        self.mlp_scale = fastmup.BranchMultiplier()

    def forward(self, x):
        x = x + self.attn_scale(self.attn(self.ln_1(x)))
        return x + self.mlp_scale(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, d: int, n_layers: int) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(VOCAB, d),
                wpe=nn.Embedding(SEQ, d),
                h=nn.ModuleList(Block(d) for _ in range(n_layers)),
                ln_f=nn.LayerNorm(d),
            )
        )
        self.lm_head = fastmup.MuReadout(d, VOCAB)

    def forward(self, idx):
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1]))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def gpt(width: int, depth: int, alpha=None, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(width, depth)
    fastmup.set_base_shapes(model, GPT(BASE_WIDTH, depth), delta=GPT(2 * BASE_WIDTH, depth))
    if alpha is not None:
        fastmup.set_depth(model, blocks=model.transformer.h, base_depth=BASE_DEPTH, alpha=alpha)
    return model


def golden(name: str, width: int, depth: int, alpha: float, family: str, decoupled: bool, decoupled_wd: bool = False):
    """``(lr, weight_decay, eps)`` of parameter ``name`` from the tables of the module docstring."""
    m_n, m_l = width / BASE_WIDTH, depth / BASE_DEPTH
    in_block = ".h." in name
    matrix = in_block and name.endswith(".weight") and (".c_" in name)
    finite = name == "lm_head.bias"
    on = in_block and alpha != 0
    if family == "adam":
        lr = LR / m_n if matrix else LR
        wd = WD * m_n if matrix else WD
        if on:
            lr = lr * m_l ** (alpha - 1)
            if not decoupled:
                wd = wd * m_l ** (-alpha)
    else:
        lr = LR if (matrix or finite) else LR * m_n
        wd = WD if (matrix or finite) else WD / m_n
        if on:
            lr = lr * m_l ** (2 * alpha - 1)
            wd = wd * m_l ** (-alpha)
    if decoupled_wd:
        wd = WD
    eps = EPS if finite else EPS / m_n
    if on:
        eps = eps * m_l ** (-alpha)
    return lr, wd, eps


def close(a: float, b: float) -> bool:
    return a == b or math.isclose(a, b, rel_tol=REL)


def make(kind: str, model: nn.Module, backend: str = "eager", **kw):
    params = model.parameters()
    if kind == "adam":
        return MuAdam(params, lr=LR, weight_decay=WD, eps=EPS, backend=backend, **kw)
    if kind == "adamw":
        return MuAdamW(params, lr=LR, weight_decay=WD, eps=EPS, backend=backend, **kw)
    return MuSGD(params, lr=LR, momentum=0.9, weight_decay=WD, backend=backend, **kw)


CASES = [(64, 2, 1.0), (64, 8, 1.0), (128, 8, 0.5), (32, 6, 0.75), (96, 16, 0.5), (64, 8, 0.0)]


@pytest.mark.parametrize("width,depth,alpha", CASES)
@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("decoupled_wd", [False, True])
def test_table_matches_the_formulas(width, depth, alpha, kind, decoupled_wd):
    model = gpt(width, depth, alpha)
    kw = dict(decoupled_wd=decoupled_wd)
    if kind != "sgd":
        kw["eps_scaling"] = True
    opt = make(kind, model, **kw)
    table = opt.tensor_hyperparameters()
    family = "sgd" if kind == "sgd" else "adam"
    for name, p in model.named_parameters():
        lr, wd, eps = golden(name, width, depth, alpha, family, kind == "adamw", decoupled_wd)
        got = table[p]
        assert close(got["lr"], lr), (name, got["lr"], lr)
        assert close(got["weight_decay"], wd), (name, got["weight_decay"], wd)
        if kind != "sgd":
            assert close(got["eps"], eps), (name, got["eps"], eps)


def test_eps_scaling_is_off_by_default():
    model = gpt(64, 8, 1.0)
    table = MuAdamW(model.parameters(), lr=LR, eps=EPS).tensor_hyperparameters()
    assert {v["eps"] for v in table.values()} == {EPS}


def _backends():
    from fastmup import ext

    out = ["eager", "triton"]
    if ext.available("cpu"):
        out.append("cpu")
    return out


@pytest.mark.parametrize("backend", _backends())
# small models: the Triton kernels run in the interpreter here
@pytest.mark.parametrize("kind,width,depth,alpha", [("adamw", 48, 8, 0.5), ("adam", 48, 6, 1.0), ("sgd", 48, 8, 0.5)])
def test_every_backend_steps_with_the_golden_table(backend, kind, width, depth, alpha):
    """The rows each backend's launch reads hold the golden values, and the
    step equals torch.optim's with one param group per tensor holding them."""
    model = gpt(width, depth, alpha)
    reference = copy.deepcopy(model)
    kw = {} if kind == "sgd" else dict(eps_scaling=True)
    opt = make(kind, model, backend=backend, **kw)
    family = "sgd" if kind == "sgd" else "adam"
    names = {p: n for n, p in model.named_parameters()}
    groups = []
    for name, q in reference.named_parameters():
        lr, wd, eps = golden(name, width, depth, alpha, family, kind == "adamw")
        groups.append(dict(params=[q], lr=lr, weight_decay=wd, **({} if kind == "sgd" else dict(eps=eps))))
    if kind == "sgd":
        torch_opt = torch.optim.SGD(groups, lr=LR, momentum=0.9)
    elif kind == "adamw":
        torch_opt = torch.optim.AdamW(groups, lr=LR)
    else:
        torch_opt = torch.optim.Adam(groups, lr=LR)
    idx = torch.randint(VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        for net, o in ((model, opt), (reference, torch_opt)):
            o.zero_grad()
            out = net(idx)
            F.cross_entropy(out.reshape(-1, VOCAB), idx.reshape(-1)).backward()
            o.step()
    seen = 0
    for batch in opt._batches:
        assert batch.backend == backend
        for i, p in enumerate(batch.owners):
            lr, wd, eps = golden(names[p], width, depth, alpha, family, kind == "adamw")
            assert close(batch.value(i, "lr"), lr), names[p]
            assert close(batch.value(i, "weight_decay"), wd), names[p]
            if kind != "sgd":
                assert close(batch.value(i, "eps"), eps), names[p]
            seen += 1
    assert seen == len(names)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if backend == "eager":
            # the reference computes as torch does, in the same fp32 order
            assert torch.equal(p, q), (name, (p - q).abs().max().item())
        else:
            # fused kernels differ from torch's CPU ops by an ulp now and then
            # (sqrt), the second step's gradients see those ulps through the
            # model, and Adam turns a coordinate's small gradient into a full
            # step: a few such coordinates move by ~1e-6.  A wrong lr or weight
            # decay factor moves every coordinate by ~lr (>= 2.5e-3), a
            # hundred times more than the 1e-5 allowed.
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def _train(model: nn.Module, opt, steps: int = 3) -> None:
    idx = torch.randint(VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(idx).reshape(-1, VOCAB), idx.reshape(-1)).backward()
        opt.step()


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_alpha_zero_and_no_set_depth_are_todays_results(kind, backend):
    """Bit-identical tables and steps: no set_depth, set_depth(alpha=0), and
    eps_scaling=False given explicitly."""
    plain, off = gpt(48, 4, None), gpt(48, 4, 0.0)
    kw = {} if kind == "sgd" else dict(eps_scaling=False)
    o1, o2 = make(kind, plain, backend=backend), make(kind, off, backend=backend, **kw)
    t1, t2 = o1.tensor_hyperparameters(), o2.tensor_hyperparameters()
    assert [t1[p] for p in plain.parameters()] == [t2[p] for p in off.parameters()]
    assert all(m.multiplier == 1.0 for m in off.modules() if isinstance(m, fastmup.BranchMultiplier))
    _train(plain, o1, steps=2)
    _train(off, o2, steps=2)
    for p, q in zip(plain.parameters(), off.parameters()):
        assert torch.equal(p, q)
    for b1, b2 in zip(o1._batches, o2._batches):
        assert (b1.rows == b2.rows).all()


def test_alpha_one_keeps_the_width_lr_and_scales_the_branches():
    """CompleteP: the learning rates are μP's (m_L^0 = 1); the forward differs."""
    plain, cp = gpt(64, 8, None), gpt(64, 8, 1.0)
    t1 = MuAdamW(plain.parameters(), lr=LR).tensor_hyperparameters()
    t2 = MuAdamW(cp.parameters(), lr=LR).tensor_hyperparameters()
    assert [t1[p] for p in plain.parameters()] == [t2[p] for p in cp.parameters()]
    mults = {m.multiplier for m in cp.modules() if isinstance(m, fastmup.BranchMultiplier)}
    assert mults == {0.25}


def test_esgd_refuses_depth_scaled_tensors():
    model = gpt(64, 4, 0.5)
    with pytest.raises(NotImplementedError, match=r"transformer\.h\.0\.ln_1\.weight.*ESGD-M has no depth rule"):
        MuESGD(model.named_parameters(), lr=0.1)
    MuESGD(gpt(64, 4, 0.0).parameters(), lr=0.1)  # alpha = 0: μP alone


def test_eps_scaling_must_be_a_bool():
    model = gpt(64, 4, 1.0)
    with pytest.raises(ValueError, match="eps_scaling"):
        MuAdam(model.parameters(), eps_scaling="yes")


def test_eps_scaling_per_group_and_state_dict_round_trip():
    model = gpt(64, 8, 0.5)
    blocks = list(model.transformer.h.parameters())
    ids = {id(p) for p in blocks}
    rest = [p for p in model.parameters() if id(p) not in ids]
    opt = MuAdamW([dict(params=blocks, eps_scaling=True), dict(params=rest)], lr=LR, eps=EPS)
    table = opt.tensor_hyperparameters()
    assert table[blocks[0]]["eps"] == EPS * 0.5 / 2  # m_L = 4, α = ½; m_N = 2
    assert table[rest[0]]["eps"] == EPS
    _train(model, opt, steps=1)
    clone = gpt(64, 8, 0.5)
    blocks2 = list(clone.transformer.h.parameters())
    ids2 = {id(p) for p in blocks2}
    opt2 = MuAdamW([dict(params=blocks2), dict(params=[p for p in clone.parameters() if id(p) not in ids2])], lr=LR)
    opt2.load_state_dict(opt.state_dict())
    t2 = opt2.tensor_hyperparameters()
    assert [t2[p]["eps"] for p in clone.parameters()] == [table[p]["eps"] for p in model.parameters()]


def test_impl_groups_split_by_depth_factor():
    """mup's ``impl=`` path: tensors of one width class but different depth
    factors land in different torch param groups, each with its own lr."""
    model = gpt(64, 8, 0.5)
    opt = MuAdam(model.parameters(), impl=torch.optim.RMSprop, lr=LR)
    lrs = {}
    for g in opt.param_groups:
        for p in g["params"]:
            lrs[p] = g["lr"]
    for name, p in model.named_parameters():
        assert close(lrs[p], golden(name, 64, 8, 0.5, "adam", False)[0]), name
