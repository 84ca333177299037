"""μTransfer on a CPU in minutes: the best learning rate stays put under μP.

For each model (an MLP on scikit-learn's digits, a small transformer on a
synthetic second-order Markov chain) and each width, train over a grid of
learning rates (powers of two) in standard parametrization (SP: plain
PyTorch + ``torch.optim.Adam``) and in μP (``MuReadout`` at zero,
``set_base_shapes`` from a small base width, ``1/d`` attention,
``fastmup.MuAdam``), then plot the training loss against the learning rate,
one curve per width, SP and μP side by side: the figure of the mup README.
Under μP the curves share their minimum (within a grid step) and wider is
better; under SP the minimum drifts to smaller learning rates as the width
grows (by about a step per doubling for the transformer).  Coordinate checks
(``fastmup.coord_check``) of both models, SP and μP, are plotted as well.

What the demo does not claim: at these tiny budgets SP at its *own* best
learning rate, found anew at every width, can reach a slightly lower loss
than μP at the widest widths (μP inherits the base model's balance between
layers, which nobody tuned here).  μTransfer's point is that μP's best
learning rate is found once, on the narrow model.

Run::

    python -m fastmup.demo mutransfer            # full run, 3-4 minutes on 2 free cores
    python -m fastmup.demo mutransfer --quick    # smoke run, well under a minute

Each training run is one job; jobs run in worker processes with one thread
each (small matrices gain little from intra-op threads, and separate
processes degrade gracefully on a busy machine).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import fastmup
from fastmup.demo import models as demo_models
from fastmup.demo import tasks
from fastmup.demo.runs import add_sweep_options, cpu_seconds, grid_jobs, run_jobs, sweep_record, train_run, usable_cpus, worker_pool, write_summary

__all__ = [
    "SweepConfig",
    "CONFIGS",
    "QUICK_CONFIGS",
    "make_optimizer",
    "train_one",
    "worker_pool",
    "sweep",
    "mean_losses",
    "best_lrs",
    "format_best_table",
    "plot_sweep",
    "coord_check",
    "run",
    "main",
]


# ---------------------------------------------------------------------------
# configuration


@dataclass
class SweepConfig:
    """One model's sweep: widths × learning rates × parametrizations × seeds.

    ``log2_lrs`` are the exponents of the learning-rate grid; ``base_width``
    is μP's base width (SP and μP agree there, up to the zero readout init).
    The learning rate warms up linearly over ``warmup`` of the steps and then
    follows a cosine to zero.  The reported loss is measured after training:
    on the whole training set (the MLP's digits), or on ``eval_size`` sequences
    of the transformer's (infinite) training distribution.
    """

    model: str
    widths: Tuple[int, ...]
    base_width: int
    log2_lrs: Tuple[float, ...]
    steps: int
    batch_size: int
    seeds: int = 1
    warmup: float = 0.1
    eval_size: int = 256
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    task_kwargs: Dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes) -> "SweepConfig":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _grid(lo: float, hi: float, step: float = 1.0) -> Tuple[float, ...]:
    n = int(round((hi - lo) / step))
    return tuple(lo + i * step for i in range(n + 1))


#: The full run (about 400 CPU-seconds: 3-4 minutes on 2 cores).  The MLP
#: trains 3.5 epochs of the 1797 digits, short of memorising them, so that the
#: loss still tells learning rates apart; 3 seeds average out the noise of its
#: flat optimum.  The transformer sees fresh data at every step (one seed is
#: smooth enough); one layer keeps the widest runs affordable.
CONFIGS: Dict[str, SweepConfig] = {
    "mlp": SweepConfig(
        model="mlp",
        widths=(64, 128, 256, 512, 1024),
        base_width=64,
        log2_lrs=_grid(-11, -2),
        steps=100,
        batch_size=64,
        seeds=3,
    ),
    "transformer": SweepConfig(
        model="transformer",
        widths=(32, 64, 128, 256),
        base_width=32,
        log2_lrs=_grid(-11, -3),
        steps=200,
        batch_size=16,
        model_kwargs=dict(vocab=16, seq_len=32, n_layers=1, n_heads=4),
        task_kwargs=dict(vocab=16, seq_len=32),
    ),
}

#: ``--quick``: two widths, a short grid, few steps (a smoke run of well under a minute).
QUICK_CONFIGS: Dict[str, SweepConfig] = {
    "mlp": CONFIGS["mlp"].replace(widths=(64, 256), log2_lrs=_grid(-9, -2), steps=60, seeds=1),
    "transformer": CONFIGS["transformer"].replace(widths=(32, 64), log2_lrs=_grid(-9, -3), steps=60, seeds=1),
}


# ---------------------------------------------------------------------------
# one training run


_DIGITS: Optional[Tuple[torch.Tensor, torch.Tensor]] = None


def _digits() -> Tuple[torch.Tensor, torch.Tensor]:
    global _DIGITS
    if _DIGITS is None:
        _DIGITS = tasks.load_digits_data()
    return _DIGITS


def _data(cfg: SweepConfig, seed: int):
    """``(training batches, evaluation batch)`` of a run.

    MLP: minibatches of the digits, evaluated on all 1797 of them (the whole
    training set).  Transformer: fresh sequences every step, evaluated on a
    fixed sample of ``eval_size`` sequences of the same chain.
    """
    if cfg.model == "mlp":
        x, y = _digits()
        return tasks.minibatches(x, y, cfg.batch_size, cfg.steps, seed=1000 + seed), (x, y)
    task = tasks.MarkovTask(**cfg.task_kwargs)
    seqs = task.sample(cfg.eval_size, seed=10**6)
    return task.batches(cfg.batch_size, cfg.steps, seed=1000 + seed), (seqs[:, :-1], seqs[:, 1:])


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def make_optimizer(
    model: torch.nn.Module, parametrization: str, lr: float, backend: str = "auto"
) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` for SP, ``fastmup.MuAdam`` for μP (same base ``lr``)."""
    if parametrization == "mup":
        return fastmup.MuAdam(model.parameters(), lr=lr, backend=backend)
    return torch.optim.Adam(model.parameters(), lr=lr)


def _schedule(cfg: SweepConfig):
    warm = max(1, int(round(cfg.warmup * cfg.steps)))

    def factor(step: int) -> float:  # step = number of updates done so far
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, cfg.steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def train_one(
    cfg: SweepConfig,
    parametrization: str,
    width: int,
    log2_lr: float,
    seed: int,
    backend: str = "auto",
    *,
    build: Callable[..., torch.nn.Module] = demo_models.build,
    loss: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = _loss,
) -> Dict[str, Any]:
    """Train one model at learning rate ``2**log2_lr``; return a dict of results.

    Keys: ``final`` (the loss on the evaluation data after training: all the
    digits, or ``cfg.eval_size`` sequences of the chain; ``nan`` if the run
    diverged), ``first`` (the first minibatch loss), ``losses`` (one per
    step; a run stops at the first non-finite one), ``seconds``,
    ``cpu_seconds`` and the run's coordinates.  The init depends on
    ``(width, seed)`` and the data on ``seed`` only, so the runs along one
    curve differ by their learning rate alone.  ``build(kind, width,
    parametrization, base_width, **model_kwargs)`` makes the model (those of
    :mod:`fastmup.demo.models` by default), ``loss(model, x, y)`` its loss.
    """
    torch.manual_seed(seed)
    model = build(cfg.model, width, parametrization, cfg.base_width, **cfg.model_kwargs).train()
    lr = 2.0**log2_lr
    opt = make_optimizer(model, parametrization, lr, backend)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    coordinates = dict(model=cfg.model, parametrization=parametrization, width=width, log2_lr=log2_lr, seed=seed)
    return {**coordinates, **train_run(model, opt, sched, loss, lambda: _data(cfg, seed), cfg.steps)}


# ---------------------------------------------------------------------------
# the sweep


def sweep(
    cfg: SweepConfig,
    parametrizations: Sequence[str] = ("sp", "mup"),
    workers: int = 1,
    backend: str = "auto",
    progress: bool = True,
    desc: Optional[str] = None,
    pool=None,
    train=None,
) -> List[Dict[str, Any]]:
    """Every run of ``cfg`` (widths × learning rates × parametrizations × seeds).

    Runs go to ``pool`` if given (see :func:`worker_pool`), else to a pool of
    ``workers`` processes made for this sweep when ``workers > 1``, else run
    here, in this process, one after the other.  Returns one dict per run
    (see :func:`train_one`), sorted by parametrization, width, lr and seed.
    ``train`` replaces :func:`train_one` (same arguments and result; a
    module-level function, so that worker processes can import it).
    """
    train = train_one if train is None else train
    jobs = grid_jobs(train, cfg, cfg.widths, parametrizations, backend)
    return run_jobs(jobs, "width", workers=workers, pool=pool, progress=progress, desc=desc or cfg.model)


def mean_losses(results: Iterable[Dict[str, Any]], axis: str = "width") -> Dict[Tuple[str, int], Dict[float, float]]:
    """``{(parametrization, width): {log2_lr: mean final loss over seeds}}``.

    A learning rate at which any seed diverged counts as diverged (nan).
    ``axis`` names the size the runs vary (``"depth"`` for the depth demo).
    """
    acc: Dict[Tuple[str, int], Dict[float, List[float]]] = {}
    for r in results:
        acc.setdefault((r["parametrization"], r[axis]), {}).setdefault(r["log2_lr"], []).append(r["final"])
    out = {}
    for key, by_lr in acc.items():
        out[key] = {
            lr: (float("nan") if any(not math.isfinite(v) for v in vals) else sum(vals) / len(vals))
            for lr, vals in sorted(by_lr.items())
        }
    return out


def best_lrs(results: Iterable[Dict[str, Any]], axis: str = "width") -> Dict[Tuple[str, int], Tuple[float, float]]:
    """``{(parametrization, width): (best log2 lr, its loss)}`` (``(nan, nan)`` if all diverged)."""
    out = {}
    for key, by_lr in mean_losses(results, axis).items():
        finite = [(v, lr) for lr, v in by_lr.items() if math.isfinite(v)]
        out[key] = (min(finite)[1], min(finite)[0]) if finite else (float("nan"), float("nan"))
    return out


def format_best_table(results: Sequence[Dict[str, Any]], title: str = "") -> str:
    """A text table: per width, the best learning rate and its loss in SP and in μP."""
    best = best_lrs(results)
    params = [p for p in ("sp", "mup") if any(k[0] == p for k in best)]
    widths = sorted({k[1] for k in best})
    names = {"sp": "SP", "mup": "μP"}
    head = f"{'width':>7} " + " ".join(f"| {names[p] + ' best lr':>17} {names[p] + ' loss':>9} " for p in params)
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for w in widths:
        cells = []
        for p in params:
            lr, loss = best.get((p, w), (float("nan"), float("nan")))
            lr_s = "diverged" if not math.isfinite(lr) else f"2^{lr:g} = {2.0**lr:.2g}"
            cells.append(f"| {lr_s:>17} {loss:9.4f} ")
        lines.append(f"{w:>7} " + " ".join(cells))
    for p in params:
        lrs = [best[(p, w)][0] for w in widths if (p, w) in best]
        if lrs and all(math.isfinite(v) for v in lrs):
            lines.append(f"{names[p]}: best log2 lr spans {max(lrs) - min(lrs):g} grid step(s) across widths")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# plots


_TITLES = {"mlp": "MLP on digits", "transformer": "Transformer on a 2nd-order Markov chain"}


def _title(cfg: SweepConfig) -> str:
    if cfg.model == "transformer":
        k = cfg.model_kwargs
        return (
            f"Transformer ({_plural(k.get('n_layers', 2), 'layer')}, {_plural(k.get('n_heads', 4), 'head')}) "
            "on a 2nd-order Markov chain"
        )
    if cfg.model == "mlp":
        return f"MLP ({_plural(cfg.model_kwargs.get('n_hidden', 2), 'hidden layer')}) on digits"
    return cfg.model


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def describe(cfg: SweepConfig) -> str:
    """One line on how the runs of ``cfg`` were trained and measured."""
    what = "all the digits" if cfg.model == "mlp" else f"{cfg.eval_size} fresh sequences"
    return (
        f"μP base width {cfg.base_width}; {cfg.steps} Adam steps of batch {cfg.batch_size} (warmup + cosine); "
        f"{_plural(cfg.seeds, 'seed')}; loss on {what} after training"
    )


def plot_sweep(
    results: Sequence[Dict[str, Any]],
    cfg: SweepConfig,
    path: Optional[str] = None,
    note: Optional[str] = None,
    title: Optional[str] = None,
    panel_titles: Optional[Dict[str, str]] = None,
):
    """Training loss against log2 learning rate, one curve per width; SP left, μP right.

    The title is ``title`` (default: the model's) and its second line
    ``note``, by default :func:`describe` of ``cfg``; ``panel_titles`` maps
    ``"sp"``/``"mup"`` to the panels' titles.
    The best learning rate of each width is circled; runs that diverged are
    drawn as crosses on the top edge.  The MLP's losses are on a log scale;
    the transformer's on a linear one, with the chain's optimum (its entropy
    rate) dashed.  Returns the figure (Agg backend); with ``path``, saves it.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    means = mean_losses(results)
    best = best_lrs(results)
    params = [p for p in ("sp", "mup") if any(k[0] == p for k in means)]
    widths = sorted({k[1] for k in means})
    cmap = colormaps["viridis"]
    colors = {w: cmap(0.9 * i / max(1, len(widths) - 1)) for i, w in enumerate(widths)}

    floor = None
    if cfg.model != "mlp":  # the sequence models learn the Markov chain
        floor = tasks.MarkovTask(**cfg.task_kwargs).entropy_rates()[2]
    finite = [v for by_lr in means.values() for v in by_lr.values() if math.isfinite(v)]
    first = [r["first"] for r in results if math.isfinite(r["first"])]
    top = max(first) if first else (max(finite) if finite else 1.0)
    bottom = min(finite) if finite else top / 10
    log_y = cfg.model == "mlp"
    if log_y:
        ylim = (bottom / 1.4, top * 1.3)
    else:
        if floor is not None:
            bottom = min(bottom, floor)
        pad = 0.05 * (top - bottom)
        ylim = (bottom - pad, top + pad)

    fig = Figure(figsize=(5.2 * len(params), 4.3))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, len(params), i + 1, sharey=None) for i in range(len(params))]
    for ax, p in zip(axes, params):
        if floor is not None:
            ax.axhline(floor, color="0.4", linestyle="--", linewidth=1, label="optimum (entropy rate)")
        for w in widths:
            by_lr = means.get((p, w))
            if not by_lr:
                continue
            xs = [lr for lr, v in by_lr.items() if math.isfinite(v)]
            ax.plot(xs, [by_lr[lr] for lr in xs], marker="o", markersize=3, linewidth=1.6, color=colors[w],
                    label=f"{w}")
            bad = [lr for lr, v in by_lr.items() if not math.isfinite(v)]
            if bad:
                ax.plot(bad, [ylim[1]] * len(bad), linestyle="none", marker="x", markersize=6, color=colors[w],
                        clip_on=False)
            blr, bloss = best[(p, w)]
            if math.isfinite(blr):
                ax.plot([blr], [bloss], marker="o", markersize=10, markerfacecolor="none", markeredgewidth=1.8,
                        color=colors[w])
        if log_y:
            ax.set_yscale("log")
        ax.set_ylim(*ylim)
        ax.set_xlabel("log2 learning rate")
        names = {"sp": "Standard parametrization (torch Adam)", "mup": "μP (fastmup.MuAdam)", **(panel_titles or {})}
        ax.set_title(names[p], fontsize=11)
        ax.grid(True, which="both", alpha=0.25)
    axes[0].set_ylabel("training loss")
    axes[-1].legend(title="width", fontsize="small", loc="upper center")
    title = f"{_title(cfg) if title is None else title}: training loss vs learning rate\n{describe(cfg) if note is None else note}"
    fig.suptitle(title, fontsize=10.5)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


#: Modules shown in the transformer's coordinate check (the others overlap them).
TRANSFORMER_COORD_MODULES = (
    "tok_emb",
    "blocks.0.attn.qkv",
    "blocks.0.attn",
    "blocks.0.mlp.0",
    "blocks.0.mlp",
    "ln_f",
    "readout",
)


def coord_check(
    model: str = "mlp",
    widths: Sequence[int] = (64, 128, 256, 512, 1024, 2048),
    base_width: int = 64,
    lr: float = 2.0**-6,
    nsteps: int = 4,
    nseeds: int = 3,
    batch_size: int = 64,
    path: Optional[str] = None,
    progress: bool = True,
    backend: str = "auto",
    model_kwargs: Optional[Dict[str, Any]] = None,
    task_kwargs: Optional[Dict[str, Any]] = None,
    modules: Optional[Sequence[str]] = None,
):
    """Coordinate check of SP (``torch.optim.Adam``) and μP (``fastmup.MuAdam``).

    Trains the model of each width for ``nsteps`` steps on one fixed batch
    with :func:`fastmup.coord_check.get_coord_data` and returns the two
    DataFrames ``(df_sp, df_mup)``; with ``path``, plots each with
    :func:`fastmup.coord_check.plot_coord_data` (only ``modules``, if given)
    and saves the two figures stacked, SP above μP, as one PNG.
    """
    model_kwargs = dict(model_kwargs or {})
    if model == "mlp":
        x, y = _digits()
        loader = [(x[:batch_size], y[:batch_size])]
        extra: Dict[str, Any] = {}
    else:
        task = tasks.MarkovTask(**(task_kwargs or {}))
        loader = [next(iter(task.batches(batch_size, 1, seed=0)))]
        extra = dict(flatten_output=True)

    def lazy(width: int, parametrization: str):
        return lambda: demo_models.build(model, width, parametrization, base_width, **model_kwargs)

    names = {"sp": "SP (torch.optim.Adam)", "mup": "μP (fastmup.MuAdam)"}
    return coord_check_sp_mup(
        lazy, loader, widths, lr=lr, nsteps=nsteps, nseeds=nseeds, progress=progress, backend=backend,
        path=path, modules=modules, title=_TITLES.get(model, model), panels=names, **extra,
    )


def coord_check_sp_mup(
    lazy: Callable[[int, str], Callable[[], torch.nn.Module]],
    loader,
    widths: Sequence[int],
    *,
    title: str,
    panels: Dict[str, str],
    lr: float = 2.0**-6,
    nsteps: int = 4,
    nseeds: int = 3,
    progress: bool = True,
    backend: str = "auto",
    path: Optional[str] = None,
    modules: Optional[Sequence[str]] = None,
    **coord_kwargs: Any,
):
    """:func:`fastmup.coord_check.get_coord_data` of the models
    ``lazy(width, parametrization)()`` in SP (``torch.optim.Adam``) and in μP
    (``fastmup.MuAdam``) on ``loader``; returns ``(df_sp, df_mup)`` and with
    ``path`` saves their plots (only ``modules``, if given; ``panels`` names
    the two), SP above μP, as one PNG."""
    from fastmup.coord_check import get_coord_data, plot_coord_data

    def mu_adam(params, lr):
        return fastmup.MuAdam(params, lr=lr, backend=backend)

    def adam(params, lr):
        return torch.optim.Adam(params, lr=lr)

    dfs = {}
    for p, opt in (("sp", adam), ("mup", mu_adam)):
        dfs[p] = get_coord_data(
            {w: lazy(w, p) for w in widths}, loader, optimizer=opt, lr=lr, nsteps=nsteps, nseeds=nseeds,
            show_progress=progress, **coord_kwargs,
        )
    if path is not None:
        figs = []
        for p in ("sp", "mup"):
            df = dfs[p] if modules is None else dfs[p][dfs[p]["module"].isin(list(modules))]
            figs.append(
                plot_coord_data(
                    df,
                    suptitle=f"{title}: coordinate check, {panels[p]}, "
                    f"lr=2^{math.log2(lr):g}, {nseeds} seed(s); t=1 is the initialization",
                    subplot_width=3.6,
                    subplot_height=3.3,
                )
            )
        _stack_figures(figs, path)
    return dfs["sp"], dfs["mup"]


def _stack_figures(figs, path: str, dpi: int = 80) -> None:
    """Render matplotlib figures and save them one above the other as one PNG."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.image import imsave

    images = []
    for fig in figs:
        fig.set_dpi(dpi)
        fig.canvas.draw()
        images.append(np.asarray(fig.canvas.buffer_rgba())[..., :3])
        plt.close(fig)  # plot_coord_data registers its figures with pyplot
    width = max(im.shape[1] for im in images)
    padded = [np.pad(im, ((0, 0), (0, width - im.shape[1]), (0, 0)), constant_values=255) for im in images]
    imsave(path, np.concatenate(padded, axis=0))


# ---------------------------------------------------------------------------
# command line


def _ints(text: str) -> Tuple[int, ...]:
    return tuple(int(v) for v in text.replace(",", " ").split())


def build_parser(prog: str = "python -m fastmup.demo mutransfer") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="μTransfer demo: training loss against learning rate across widths, SP vs μP, on a CPU.",
    )
    ap.add_argument("--quick", action="store_true", help="small smoke run (two widths, short grid, few steps)")
    ap.add_argument("--out", default="mutransfer_out",
                    help="directory for the PNGs and results.json (default: %(default)s)")
    ap.add_argument("--models", default="mlp,transformer", help="comma-separated subset of mlp,transformer")
    ap.add_argument("--widths", type=_ints, default=None, help="widths, e.g. '64,128,256' (default per model)")
    ap.add_argument("--base-width", type=int, default=None, help="μP base width (default: per model)")
    add_sweep_options(ap, "width", backend_help="fastmup optimizer backend for μP")
    return ap


