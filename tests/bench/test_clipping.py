"""fastmup.bench.clipping: the "clip + step" cases' optimizer wrapper."""
from __future__ import annotations

import torch

from fastmup.bench import impls, models, optimizers
from fastmup.bench.clipping import ClipThenStep, bytes_per_param


def test_bytes_per_param():
    assert bytes_per_param(4, deferred=True) == 32  # norm 4 + Adam's 28
    assert bytes_per_param(4, deferred=False) == 40  # + the in-place clip's read and write of g
    assert bytes_per_param(2, deferred=True, state_buffers=1) == 2 + 2 * 5


def test_clip_then_step_fastmup_against_torch():
    pset = models.get("gpt2-tiny")
    spec = optimizers.get("adamw-clip")
    a = models.materialize(pset, "cpu")
    b = models.materialize(pset, "cpu")
    fast = impls.get("fastmup-eager").make(a, spec)
    ref = impls.get("torch-forloop").make(b, spec)
    assert isinstance(fast, ClipThenStep) and fast.deferred and not ref.deferred
    for seed in (1, 2):
        models.fill_grads(a, seed)
        models.fill_grads(b, seed)
        fast.step()
        ref.step()
        # deferred: the gradients are left as they were; in place: rescaled
        assert not any(torch.equal(p.grad, q.grad) for p, q in zip(a, b))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert fast.state is fast.optimizer.state and fast.param_groups is fast.optimizer.param_groups
