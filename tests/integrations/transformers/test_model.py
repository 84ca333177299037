"""μP versions of transformers' GPT-2 and Llama (``mup_causal_lm``).

* At base width with the two μP-only choices off (``zero_query``,
  ``readout_zero_init``) the model is the plain transformers model: same
  parameters, same outputs, same training trajectory, bit for bit (also with
  ``fastmup.MuAdamW``'s eager backend against ``torch.optim.AdamW``).
* Wider, the changes are exactly μP's: hidden weights are the plain model's
  draws times ``m_in^-1/2``, queries and the untied readout start at zero,
  attention scales by ``α/d`` (and transformers really uses that scale),
  readouts divide by the width multiplier; GPT-2's ``(fan_in, fan_out)``
  Conv1D weights get their multipliers from the fan-in.
* ``fastmup.MuAdamW(model.parameters())`` trains the model with every
  backend available here, the fused ones agreeing with the eager reference.
* ``save_pretrained`` / ``mup_from_pretrained`` round-trip the μP model.
* Bad input fails with a message naming what is wrong, the model unchanged.
"""
from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch

from tests.integrations.transformers.conftest import KINDS, batch, config, widths_of
from tests.optim.conftest import available_backends

from transformers import AutoModelForCausalLM  # noqa: E402

import fastmup  # noqa: E402
from fastmup.integrations.transformers import (  # noqa: E402
    FanInFirstInfShape,
    convert_to_mup,
    mup_causal_lm,
    mup_from_pretrained,
    mup_record,
    width_config,
)
from fastmup.layer import MuReadout, MuSharedReadout  # noqa: E402
from fastmup.shape import BaseShapesError  # noqa: E402

TIES = [("gpt2", True), ("gpt2", False), ("llama", False), ("llama", True)]


def _tie_id(v):
    return v if isinstance(v, str) else ("tied" if v else "untied")


def _triton_interpreted() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"


def plain_and_mup(cfg, base, delta, seed=0, **kw):
    torch.manual_seed(seed)
    plain = AutoModelForCausalLM.from_config(cfg)
    torch.manual_seed(seed)
    mup = mup_causal_lm(cfg, base, delta, **kw)
    return plain, mup


def params_equal(a, b):
    na, nb = dict(a.named_parameters()), dict(b.named_parameters())
    assert list(na) == list(nb)
    return all(torch.equal(na[k], nb[k]) for k in na)


# ---------------------------------------------------------------------------
# base width: the plain transformers model, bit for bit


@pytest.mark.parametrize("kind,tied", TIES, ids=_tie_id)
def test_base_width_is_the_plain_model(kind, tied):
    base = config(kind, 32, tied=tied, dropout=True)  # dropout on: the RNG streams must agree too
    delta = widths_of(base, 64, heads=8)
    plain, mup = plain_and_mup(base, base, delta, zero_query=False, readout_zero_init=False)
    assert isinstance(mup.lm_head, MuSharedReadout if tied else MuReadout)
    assert (mup.lm_head.weight is mup.get_input_embeddings().weight) == tied
    assert params_equal(plain, mup)

    data = [batch(s) for s in range(4)]
    ref_opt = torch.optim.AdamW(plain.parameters(), lr=3e-3, weight_decay=0.1)
    opts = {
        "torch": torch.optim.AdamW(mup.parameters(), lr=3e-3, weight_decay=0.1),
    }
    # MuAdamW's eager backend is torch's AdamW at base width, so the pair
    # (plain + torch AdamW, μP + MuAdamW) must agree bit for bit as well.
    _, mup2 = plain_and_mup(base, base, delta, zero_query=False, readout_zero_init=False)
    opts["fastmup"] = fastmup.MuAdamW(mup2.parameters(), lr=3e-3, weight_decay=0.1, backend="eager")
    models = {"torch": mup, "fastmup": mup2}
    for step, b in enumerate(data):
        torch.manual_seed(100 + step)
        ref = plain(**b)
        ref.loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        for name, model in models.items():
            torch.manual_seed(100 + step)
            out = model(**b)
            assert torch.equal(out.logits, ref.logits), (name, step)
            assert torch.equal(out.loss, ref.loss), (name, step)
            out.loss.backward()
            opts[name].step()
            opts[name].zero_grad()
    for name, model in models.items():
        assert params_equal(plain, model), name