def configs_from_args(args, table: Optional[Dict[str, SweepConfig]] = None) -> Dict[str, SweepConfig]:
    """The sweeps the command line asks for, from ``table`` (default: this demo's, by ``--quick``)."""
    if table is None:
        table = QUICK_CONFIGS if args.quick else CONFIGS
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in table]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}: choose from {sorted(table)}")
    lrs = None
    if args.lr_range:
        lo, hi = args.lr_range
        if hi < lo:
            raise SystemExit(f"--lr-range: LO={lo:g} must not exceed HI={hi:g}")
        lrs = _grid(lo, hi)
    out = {}
    for m in chosen:
        cfg = table[m].replace(
            widths=args.widths, base_width=args.base_width, steps=args.steps, seeds=args.seeds, log2_lrs=lrs
        )
        if args.widths and args.base_width is None:
            cfg = cfg.replace(base_width=min(args.widths))
        out[m] = cfg
    return out


def run(args) -> Dict[str, Any]:
    """Run the demo as parsed from the command line; returns the results."""
    os.makedirs(args.out, exist_ok=True)
    cfgs = configs_from_args(args)
    workers = args.workers if args.workers is not None else usable_cpus()
    progress = not args.no_progress
    # Parallelism is across runs (worker processes), one thread each: the
    # matrices are small, and single-threaded runs degrade gracefully when the
    # machine is busy.  In-process runs (--workers 1) use one thread as well.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args, cfgs, workers, progress)
    finally:
        torch.set_num_threads(threads_before)


