"""A fastmup optimizer in PyTorch Lightning's ``configure_optimizers``.

fastmup's optimizers are plain ``torch.optim.Optimizer`` subclasses whose
param groups hold the *base* learning rate (μP factors are per-tensor
multipliers applied inside the step), so Lightning's optimizer loop, its
closure-based ``optimizer.step(closure)`` and any ``torch.optim.lr_scheduler``
work unchanged.  The only μP-specific rule: call ``set_base_shapes`` on the
model before ``configure_optimizers`` runs (here: in ``__init__``).

Run: ``python examples/lightning.py`` (CPU, a few seconds).
"""
from __future__ import annotations

import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import fastmup
except ImportError:  # running from a source checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fastmup

try:
    import pytorch_lightning as pl
except ImportError:  # the unified package
    import lightning.pytorch as pl


class MLP(nn.Module):
    def __init__(self, width: int, d_in: int = 12, d_out: int = 5):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.hidden = nn.Linear(width, width)
        self.out = fastmup.MuReadout(width, d_out)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(torch.relu(self.inp(x)))))


def mup_mlp(width: int, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    model = MLP(width)
    fastmup.set_base_shapes(model, MLP(8), delta=MLP(16))
    return model


def warmup(steps: int):
    return lambda step: min(1.0, (step + 1) / steps)


class MuPModule(pl.LightningModule):
    def __init__(self, width: int = 64, lr: float = 1e-2, warmup_steps: int = 4, backend: str = "auto"):
        super().__init__()
        self.model = mup_mlp(width)  # base shapes attached before the optimizer exists
        self.lr, self.warmup_steps, self.backend = lr, warmup_steps, backend

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.log("loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self):
        opt = fastmup.MuAdamW(self.model.parameters(), lr=self.lr, weight_decay=0.01, backend=self.backend)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup(self.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def data(n: int = 64, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 12, generator=g), torch.randint(0, 5, (n,), generator=g))


def fit(module: MuPModule, max_steps: int = 8, batch_size: int = 8) -> MuPModule:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data(), batch_size=batch_size, shuffle=False))
    return module


if __name__ == "__main__":
    module = fit(MuPModule())
    print("trained; readout width multiplier", module.model.out.width_mult())