@pytest.mark.parametrize("kind", KINDS)
def test_build_draws_what_the_plain_model_draws(kind):
    # Whatever the width: μP adds no random draws, so the generator is where
    # the plain model leaves it, and every draw is the plain model's.
    base = config(kind, 32)
    cfg = widths_of(base, 128)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg)
    after_plain = torch.random.get_rng_state()
    torch.manual_seed(0)
    mup_causal_lm(cfg, base, widths_of(base, 64))
    assert torch.equal(torch.random.get_rng_state(), after_plain)


# ---------------------------------------------------------------------------
# wider: μP's changes, exactly


@pytest.mark.parametrize("kind,tied", TIES, ids=_tie_id)
def test_mup_init_and_multipliers(kind, tied):
    base = config(kind, 32, tied=tied)
    delta = widths_of(base, 64)
    cfg = widths_of(base, 128)  # 4 heads throughout: the head dim grows 8 -> 32
    plain, mup = plain_and_mup(cfg, base, delta)  # default zero_query / readout_zero_init
    m = 4.0
    named_plain = dict(plain.named_parameters())
    queries = 0
    for name, p in mup.named_parameters():
        q = named_plain[name]
        s = p.infshape
        if name.endswith("c_attn.weight"):  # GPT-2 (q | k | v) in a (fan_in, 3d) Conv1D
            assert isinstance(s, FanInFirstInfShape) and s.width_mult() == m
            d = cfg.hidden_size
            assert torch.equal(p[:, :d], torch.zeros_like(p[:, :d]))
            assert torch.equal(p[:, d:], q[:, d:] * m**-0.5)
            queries += 1
        elif name.endswith("q_proj.weight"):
            assert torch.equal(p, torch.zeros_like(p))
            queries += 1
        elif name == "lm_head.weight":
            assert not tied and mup.lm_head.readout_zero_init
            assert torch.equal(p, torch.zeros_like(p))
        elif s.ninf() == 2:
            assert torch.equal(p, q * s.fanin_fanout()[0].width_mult() ** -0.5), name
        else:  # embeddings, norms, biases: transformers' init as it is
            assert torch.equal(p, q), name
    assert queries == 2
    assert mup.lm_head.width_mult() == m
    base_head_dim = 8
    record = mup_record(mup)
    assert record["attn_mult"] == math.sqrt(base_head_dim)
    attns = [mod for mod in mup.modules() if hasattr(mod, "scaling") and hasattr(mod, "head_dim")]
    assert len(attns) == 2
    for a in attns:
        assert a.head_dim == 32
        assert a.scaling == pytest.approx(math.sqrt(base_head_dim) / 32, rel=1e-15)


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_uses_the_attention_scale(kind):
    # The scale is set on the attribute transformers hands to its attention
    # functions; if a version stopped reading it, μP would silently be SP.
    base = config(kind, 32)
    torch.manual_seed(0)
    model = mup_causal_lm(widths_of(base, 128), base, widths_of(base, 64), zero_query=False,
                          readout_zero_init=False).eval()
    b = batch()
    with torch.no_grad():
        sdpa = model(**b).logits
        model.set_attn_implementation("eager")
        eager = model(**b).logits
        torch.testing.assert_close(eager, sdpa, rtol=1e-5, atol=1e-6)
        attns = [a for a in model.modules() if hasattr(a, "scaling") and hasattr(a, "head_dim")]
        for a in attns:  # sharp attention instead of the nearly uniform one at init
            a.scaling *= 1000.0
        changed = {}
        for impl in ("eager", "sdpa"):
            model.set_attn_implementation(impl)
            changed[impl] = model(**b).logits
        for a in attns:
            a.scaling /= 1000.0
    torch.testing.assert_close(changed["eager"], changed["sdpa"], rtol=1e-4, atol=1e-5)
    assert (changed["sdpa"] - sdpa).abs().max() > 1e-2


