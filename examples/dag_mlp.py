"""Architecture-aware scaling composed with μP, on scikit-learn's digits.

``fastmup.arch.DagMLP`` builds an MLP whose hidden topology is a DAG written
as a string (Chen et al., *Principled Architecture-aware Scaling of
Hyperparameters*, ICLR 2024): ``"2_02_002_0002"`` is a chain of four layers
(group k lists the edges into node k+1 from nodes 0..k: 0 none, 1 skip,
2 layer), ``"2_12_112"`` adds skip connections.  The two prescriptions
compose:

* width: ``fastmup.set_base_shapes`` (μP init, ``MuReadout``) and
  ``fastmup.MuAdam`` (μP per-tensor learning rates);
* topology: ``model.depth_lr_scales()``, the paper's learning-rate factor
  for this DAG, handed to the same optimizer as ``param_lr_scales=`` and
  applied in the same fused step.

Run from the repository root (scikit-learn needed, no download)::

    python examples/dag_mlp.py --dag 2_02_002_0002 --width 256 --steps 200
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Optional, Sequence

try:
    import fastmup
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fastmup

import torch
import torch.nn.functional as F

from fastmup.arch import DagMLP, lr_scale
from fastmup.demo.tasks import load_digits_data, minibatches


def build_model(dag: str, width: int, base_width: int, d_in: int = 64, d_out: int = 10) -> DagMLP:
    """A μP ``DagMLP``: eq.-4 init, zero readout, base shapes from ``base_width``."""

    def make(w: int) -> DagMLP:
        return DagMLP(dag, d_in=d_in, width=w, d_out=d_out, readout_zero_init=True)

    model = make(width)
    fastmup.set_base_shapes(model, make(base_width), delta=make(2 * base_width))
    return model


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dag", default="2_02_002_0002", help="DAG string (default: %(default)s)")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--base-width", type=int, default=32, help="μP base width")
    ap.add_argument("--lr", type=float, default=0.1, help="base learning rate (before μP and depth factors)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto", help="fastmup optimizer backend")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    x, y = load_digits_data()
    torch.manual_seed(args.seed)
    model = build_model(args.dag, args.width, args.base_width)
    scales = model.depth_lr_scales()  # {param: factor}, one global factor for this rule
    opt = fastmup.MuAdam(model.parameters(), lr=args.lr, param_lr_scales=scales, backend=args.backend)

    say = (lambda *a: None) if args.quiet else print
    say(
        f"DAG {args.dag}: {len(model.dag.layer_edges)} layer edge(s), paths with "
        f"{model.dag.path_depths()} layers -> depth lr factor {lr_scale(model.dag):.4f}; "
        f"width {args.width} (μP base {args.base_width}), base lr {args.lr:g}"
    )
    losses = []
    for step, (xb, yb) in enumerate(minibatches(x, y, args.batch_size, args.steps, seed=args.seed), 1):
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == 1 or step % max(1, args.steps // 5) == 0 or step == args.steps:
            say(f"step {step:4d}  loss {loss.item():.4f}")
    with torch.no_grad():
        logits = model(x)
        accuracy = (logits.argmax(-1) == y).float().mean().item()
        train_loss = F.cross_entropy(logits, y).item()
    say(f"training set: loss {train_loss:.4f}, accuracy {accuracy:.1%}")
    return dict(losses=losses, train_loss=train_loss, accuracy=accuracy, lr_scale=lr_scale(model.dag), model=model)


if __name__ == "__main__":
    main()
