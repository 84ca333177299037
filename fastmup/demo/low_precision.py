"""bf16 parameters under μP: where round-to-nearest loses the updates, and what each remedy gives.

A μP MLP is trained in bfloat16 (parameters, activations and gradients) on a
teacher-student regression generated in code, with ``fastmup.MuAdamW`` and
a cosine learning-rate decay, four ways:

``bf16``            the parameters rounded to nearest after each step (torch's default);
``bf16 + SR``       stochastic rounding (``stochastic_rounding=True``, no extra memory);
``bf16 + remainder`` 16-bit remainders (``master_weights="remainder"``, 2 bytes per
                    parameter; the trajectory of ``master_weights="fp32"``, bit for bit);
``fp32``            the same model in float32 throughout: the reference.

At this width a hidden matrix's Adam update is its ``lr / m_in`` (μP), with
``m_in`` the width over the base width: most per-coordinate updates are then
below half a bf16 ulp of the weight and round-to-nearest throws them away.
The demo counts them in the bf16 run (the share of the hidden matrices'
entries a step leaves unchanged although their gradient is nonzero) and
plots the loss curves into one PNG.

What it shows, honestly: the remainders recover the fp32-master trajectory
exactly and track the fp32 run closely (what is left is bf16's forward and
backward arithmetic, the same in every bf16 run); stochastic rounding keeps
the updates on average and lands in between, noisier; plain bf16 stalls as
the learning rate decays.  The sizes are small (a CPU run in minutes), so
the gaps are those of this toy problem, not a prediction for a large model.

Run::

    python -m fastmup.demo low-precision            # about a minute on 2 cores
    python -m fastmup.demo low-precision --quick    # a smoke run, seconds
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastmup
from fastmup.demo import models as demo_models

__all__ = ["Config", "CONFIG", "QUICK", "LABELS", "MODES", "run_mode", "run", "summary", "plot", "main"]

#: the runs: label -> (parameter dtype, optimizer options)
MODES: Dict[str, tuple] = {
    "bf16": (torch.bfloat16, {}),
    "bf16 + SR": (torch.bfloat16, {"stochastic_rounding": True}),
    "bf16 + remainder": (torch.bfloat16, {"master_weights": "remainder"}),
    "fp32": (torch.float32, {}),
    # not plotted (its curve is the remainder's, bit for bit); the tests run it
    "bf16 + fp32 master": (torch.bfloat16, {"master_weights": "fp32"}),
}
#: the runs of the demo
LABELS = ("bf16", "bf16 + SR", "bf16 + remainder", "fp32")


@dataclass(frozen=True)
class Config:
    width: int = 1024
    base_width: int = 32
    depth: int = 3  # hidden layers
    d_in: int = 32
    d_out: int = 8
    teacher_width: int = 64
    steps: int = 400
    batch_size: int = 256
    lr: float = 2.0**-6
    final_lr_fraction: float = 0.01  # cosine decay to this fraction of lr
    weight_decay: float = 0.0
    eval_every: int = 20
    n_eval: int = 2048
    seed: int = 0
    backend: str = "auto"


CONFIG = Config()
QUICK = Config(width=256, base_width=32, steps=60, eval_every=10, batch_size=128, n_eval=512)


def _net(width: int, cfg: Config) -> demo_models.MLP:
    """``d_in → width → … → width → d_out`` with tanh, a zero-initialised μP readout."""
    return demo_models.MLP(width, cfg.d_in, cfg.d_out, n_hidden=cfg.depth, mup=True, activation=torch.tanh)


class Teacher(nn.Module):
    """The regression target: a fixed random two-layer network."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        self.w1 = torch.randn(cfg.d_in, cfg.teacher_width, generator=g) / math.sqrt(cfg.d_in)
        self.w2 = torch.randn(cfg.teacher_width, cfg.d_out, generator=g) / math.sqrt(cfg.teacher_width)

    def __call__(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w1 * 2.0) @ self.w2


def build_model(cfg: Config, dtype: torch.dtype) -> demo_models.MLP:
    """The μP model (base shapes from width ``base_width``), initialised
    identically for every mode, then cast to ``dtype``."""
    torch.manual_seed(cfg.seed)
    model = _net(cfg.width, cfg)
    fastmup.set_base_shapes(model, _net(cfg.base_width, cfg), delta=_net(2 * cfg.base_width, cfg))
    return model.to(dtype)


def _lr_at(cfg: Config, step: int) -> float:
    frac = cfg.final_lr_fraction
    return cfg.lr * (frac + (1 - frac) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))