def test_conv1d_multipliers_use_the_fan_in():
    # GPT-2's MLP 4x wider than the base while the hidden size is 2x: the
    # Conv1D weights (fan_in, fan_out) must take m_in from dim 0.
    base = config("gpt2", 32, n_inner=64)
    delta = width_config(base, n_embd=64, n_head=8, n_inner=128)
    cfg = width_config(base, n_embd=64, n_head=8, n_inner=256)
    torch.manual_seed(0)
    model = mup_causal_lm(cfg, base, delta)
    fc = model.transformer.h[0].mlp.c_fc.weight  # (64, 256): m_in 2, m_out 4
    proj = model.transformer.h[0].mlp.c_proj.weight  # (256, 64): m_in 4, m_out 2
    assert fc.infshape.width_mult() == 2.0 and fc.infshape.fanin_fanout_mult_ratio() == 0.5
    assert proj.infshape.width_mult() == 4.0 and proj.infshape.fanin_fanout_mult_ratio() == 2.0
    # ... and the optimizer applies Adam's eta / m_in to them.
    opt = fastmup.MuAdamW(model.parameters(), lr=1.0, backend="eager")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model(**batch())
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p, m_in in (("transformer.h.0.mlp.c_fc.weight", fc, 2.0), ("transformer.h.0.mlp.c_proj.weight", proj, 4.0)):
        # First AdamW step (lr 1, weight decay 1e-2): the update is g / (|g| + eps) times
        # lr / m_in, and the decay (lr / m_in) * (wd * m_in) = wd whatever the width.
        g, w0 = grads[name], before[name]
        expected = w0 * (1 - 1e-2) - g / (g.abs() + 1e-8) / m_in
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------
# training with every backend


def _backends():
    names = available_backends()
    if _triton_interpreted():
        names.append("triton")
    return names


