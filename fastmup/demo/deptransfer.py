"""Transfer across depth on a CPU in minutes: μP alone vs CompleteP vs depth-μP.

A small pre-LayerNorm transformer (width 64, μP in width) learns a synthetic
second-order Markov chain at several depths (2 to 16 blocks), over a grid of
learning rates (powers of two), in three parametrizations of depth:

* ``mup``: μP alone, no depth scaling (``x + F(x)``, learning rates as μP
  gives them: α = 0);
* ``depth-mup``: depth-μP (Tensor Programs VI), branches ``× m_L^(-½)``,
  Adam learning rates of the blocks ``× m_L^(-½)`` (α = ½);
* ``completep``: CompleteP (Dey et al. 2025), branches ``× m_L^(-1)``,
  learning rates unchanged (α = 1);

with ``m_L = L / 2`` (base depth 2), through :func:`fastmup.set_depth` and
``fastmup.MuAdam(eps_scaling=True)``.  The plot has one panel per
parametrization and one curve per depth; the table gives each depth's best
learning rate and how many grid steps the optimum moves across depths.  The
demo reports what it finds: at these budgets the differences between the
parametrizations are a grid step or two, not the clean picture of a large
scale study, and the README quotes the numbers of the run behind its figure.

A depth coordinate check (:func:`fastmup.coord_check.get_depth_coord_data`)
trains each parametrization a few steps at depths 2 to 64 on one batch and
plots the size of the final residual stream and of every block's update.

Run::

    python -m fastmup.demo deptransfer            # about 3-5 minutes on 2 free cores
    python -m fastmup.demo deptransfer --quick    # smoke run, under a minute
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import fastmup
from fastmup.demo import models as demo_models
from fastmup.demo import mutransfer, tasks
from fastmup.demo.mutransfer import _grid, _schedule
from fastmup.demo.runs import add_sweep_options, cpu_seconds, grid_jobs, run_jobs, sweep_record, train_run, usable_cpus, write_summary

__all__ = [
    "PARAMETRIZATIONS",
    "DepthSweepConfig",
    "CONFIG",
    "QUICK_CONFIG",
    "train_one",
    "sweep",
    "mean_losses",
    "best_lrs",
    "optimum_shift",
    "format_best_table",
    "plot_sweep",
    "coord_check",
    "plot_coord_check",
    "main",
]

#: name -> (α, label)
PARAMETRIZATIONS: Dict[str, Tuple[float, str]] = {
    "mup": (0.0, "μP, no depth scaling (α = 0)"),
    "depth-mup": (0.5, "depth-μP (α = ½)"),
    "completep": (1.0, "CompleteP (α = 1)"),
}


@dataclass
class DepthSweepConfig:
    """Depths × learning rates × parametrizations × seeds at one width.

    The learning rate warms up linearly over ``warmup`` of the steps, then
    follows a cosine to zero; the loss is measured after training on
    ``eval_size`` fresh sequences of the chain.
    """

    depths: Tuple[int, ...] = (2, 4, 8, 16)
    base_depth: int = 2
    width: int = 64
    log2_lrs: Tuple[float, ...] = _grid(-11, -4)
    steps: int = 150
    batch_size: int = 16
    seeds: int = 1
    warmup: float = 0.1
    eval_size: int = 256
    vocab: int = 16
    seq_len: int = 32
    n_heads: int = 4

    def replace(self, **changes) -> "DepthSweepConfig":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


CONFIG = DepthSweepConfig()
QUICK_CONFIG = CONFIG.replace(depths=(2, 8), log2_lrs=_grid(-10, -5), steps=60)


def _model(cfg: DepthSweepConfig, parametrization: str, depth: int):
    alpha = PARAMETRIZATIONS[parametrization][0]
    return demo_models.build_deep(
        depth, alpha, cfg.base_depth, width=cfg.width, vocab=cfg.vocab, seq_len=cfg.seq_len, n_heads=cfg.n_heads
    )


def _loss(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def train_one(
    cfg: DepthSweepConfig, parametrization: str, depth: int, log2_lr: float, seed: int, backend: str = "auto"
) -> Dict[str, Any]:
    """One run at learning rate ``2**log2_lr``: ``final`` (loss on held-out
    sequences after training, nan if it diverged), ``first``, ``losses``, times."""
    torch.manual_seed(seed)
    model = _model(cfg, parametrization, depth)
    opt = fastmup.MuAdam(model.parameters(), lr=2.0**log2_lr, eps_scaling=True, backend=backend)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    task = tasks.MarkovTask(vocab=cfg.vocab, seq_len=cfg.seq_len)
    held_out = task.sample(cfg.eval_size, seed=10**6)

    def data():
        return task.batches(cfg.batch_size, cfg.steps, seed=1000 + seed), (held_out[:, :-1], held_out[:, 1:])

    coordinates = dict(parametrization=parametrization, depth=depth, log2_lr=log2_lr, seed=seed)
    return {**coordinates, **train_run(model, opt, sched, _loss, data, cfg.steps)}


def sweep(
    cfg: DepthSweepConfig,
    parametrizations: Sequence[str] = tuple(PARAMETRIZATIONS),
    workers: int = 1,
    backend: str = "auto",
    progress: bool = True,
    pool=None,
) -> List[Dict[str, Any]]:
    """Every run of ``cfg``, in ``pool`` (or ``workers`` processes, or here)."""
    jobs = grid_jobs(train_one, cfg, cfg.depths, parametrizations, backend)
    return run_jobs(jobs, "depth", workers=workers, pool=pool, progress=progress, desc="depth sweep")


def mean_losses(results) -> Dict[Tuple[str, int], Dict[float, float]]:
    """``{(parametrization, depth): {log2_lr: mean final loss}}`` (nan if any seed diverged)."""
    return mutransfer.mean_losses(results, axis="depth")


def best_lrs(results) -> Dict[Tuple[str, int], Tuple[float, float]]:
    """``{(parametrization, depth): (best log2 lr, its loss)}``."""
    return mutransfer.best_lrs(results, axis="depth")


def optimum_shift(results) -> Dict[str, float]:
    """Per parametrization: best log2 lr at the deepest minus at the shallowest depth (grid steps)."""
    best = best_lrs(results)
    out = {}
    for p in PARAMETRIZATIONS:
        depths = sorted(d for q, d in best if q == p)
        if depths:
            out[p] = best[(p, depths[-1])][0] - best[(p, depths[0])][0]
    return out


def format_best_table(results, title: str = "") -> str:
    """Per depth, the best learning rate and its loss in each parametrization, and the shifts."""
    best = best_lrs(results)
    params = [p for p in PARAMETRIZATIONS if any(k[0] == p for k in best)]
    depths = sorted({k[1] for k in best})
    head = f"{'depth':>6} " + " ".join(f"| {p + ' best lr':>20} {'loss':>7} " for p in params)
    lines = ([title] if title else []) + [head, "-" * len(head)]
    for d in depths:
        cells = []
        for p in params:
            lr, loss = best.get((p, d), (float("nan"), float("nan")))
            cells.append(f"| {('diverged' if not math.isfinite(lr) else f'2^{lr:g}'):>20} {loss:7.4f} ")
        lines.append(f"{d:>6} " + " ".join(cells))
    for p, shift in optimum_shift(results).items():
        lrs = [best[(p, d)][0] for d in depths if (p, d) in best]
        span = max(lrs) - min(lrs) if all(math.isfinite(v) for v in lrs) else float("nan")
        lines.append(
            f"{PARAMETRIZATIONS[p][1]}: best log2 lr moves {shift:+g} from depth {depths[0]} to {depths[-1]} "
            f"(spans {span:g} grid step(s))"
        )
    return "\n".join(lines)


def plot_sweep(results, cfg: DepthSweepConfig, path: Optional[str] = None, note: Optional[str] = None):
    """Loss after training against log2 lr, one curve per depth, one panel per parametrization."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    means, best = mean_losses(results), best_lrs(results)
    params = [p for p in PARAMETRIZATIONS if any(k[0] == p for k in means)]
    depths = sorted({k[1] for k in means})
    cmap = colormaps["viridis"]
    colors = {d: cmap(0.9 * i / max(1, len(depths) - 1)) for i, d in enumerate(depths)}
    floor = tasks.MarkovTask(vocab=cfg.vocab, seq_len=cfg.seq_len).entropy_rates()[2]
    finite = [v for by in means.values() for v in by.values() if math.isfinite(v)]
    # the curves span a narrow band above the chain's optimum: zoom on it
    top = max(finite) if finite else 3.0
    bottom = min(finite + [floor]) if finite else floor
    pad = 0.05 * (top - bottom)
    fig = Figure(figsize=(4.6 * len(params), 4.2))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, len(params), i + 1) for i in range(len(params))]
    for ax, p in zip(axes, params):
        ax.axhline(floor, color="0.4", linestyle="--", linewidth=1, label="optimum (entropy rate)")
        for d in depths:
            by = means.get((p, d), {})
            xs = [lr for lr, v in by.items() if math.isfinite(v)]
            ax.plot(xs, [by[lr] for lr in xs], marker="o", markersize=3, linewidth=1.6, color=colors[d], label=f"{d}")
            bad = [lr for lr, v in by.items() if not math.isfinite(v)]
            if bad:
                ax.plot(bad, [top + pad] * len(bad), linestyle="none", marker="x", color=colors[d], clip_on=False)
            blr, bloss = best.get((p, d), (float("nan"), float("nan")))
            if math.isfinite(blr):
                ax.plot([blr], [bloss], marker="o", markersize=10, markerfacecolor="none", markeredgewidth=1.8,
                        color=colors[d])
        ax.set_ylim(bottom - pad, top + pad)
        ax.set_xlabel("log2 learning rate")
        ax.set_title(PARAMETRIZATIONS[p][1], fontsize=11)
        ax.grid(True, alpha=0.25)
    axes[0].set_ylabel("loss after training")
    axes[-1].legend(title="depth (blocks)", fontsize="small", loc="upper center")
    note = note or (
        f"pre-LN transformer, width {cfg.width}, μP in width; base depth {cfg.base_depth}; {cfg.steps} MuAdam steps "
        f"of batch {cfg.batch_size} (warmup + cosine); {cfg.seeds} seed(s); loss on {cfg.eval_size} fresh sequences"
    )
    fig.suptitle(f"Transfer across depth: loss vs learning rate\n{note}", fontsize=10.5)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


