"""The torch baselines without mup installed (as on a GPU image): the param
groups fastmup.bench rebuilds are mup's, and the optimizers step alike."""
from __future__ import annotations

import pytest
import torch

from fastmup.bench import impls, models, optimizers

mup = pytest.importorskip("mup")


def _signature(groups):
    return [([id(p) for p in g["params"]], g["lr"], g["weight_decay"]) for g in groups]


@pytest.mark.parametrize("name", ["gpt2-tiny", "resnet50-quarter", "small-64"])
@pytest.mark.parametrize("rule,split", [("adam", "MuAdam"), ("sgd", "MuSGD")])
def test_groups_are_mups(name, rule, split):
    params = models.materialize(models.get(name), "cpu")
    theirs = getattr(mup, split)(params, impl=lambda groups, **kw: groups, lr=1e-2, weight_decay=1e-3)
    assert _signature(impls.mup_param_groups(params, rule, 1e-2, 1e-3)) == _signature(theirs)


@pytest.mark.parametrize("opt_name", ["adam", "adamw", "sgd"])
def test_torch_baseline_without_mup_steps_like_with_it(monkeypatch, opt_name):
    spec = optimizers.get(opt_name)
    impl = impls.get("torch-foreach")
    results = []
    for have_mup in (True, False):
        if not have_mup:
            monkeypatch.setattr(impls, "mup_module", lambda: None)
            assert "mup is not installed" in impl.prepare(torch.device("cpu"))
        params = models.materialize(models.get("gpt2-tiny"), "cpu", seed=3)
        models.fill_grads(params, 4)
        assert impl.unavailable(spec, torch.device("cpu")) is None
        opt = impl.make(params, spec)
        for _ in range(2):
            opt.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        assert torch.equal(a, b)