def run_mode(label: str, cfg: Config) -> Dict[str, Any]:
    """Train one mode; returns its eval losses and the share of lost updates."""
    dtype, options = MODES[label]
    model = build_model(cfg, dtype)
    opt = fastmup.MuAdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, backend=cfg.backend, **options)
    teacher = Teacher(cfg)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    x_eval = torch.randn(cfg.n_eval, cfg.d_in, generator=g)
    y_eval = teacher(x_eval)
    hidden = [layer.weight for layer in model.hidden]
    steps, losses, lost = [], [], []
    start = time.perf_counter()
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            with torch.no_grad():
                pred = model(x_eval.to(dtype)).float()
                steps.append(step)
                losses.append(F.mse_loss(pred, y_eval).item())
        if step == cfg.steps:
            break
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        x = torch.randn(cfg.batch_size, cfg.d_in, generator=g)
        y = teacher(x)
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x.to(dtype)).float(), y)
        loss.backward()
        before = [w.detach().clone() for w in hidden]
        opt.step()
        # entries the step left as they were although their gradient is nonzero
        unchanged = sum(int(((w == b) & (w.grad != 0)).sum()) for w, b in zip(hidden, before))
        lost.append(unchanged / sum(w.numel() for w in hidden))
    return {
        "label": label,
        "steps": steps,
        "losses": losses,
        "lost_updates": lost,
        "seconds": time.perf_counter() - start,
        "backend": sorted({b.signature.backend for b in opt._batches}),
    }


def run(cfg: Config, labels: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """:func:`run_mode` for each of ``labels`` (default :data:`LABELS`)."""
    return [run_mode(label, cfg) for label in (LABELS if labels is None else labels)]


def summary(results: Sequence[Dict[str, Any]]) -> str:
    """A table: final loss, its ratio to fp32's, and (plain bf16) the share
    of hidden entries whose update was rounded away, over the first and the
    last tenth of the steps."""
    ref = next((r["losses"][-1] for r in results if r["label"] == "fp32"), None)
    lines = [f"{'mode':<20} {'final loss':>11} {'x fp32':>7}   updates rounded away (first/last 10% of steps)"]
    for r in results:
        ratio = f"{r['losses'][-1] / ref:7.3f}" if ref else "      -"
        lost = ""
        if r["label"] == "bf16":
            k = max(1, len(r["lost_updates"]) // 10)
            lost = f"   {sum(r['lost_updates'][:k]) / k:.1%} / {sum(r['lost_updates'][-k:]) / k:.1%}"
        lines.append(f"{r['label']:<20} {r['losses'][-1]:11.4g} {ratio}{lost}")
    return "\n".join(lines)


def plot(results: Sequence[Dict[str, Any]], cfg: Config, path: Optional[str] = None):
    """Eval loss against step, one curve per mode (log scale), with the
    share of lost updates below; returns the figure, saved to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colors = {"bf16": "tab:red", "bf16 + SR": "tab:orange", "bf16 + remainder": "tab:blue", "fp32": "black"}
    styles = {"fp32": "--"}
    fig = Figure(figsize=(9, 6.5))
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for r in results:
        top.plot(r["steps"], r["losses"], styles.get(r["label"], "-"), color=colors.get(r["label"]), label=r["label"], lw=1.6)
        if r["label"] == "bf16":
            bottom.plot(range(1, len(r["lost_updates"]) + 1), [100 * v for v in r["lost_updates"]], color=colors["bf16"], lw=1.2)
    top.set_yscale("log")
    top.set_ylabel("eval MSE")
    top.legend()
    top.grid(alpha=0.3)
    top.set_title(
        f"μP MLP, width {cfg.width} (base {cfg.base_width}), {cfg.depth} hidden layers, MuAdamW lr {cfg.lr:g} "
        f"cosine → {cfg.final_lr_fraction:g}×\n"
        "bf16 + remainder is bit-identical to bf16 + fp32 master weights",
        fontsize=10,
    )
    bottom.set_ylabel("bf16: updates\nrounded away (%)")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
    return fig


def main(argv=None, prog: str = "python -m fastmup.demo low-precision") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (seconds)")
    parser.add_argument("--out", default="demo_out", help="directory for low_precision.png and .json (default: demo_out)")
    parser.add_argument("--steps", type=int, help="training steps")
    parser.add_argument("--width", type=int, help="model width")
    parser.add_argument("--backend", help="fastmup backend (default auto)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else CONFIG
    changes = {k: v for k, v in (("steps", args.steps), ("width", args.width), ("backend", args.backend)) if v is not None}
    cfg = replace(cfg, **changes)
    os.makedirs(args.out, exist_ok=True)
    results = run(cfg)
    print(summary(results))
    png = os.path.join(args.out, "low_precision.png")
    plot(results, cfg, png)
    with open(os.path.join(args.out, "low_precision.json"), "w") as f:
        json.dump({"config": asdict(cfg), "results": results}, f, indent=1)
    print(f"wrote {png}")
