"""fastmup optimizers inside PyTorch Lightning (examples/lightning.py).

Lightning steps the optimizer through ``optimizer.step(closure)`` and the
scheduler per step; the result must equal a hand-written loop with the same
optimizer, scheduler and batches, bit for bit (same ops in the same order).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("pytorch_lightning", reason="PyTorch Lightning is not installed (pip install --no-deps pytorch-lightning lightning-utilities torchmetrics)")

from tests.distributed.test_ddp import backends  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightning.py"


def load_example():
    spec = importlib.util.spec_from_file_location("fastmup_lightning_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backend", backends())
def test_lightning_matches_manual_loop(backend):
    ex = load_example()
    steps = 6
    module = ex.fit(ex.MuPModule(width=32, backend=backend), max_steps=steps)

    ref = ex.mup_mlp(32)
    import fastmup

    opt = fastmup.MuAdamW(ref.parameters(), lr=1e-2, weight_decay=0.01, backend=backend)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, ex.warmup(4))
    for i, (x, y) in enumerate(DataLoader(ex.data(), batch_size=8, shuffle=False)):
        if i == steps:
            break
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()
        sched.step()

    trained = module.model
    assert trained.out.width_mult() == 4.0
    changed = False
    for (name, p), q in zip(trained.named_parameters(), ref.parameters()):
        assert torch.equal(p.detach(), q.detach()), name
        changed |= not torch.equal(p.detach(), ex.mup_mlp(32).get_parameter(name).detach())
    assert changed, "the Trainer did not train"
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2)