# ---------------------------------------------------------------------------
# the depth coordinate check


def coord_check(
    cfg: DepthSweepConfig = CONFIG,
    depths: Sequence[int] = (2, 4, 8, 16, 32, 64),
    lr: float = 2.0**-6,
    nsteps: int = 6,
    nseeds: int = 2,
    progress: bool = True,
    backend: str = "auto",
):
    """``{parametrization: DataFrame}`` of :func:`fastmup.coord_check.get_depth_coord_data`
    (MuAdam at ``lr``, one fixed batch)."""
    from fastmup.coord_check import get_depth_coord_data

    task = tasks.MarkovTask(vocab=cfg.vocab, seq_len=cfg.seq_len)
    loader = [next(iter(task.batches(cfg.batch_size, 1, seed=0)))]

    def opt(params, lr):
        return fastmup.MuAdam(params, lr=lr, eps_scaling=True, backend=backend)

    out = {}
    for p in PARAMETRIZATIONS:
        models = {d: (lambda d=d: _model(cfg, p, d)) for d in depths}
        out[p] = get_depth_coord_data(
            models, loader, optimizer=opt, lr=lr, nsteps=nsteps, nseeds=nseeds, flatten_output=True,
            show_progress=progress,
        )
    return out


#: (module, statistic, label) rows of the coordinate-check figure
COORD_ROWS = (
    ("blocks[last]", "l1", "final residual stream, mean |x|"),
    ("blocks[last]", "delta_l1", "final residual stream: change since t=1"),
    ("blocks[mean].mlp", "delta_l1", "per-block update: MLP output change since t=1\n(mean over blocks, before the branch multiplier)"),
)