#: Widths of the coordinate checks (cheap: a few steps on one batch).
COORD_WIDTHS = {"mlp": (64, 128, 256, 512, 1024, 2048), "transformer": (32, 64, 128, 256, 512)}
QUICK_COORD_WIDTHS = {"mlp": (64, 256, 1024), "transformer": (32, 128)}


def _run(args, cfgs: Dict[str, SweepConfig], workers: int, progress: bool) -> Dict[str, Any]:
    import contextlib

    t0, cpu0 = time.perf_counter(), cpu_seconds()
    summary: Dict[str, Any] = {}
    with (worker_pool(workers) if workers > 1 else contextlib.nullcontext()) as pool:
        for name, cfg in cfgs.items():
            t = time.perf_counter()
            results = sweep(cfg, backend=args.backend, progress=progress, desc=f"{name} sweep", pool=pool)
            elapsed = time.perf_counter() - t
            cpu = sum(r["cpu_seconds"] for r in results)
            png = os.path.join(args.out, f"mutransfer_{name}.png")
            plot_sweep(results, cfg, png)
            print()
            print(format_best_table(results, title=f"== {name}: best learning rate per width ({elapsed:.0f} s, "
                                                   f"{cpu:.0f} CPU-s in training) =="))
            print(f"wrote {png}")
            summary[name] = sweep_record(cfg, results, best_lrs(results), seconds=elapsed, cpu_seconds=cpu)
    if not args.no_coord_check:
        for name, cfg in cfgs.items():
            t = time.perf_counter()
            widths = (QUICK_COORD_WIDTHS if args.quick else COORD_WIDTHS)[name]
            widths = tuple(w for w in widths if w >= cfg.base_width) or (cfg.base_width, 4 * cfg.base_width)
            png = os.path.join(args.out, f"coord_check_{name}.png")
            coord_check(
                name,
                widths=widths,
                base_width=cfg.base_width,
                batch_size=cfg.batch_size,
                nseeds=1 if args.quick else 3,
                path=png,
                progress=progress,
                backend=args.backend,
                model_kwargs=cfg.model_kwargs,
                task_kwargs=cfg.task_kwargs,
                modules=TRANSFORMER_COORD_MODULES if name == "transformer" else None,
            )
            print(f"wrote {png} ({time.perf_counter() - t:.0f} s)")
    return write_summary(summary, args.out, t0, cpu0, workers)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> Dict[str, Any]:
    args = build_parser(prog or "python -m fastmup.demo mutransfer").parse_args(argv)
    return run(args)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
