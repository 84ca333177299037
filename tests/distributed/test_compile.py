"""torch.compile with μP models and the fastmup optimizers.

* Models with ``MuReadout`` / ``MuSharedReadout`` compile with
  ``fullgraph=True`` (the readout's width multiplier is a plain Python
  float, a compile-time constant): forward and backward equal eager.
* A whole training step (zero_grad, forward, backward, ``opt.step()``)
  compiled with ``torch.compile`` gives the same parameters as eager.
  ``opt.step()`` is *not* traced into the graph: it plans on the host (numpy
  rows, cached pointer tables) and launches opaque kernels, so dynamo graph
  breaks inside it and runs it eagerly.  Wrapping it with
  ``torch.compiler.disable`` turns that into one clean break (one graph for
  the forward/backward, faster compilation); both are tested.
* ``fastmup.distributed.graph_step(opt)``: the step as one custom op,
  callable under ``fullgraph=True`` without a graph break.

The tests use dynamo's ``aot_eager`` backend (full graph capture and
AOTAutograd, no code generation): it is what ``fullgraph`` and graph breaks
are about, it runs in seconds, and its results are bit-identical to eager
here (asserted).  Inductor generates C++ on CPU; the one inductor test is
marked ``slow`` and runs only with ``FASTMUP_SLOW_TESTS=1`` (about a minute of compilation on 2 cores) and compares with
a tolerance, since generated kernels fuse and reorder fp32 arithmetic.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.distributed.test_ddp import backends, batches, make_opt
from tests.optim.conftest import build, clone, loss_of

KINDS = ["mlp", "transformer"]  # MuReadout / MuSharedReadout (tied to the embedding)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", KINDS)
def test_model_compiles_fullgraph(kind):
    model = build(kind, 32)
    ref = clone(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    batch = batches(kind, 1)[0]
    loss = loss_of(kind, compiled, batch)
    loss.backward()
    ref_loss = loss_of(kind, ref, batch)
    ref_loss.backward()
    assert torch.equal(loss, ref_loss)
    for g, h in zip(grads(model), grads(ref)):
        assert torch.equal(g, h)


def _step(kind, model, opt, batch):
    opt.zero_grad()
    loss = loss_of(kind, model, batch)
    loss.backward()
    opt.step()
    return loss


# (kind, optimizer) pairs: compilation dominates the run time (~5 s each on
# 2 cores), so every optimizer and model is covered once per backend rather
# than the full product.
TRACED = [("mlp", "adamw")]
DISABLED = [("transformer", "adam"), ("mlp", "sgd")]


@pytest.mark.parametrize("disable_step", [False, True], ids=["traced-step", "disabled-step"])
@pytest.mark.parametrize("backend", backends())
def test_compiled_training_step_matches_eager(backend, disable_step):
    for kind, opt_name in DISABLED if disable_step else TRACED:
        torch._dynamo.reset()
        model = build(kind, 32)
        ref = clone(model)
        opt = make_opt(opt_name, model.parameters(), backend)
        ref_opt = make_opt(opt_name, ref.parameters(), backend)
        if disable_step:
            opt.step = torch.compiler.disable(opt.step)
        compiled_step = torch.compile(_step, backend="aot_eager")
        for batch in batches(kind, 3):
            loss = compiled_step(kind, model, opt, batch)
            ref_loss = _step(kind, ref, ref_opt, batch)
            assert torch.equal(loss, ref_loss)
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            assert torch.equal(p, q), f"{kind}/{opt_name}/{backend} {name}"


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FASTMUP_SLOW_TESTS") != "1",
    reason="inductor compilation takes about a minute on CPU; set FASTMUP_SLOW_TESTS=1 to run it",
)
def test_inductor_fullgraph_matches_eager():
    model = build("transformer", 32)
    ref = clone(model)
    compiled = torch.compile(model, fullgraph=True)  # inductor
    batch = batches("transformer", 1)[0]
    loss_of("transformer", compiled, batch).backward()
    loss_of("transformer", ref, batch).backward()
    torch.testing.assert_close(grads(model), grads(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backends())
def test_graph_step_fullgraph(backend):
    """``fastmup.distributed.graph_step``: the whole optimizer step as one
    custom op, callable under ``fullgraph=True``; bitwise equal to eager."""
    from fastmup.distributed import graph_step

    for kind, opt_name in [("mlp", "adamw"), ("transformer", "sgd")]:
        torch._dynamo.reset()
        model = build(kind, 32)
        ref = clone(model)
        opt = make_opt(opt_name, model.parameters(), backend)
        ref_opt = make_opt(opt_name, ref.parameters(), backend)
        step = torch.compile(graph_step(opt), fullgraph=True, backend="aot_eager")
        for batch in batches(kind, 3):
            opt.zero_grad()
            loss_of(kind, model, batch).backward()
            step()
            ref_opt.zero_grad()
            loss_of(kind, ref, batch).backward()
            ref_opt.step()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            assert torch.equal(p, q), f"{kind}/{opt_name}/{backend} {name}"
        assert torch.equal(opt.state_dict()["state"][0]["step"], ref_opt.state_dict()["state"][0]["step"])