def plot_coord_check(dfs: Dict[str, Any], path: Optional[str] = None, lr: Optional[float] = None):
    """Rows :data:`COORD_ROWS`, one column per parametrization, x = depth, one line per step."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    params = list(dfs)
    fig = Figure(figsize=(4.2 * len(params), 3.2 * len(COORD_ROWS)))
    FigureCanvasAgg(fig)
    cmap = colormaps["coolwarm"]
    for r, (module, stat, label) in enumerate(COORD_ROWS):
        values = [dfs[p][dfs[p]["module"] == module][stat] for p in params]
        positive = [v[v > 0] for v in values]
        lo = min((v.min() for v in positive if len(v)), default=1e-3)
        hi = max((v.max() for v in positive if len(v)), default=1.0)
        for c, p in enumerate(params):
            ax = fig.add_subplot(len(COORD_ROWS), len(params), r * len(params) + c + 1)
            df = dfs[p][dfs[p]["module"] == module]
            ts = sorted(df["t"].unique())
            for t in ts:
                if stat.startswith("delta_") and t == 1:
                    continue  # no change yet
                g = df[df["t"] == t].groupby("depth")[stat].mean()
                ax.plot(g.index, g.values, marker="o", markersize=3, color=cmap(t / max(ts)), label=f"t={t}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_ylim(lo / 1.5, hi * 1.5)
            if r == 0:
                ax.set_title(PARAMETRIZATIONS[p][1], fontsize=11)
            if c == 0:
                ax.set_ylabel(label, fontsize=8.5)
            if r == len(COORD_ROWS) - 1:
                ax.set_xlabel("depth (blocks)")
            ax.grid(True, which="both", alpha=0.25)
            if r == 0 and c == len(params) - 1:
                ax.legend(fontsize="x-small")
    what = "" if lr is None else f", MuAdam lr=2^{math.log2(lr):g}"
    fig.suptitle(f"Depth coordinate check (width 64, one batch{what}; t=1 is the initialization)", fontsize=11)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=90)
    return fig


# ---------------------------------------------------------------------------
# command line


def _ints(text: str) -> Tuple[int, ...]:
    return tuple(int(v) for v in text.replace(",", " ").split())


def build_parser(prog: str = "python -m fastmup.demo deptransfer") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog, description="Transfer across depth: loss vs learning rate, μP vs depth-μP vs CompleteP, on a CPU."
    )
    ap.add_argument("--quick", action="store_true", help="small smoke run (two depths, short grid, few steps)")
    ap.add_argument("--out", default="deptransfer_out", help="directory for the PNGs and results.json (default: %(default)s)")
    ap.add_argument("--depths", type=_ints, default=None, help="depths, e.g. '2,4,8,16'")
    ap.add_argument("--base-depth", type=int, default=None, help="base depth (default 2)")
    ap.add_argument("--width", type=int, default=None, help="model width (default 64)")
    add_sweep_options(ap, "depth")
    return ap


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> Dict[str, Any]:
    args = build_parser(prog or "python -m fastmup.demo deptransfer").parse_args(argv)
    cfg = (QUICK_CONFIG if args.quick else CONFIG).replace(
        depths=args.depths, base_depth=args.base_depth, width=args.width, steps=args.steps, seeds=args.seeds,
        log2_lrs=_grid(*args.lr_range) if args.lr_range else None,
    )
    os.makedirs(args.out, exist_ok=True)
    workers = args.workers if args.workers is not None else usable_cpus()
    progress = not args.no_progress
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    try:
        results = sweep(cfg, workers=workers, backend=args.backend, progress=progress)
        png = os.path.join(args.out, "deptransfer.png")
        plot_sweep(results, cfg, png)
        elapsed = time.perf_counter() - t0
        print()
        print(format_best_table(results, title=f"== best learning rate per depth ({elapsed:.0f} s) =="))
        print(f"wrote {png}")
        summary = sweep_record(cfg, results, best_lrs(results), optimum_shift=optimum_shift(results))
        if not args.no_coord_check:
            depths = (2, 8, 32) if args.quick else (2, 4, 8, 16, 32, 64)
            lr = 2.0**-6
            dfs = coord_check(cfg, depths=depths, lr=lr, nseeds=1 if args.quick else 2, progress=progress,
                              backend=args.backend)
            cc = os.path.join(args.out, "depth_coord_check.png")
            plot_coord_check(dfs, cc, lr=lr)
            print(f"wrote {cc}")
    finally:
        torch.set_num_threads(threads)
    return write_summary(summary, args.out, t0, cpu0, workers)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
