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


# ----------------------------------------------------------------------
# parameter storage modes and other projects' low-precision AdamWs
# ----------------------------------------------------------------------
STORAGE_IMPLS = [n for n, i in impls.IMPLS.items() if i.options and i.kind == "fastmup"]


def test_storage_impls_take_bf16_sets_only():
    cpu = torch.device("cpu")
    spec = optimizers.get("adamw")
    for name in STORAGE_IMPLS:
        impl = impls.get(name)
        assert "applies to" in impl.unavailable(spec, cpu, torch.float32)
        if impl.backend != "triton":
            assert impl.unavailable(spec, cpu, torch.bfloat16) is None
    assert "remainder" in impls.get("fastmup-cpu-remainder").unavailable(spec, cpu, torch.float16)
    assert "takes no parameter storage options" in impls.get("fastmup-cpu-sr").unavailable(optimizers.get("esgd"), cpu, torch.bfloat16)


def test_external_impls_are_skipped_with_the_reason_or_run():
    spec = optimizers.get("adamw")
    for name in ("torchao-adamw-sr", "optimi-adamw-kahan"):
        impl = impls.get(name)
        assert "μAdamW only" in impl.unavailable(optimizers.get("sgd"), torch.device("cpu"), torch.bfloat16)
        reason = impl.unavailable(spec, torch.device("cpu"), torch.bfloat16)
        if reason is not None:
            assert "pip install --no-deps" in reason
            continue
        params = models.materialize(models.get("small-64"), "cpu", dtype=torch.bfloat16, seed=3)
        models.fill_grads(params, 4)
        impl.make(params, spec).step()


def test_storage_modes_are_checked_against_the_eager_run_of_the_same_mode():
    """In the runner, each storage mode's implementation is compared with
    fastmup's eager reference in that mode: the cpu backend's SGD with an
    exact update agrees bit for bit, stochastic rounding included."""
    from fastmup.bench import runner

    cfg = runner.Config(device=torch.device("cpu"), dtype=torch.bfloat16, steps=1, warmup=0, check_steps=2)
    opt = optimizers.OptimizerSpec("sgd", "μSGD", "MuSGD", None, None, None, dict(lr=2.0**-4), state_buffers=0)
    case = runner.Case(models.get("small-64"), opt, cfg)
    case.prepare_reference()
    for name in ("fastmup-cpu-sr", "fastmup-cpu-remainder", "fastmup-cpu-fp32master"):
        impl = impls.get(name)
        if impl.unavailable(opt, cfg.device, cfg.dtype) is not None:
            pytest.skip(impl.unavailable(opt, cfg.device, cfg.dtype))
        instance = case.instantiate(impl, 1)
        try:
            assert instance.check() == 0.0
        finally:
            instance.close()
    assert case.reference_for((("stochastic_rounding", True),))[1] == case.bytes_per_step
    case.close()
