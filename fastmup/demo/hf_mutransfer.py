"""μTransfer and coordinate checks on Hugging Face GPT-2 and Llama, on a CPU.

The protocol of :mod:`fastmup.demo.mutransfer` (its transformer on the
second-order Markov chain), with the models of ``transformers`` built from
configs (random weights, nothing downloaded):

* SP: ``AutoModelForCausalLM.from_config(config)`` trained by
  ``torch.optim.Adam``: the model as transformers makes it;
* μP: :func:`fastmup.integrations.transformers.mup_causal_lm` (base width
  32, delta width 64) trained by ``fastmup.MuAdam``.

Width is the hidden size; the 4 heads keep their number, so the head dim
grows with width (and μP's ``α/d`` attention matters); the MLP is 4× wider
(GPT-2) or 2× (Llama's three-matrix SwiGLU).  Each run trains at one learning
rate on fresh sequences every step (linear warmup, cosine decay) and is
scored by its loss on a fixed sample of the chain afterwards.

Run::

    python -m fastmup.demo hf            # full run (see the README for its time)
    python -m fastmup.demo hf --quick    # smoke run, about a minute

Needs ``transformers`` (``pip install fastmup[hf]``), matplotlib, pandas, tqdm.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from fastmup.demo import mutransfer as mt
from fastmup.demo import tasks
from fastmup.demo.mutransfer import SweepConfig, _grid
from fastmup.demo.runs import cpu_seconds, sweep_record, usable_cpus, worker_pool, write_summary

__all__ = [
    "KINDS",
    "INIT_STD",
    "CONFIGS",
    "QUICK_CONFIGS",
    "COORD_MODULES",
    "model_config",
    "build",
    "train_one",
    "coord_check",
    "run",
    "main",
]

KINDS = ("gpt2", "llama")

_MODEL = dict(vocab=16, seq_len=16, n_layers=2, n_heads=4)
_TASK = dict(vocab=16, seq_len=16)

#: The full run: 4 widths × 9 learning rates × SP/μP per model.
CONFIGS: Dict[str, SweepConfig] = {
    kind: SweepConfig(
        model=kind,
        widths=(32, 64, 128, 256),
        base_width=32,
        log2_lrs=_grid(-11, -3),
        steps=150,
        batch_size=16,
        model_kwargs=dict(_MODEL),
        task_kwargs=dict(_TASK),
    )
    for kind in KINDS
}

#: ``--quick``: two widths, a short grid, few steps.
QUICK_CONFIGS: Dict[str, SweepConfig] = {
    kind: cfg.replace(widths=(32, 64), log2_lrs=_grid(-9, -4), steps=40) for kind, cfg in CONFIGS.items()
}

#: Modules drawn in the coordinate-check plots (the others overlap them).
COORD_MODULES = {
    "gpt2": (
        "transformer.wte",
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn:out[0]",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.1.mlp",
        "transformer.ln_f",
        "lm_head",
    ),
    "llama": (
        "model.embed_tokens",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn:out[0]",
        "model.layers.0.mlp.up_proj",
        "model.layers.1.mlp",
        "model.norm",
        "lm_head",
    ),
}

_TITLES = {"gpt2": "transformers GPT-2", "llama": "transformers Llama"}
_PANELS = {"sp": "SP (transformers + torch Adam)", "mup": "μP (mup_causal_lm + fastmup.MuAdam)"}


#: The std of transformers' weight init in the demo.  transformers' default
#: (0.02) is GPT-2 small's, chosen for a hidden size of 768; the demo's base
#: width is 32, where 0.1 (still below PyTorch's 1/sqrt(32) = 0.18) learns
#: faster.  An init scale is a hyperparameter like the learning rate: it is
#: tuned at the base width, μP carries it to other widths (as a variance
#: ``∝ 1/fan_in``) and SP keeps the number.
INIT_STD = 0.1


def model_config(kind: str, width: int, vocab: int = 16, seq_len: int = 16, n_layers: int = 2, n_heads: int = 4):
    """The transformers config of the demo's ``kind`` (``"gpt2"``/``"llama"``) at hidden size ``width``.

    Dropout is off (GPT-2's default is 0.1), so that runs differ by their
    parametrization and learning rate only; ``initializer_range`` is
    :data:`INIT_STD`.
    """
    if kind == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            n_embd=width, n_head=n_heads, n_layer=n_layers, vocab_size=vocab, n_positions=seq_len,
            bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            initializer_range=INIT_STD,
        )
    if kind == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=width, intermediate_size=2 * width, num_attention_heads=n_heads,
            num_key_value_heads=n_heads, num_hidden_layers=n_layers, vocab_size=vocab,
            max_position_embeddings=seq_len, bos_token_id=0, eos_token_id=0, initializer_range=INIT_STD,
        )
    raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")


def build(kind: str, width: int, parametrization: str, base_width: int, **model_kwargs: Any) -> torch.nn.Module:
    """SP: the plain transformers model; μP: ``mup_causal_lm`` (delta width ``2 * base_width``)."""
    from transformers import AutoModelForCausalLM

    cfg = model_config(kind, width, **model_kwargs)
    if parametrization == "sp":
        return AutoModelForCausalLM.from_config(cfg)
    if parametrization == "mup":
        from fastmup.integrations.transformers import mup_causal_lm

        return mup_causal_lm(
            cfg, model_config(kind, base_width, **model_kwargs), model_config(kind, 2 * base_width, **model_kwargs)
        )
    raise ValueError(f"unknown parametrization {parametrization!r}; expected 'sp' or 'mup'")


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()


def train_one(
    cfg: SweepConfig, parametrization: str, width: int, log2_lr: float, seed: int, backend: str = "auto"
) -> Dict[str, Any]:
    """One run, as :func:`fastmup.demo.mutransfer.train_one` (same keys), on a transformers model."""
    _quiet_transformers()
    return mt.train_one(cfg, parametrization, width, log2_lr, seed, backend, build=build, loss=_loss)


def coord_check(
    kind: str,
    widths: Sequence[int] = (32, 64, 128, 256, 512),
    base_width: int = 32,
    *,
    batch_size: int = 16,
    model_kwargs: Optional[Dict[str, Any]] = None,
    task_kwargs: Optional[Dict[str, Any]] = None,
    **options: Any,
):
    """Coordinate check of the transformers model in SP and in μP over ``widths``.

    :func:`fastmup.coord_check.get_coord_data` on one fixed batch
    (``model(input_ids=..., labels=...)``, the model's own loss), SP with
    ``torch.optim.Adam`` and μP with ``fastmup.MuAdam``; returns ``(df_sp,
    df_mup)`` and with ``path`` saves both plots, SP above μP, as one PNG.
    ``options`` (``lr``, ``nsteps``, ``nseeds``, ``progress``, ``backend``,
    ``path``, ``modules``) are those of
    :func:`fastmup.demo.mutransfer.coord_check_sp_mup`, with its defaults.
    """
    _quiet_transformers()
    model_kwargs = dict(_MODEL if model_kwargs is None else model_kwargs)
    task = tasks.MarkovTask(**(_TASK if task_kwargs is None else task_kwargs))
    x, _ = next(iter(task.batches(batch_size, 1, seed=0)))
    loader = [{"input_ids": x, "labels": x}]  # transformers shifts the labels itself

    def lazy(width: int, parametrization: str):
        return lambda: build(kind, width, parametrization, base_width, **model_kwargs)

    return mt.coord_check_sp_mup(lazy, loader, widths, title=_TITLES[kind], panels=_PANELS, dict_in_out=True, **options)


# ---------------------------------------------------------------------------
# command line


def build_parser(prog: str = "python -m fastmup.demo hf"):
    ap = mt.build_parser(prog)
    ap.description = (
        "μTransfer on transformers' GPT-2 and Llama: training loss against learning rate across widths, "
        "SP vs μP, on a CPU."
    )
    ap.set_defaults(models=",".join(KINDS), out="hf_mutransfer_out")
    for action in ap._actions:
        if action.dest == "models":
            action.help = "comma-separated subset of " + ",".join(KINDS)
    return ap


def run(args) -> Dict[str, Any]:
    """Run the demo as parsed by :func:`build_parser`; returns the results."""
    import contextlib

    os.makedirs(args.out, exist_ok=True)
    cfgs = mt.configs_from_args(args, table=QUICK_CONFIGS if args.quick else CONFIGS)
    workers = args.workers if args.workers is not None else usable_cpus()
    progress = not args.no_progress
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    summary: Dict[str, Any] = {}
    try:
        with (worker_pool(workers) if workers > 1 else contextlib.nullcontext()) as pool:
            for name, cfg in cfgs.items():
                t = time.perf_counter()
                results = mt.sweep(cfg, backend=args.backend, progress=progress, desc=f"{name} sweep", pool=pool,
                                   train=train_one)
                elapsed = time.perf_counter() - t
                png = os.path.join(args.out, f"mutransfer_{name}.png")
                mt.plot_sweep(
                    results, cfg, png, title=f"{_TITLES[name]} ({cfg.model_kwargs['n_layers']} layers, "
                    f"{cfg.model_kwargs['n_heads']} heads) on a 2nd-order Markov chain", panel_titles=_PANELS,
                )
                print()
                print(mt.format_best_table(results, title=f"== {name}: best learning rate per width "
                                                          f"({elapsed:.0f} s) =="))
                print(f"wrote {png}")
                cpu = sum(r["cpu_seconds"] for r in results)
                summary[name] = sweep_record(cfg, results, mt.best_lrs(results), seconds=elapsed, cpu_seconds=cpu)
        if not args.no_coord_check:
            for name, cfg in cfgs.items():
                t = time.perf_counter()
                widths = (32, 128) if args.quick else (32, 64, 128, 256, 512)
                png = os.path.join(args.out, f"coord_check_{name}.png")
                coord_check(
                    name, widths=widths, base_width=cfg.base_width, nseeds=1 if args.quick else 3,
                    batch_size=cfg.batch_size, path=png, progress=progress, backend=args.backend,
                    model_kwargs=cfg.model_kwargs, task_kwargs=cfg.task_kwargs, modules=COORD_MODULES[name],
                )
                print(f"wrote {png} ({time.perf_counter() - t:.0f} s)")
    finally:
        torch.set_num_threads(threads_before)
    return write_summary(summary, args.out, t0, cpu0, workers)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> Dict[str, Any]:
    return run(build_parser(prog or "python -m fastmup.demo hf").parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