@pytest.mark.parametrize("kind", KINDS)
def test_trains_with_every_backend(kind):
    """``fastmup.MuAdamW(model.parameters())`` on every backend available here.

    After one step every backend equals the eager reference to fp32 rounding
    (Adam divides by ``sqrt(v) + eps``: one ulp of a gradient moves an update
    by about one ulp of the parameter).  Over twelve steps the fused backends'
    trajectories stay within ``0.1 * lr`` of eager: where a gradient entry is
    near Adam's ``eps`` its update is sensitive to the last bit, and that
    difference compounds (measured: ~1e-4 * lr after one step, ~8e-3 * lr after
    twelve).  A wrong μP multiplier would move the hidden weights by
    ``lr``-sized amounts per step, two orders of magnitude beyond that bound.
    """
    base = config(kind, 32)
    cfg = widths_of(base, 64)

    def start():
        torch.manual_seed(0)
        return mup_causal_lm(cfg, base, widths_of(base, 48))

    lr = 1e-2
    data = [batch(s, n=8) for s in range(3)]
    first, final, losses = {}, {}, {}
    for backend in _backends():
        steps = 1 if backend == "triton" else 12  # the Triton interpreter is slow
        model = start()
        opt = fastmup.MuAdamW(model.parameters(), lr=lr, backend=backend)
        assert opt.backend == backend
        losses[backend] = []
        for t in range(steps):
            loss = model(**data[t % len(data)]).loss
            losses[backend].append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad()
            if t == 0:
                first[backend] = {n: p.detach().clone() for n, p in model.named_parameters()}
        final[backend] = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = losses["eager"]
    assert ref[-1] < ref[0] - 0.25, ref  # it learns (the three batches, by heart)
    for backend in first:
        for name, p in first[backend].items():
            torch.testing.assert_close(p, first["eager"][name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{backend} {name}, step 1: {m}")
        if backend == "triton":
            continue
        assert losses[backend][0] == ref[0]
        assert losses[backend] == pytest.approx(ref, rel=1e-4), backend
        for name, p in final[backend].items():
            torch.testing.assert_close(p, final["eager"][name], rtol=0, atol=0.1 * lr,
                                       msg=lambda m: f"{backend} {name}, step 12: {m}")


# ---------------------------------------------------------------------------
# saving and loading


@pytest.mark.parametrize("kind,tied", [("gpt2", True), ("llama", False)], ids=_tie_id)
def test_save_pretrained_round_trip(kind, tied, tmp_path):
    base = config(kind, 32, tied=tied)
    torch.manual_seed(0)
    model = mup_causal_lm(widths_of(base, 128), base, widths_of(base, 64), output_mult=2.0)
    opt = fastmup.MuAdamW(model.parameters(), lr=1e-2, backend="eager")
    model(**batch()).loss.backward()
    opt.step()
    opt.zero_grad()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["fastmup"] == mup_record(model)

    loaded = mup_from_pretrained(str(tmp_path))
    assert type(loaded.lm_head) is type(model.lm_head)
    assert loaded.lm_head.width_mult() == model.lm_head.width_mult() == 4.0
    assert loaded.lm_head.output_mult == 2.0
    assert params_equal(loaded, model)
    for (name, p), q in zip(model.named_parameters(), loaded.parameters()):
        assert type(q.infshape) is type(p.infshape) and q.infshape == p.infshape, name
        assert q.infshape.width_mult() == p.infshape.width_mult(), name
    for a, b in zip(model.modules(), loaded.modules()):
        if hasattr(a, "scaling") and hasattr(a, "head_dim"):
            assert a.scaling == b.scaling
    assert mup_record(loaded) == mup_record(model)
    # same model, same optimizer: the same next step
    opt2 = fastmup.MuAdamW(loaded.parameters(), lr=1e-2, backend="eager")
    opt2.load_state_dict(opt.state_dict())
    for m, o in ((model, opt), (loaded, opt2)):
        m.train()
        m(**batch(1)).loss.backward()
        o.step()
    assert params_equal(loaded, model)


# ---------------------------------------------------------------------------
# bad input


def test_errors_name_the_problem_and_change_nothing():
    base = config("gpt2", 32)
    delta = widths_of(base, 64)
    cfg = widths_of(base, 128)
    with pytest.raises(ValueError, match="n_layer"):
        mup_causal_lm(cfg, base, _with(delta, n_layer=3))
    with pytest.raises(ValueError, match="vocab_size"):
        mup_causal_lm(cfg, _with(base, vocab_size=40), delta)
    with pytest.raises(ValueError, match="same shape"):
        mup_causal_lm(cfg, base, base)
    with pytest.raises(ValueError, match="not width attributes"):
        width_config(base, n_layer=4)
    with pytest.raises(ValueError, match="base_config and delta_config"):
        mup_causal_lm(cfg)
    with pytest.raises(ValueError, match="attn_mult must be given"):
        mup_causal_lm(cfg, base_shapes={"x": [None]})
    with pytest.raises(ValueError, match="c_attn|scale_attn_weights"):
        mup_causal_lm(_with(cfg, scale_attn_weights=False), _with(base, scale_attn_weights=False),
                      _with(delta, scale_attn_weights=False))
    with pytest.raises(ValueError, match="readout_zero_init=True"):
        mup_causal_lm(cfg, base, delta, readout_zero_init=True)  # GPT-2 ties its readout
    with pytest.raises(BaseShapesError, match=r"Conv1D module\(s\) \['transformer.h.0.mlp.c_fc'"):
        # the hidden size scales, the MLP does not: c_fc would be an output layer
        mup_causal_lm(_with(cfg, n_inner=64), _with(base, n_inner=64), _with(delta, n_inner=64))

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="readout_zero_init=True"):
        convert_to_mup(model, base, delta, readout_zero_init=True)
    with pytest.raises(BaseShapesError, match="transformer.h.0"):
        convert_to_mup(model, base_shapes={"transformer.wte.weight": [None, 32]}, attn_mult=8.0)
    assert type(model.lm_head) is torch.nn.Linear
    assert params_equal(model, before)
    assert not any(hasattr(p, "infshape") for p in model.parameters())
    assert all(a.scaling == b.scaling for a, b in zip(model.modules(), before.modules()) if hasattr(a, "scaling"))

    convert_to_mup(model, base, delta)
    with pytest.raises(RuntimeError, match="already"):
        convert_to_mup(model, base, delta)


def test_loading_a_plain_checkpoint_says_so(tmp_path):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config("llama", 32)).save_pretrained(tmp_path)
    with pytest.raises(BaseShapesError, match="no μP record"):
        mup_from_pretrained(str(tmp_path))


def _with(cfg, **changes):
    out = copy.deepcopy(cfg)
    for k, v in changes.items():
        setattr(out, k, v)
    return out


def test_mup_causal_lm_passes_convert_options_and_refuses_others_before_building():
    base = config("gpt2", 32)
    cfg = widths_of(base, 64)
    model = mup_causal_lm(cfg, base, widths_of(base, 48), output_mult=2.0, attn_mult=3.0)
    assert mup_record(model)["output_mult"] == 2.0 and mup_record(model)["attn_mult"] == 3.0
    state = torch.random.get_rng_state()
    for bad in ("init", "bogus"):
        with pytest.raises(TypeError, match=bad):
            mup_causal_lm(cfg, base, widths_of(base, 48), **{bad: False})
    assert torch.equal(torch.random.get_rng_state(), state)  # no model was built
