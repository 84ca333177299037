"""Coordinate checks: is a model really in μP?

Train the same architecture at several widths for a few steps and record,
for every module's output, the average size of its coordinates (``l1`` =
``mean |x|`` by default).  Under a correct μP every curve of ``l1`` against
width is flat at every step; under standard parametrization (SP) the
activations blow up with width after the first update.

``pandas`` (for the returned DataFrame), ``tqdm`` (progress bar) and
``matplotlib`` (plots) are optional dependencies, imported when used.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FDICT", "cov", "covoffdiag", "convert_fdict", "get_coord_data", "plot_coord_data"]


def _require(module: str, purpose: str, extra: str = ""):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        pkg = module.split(".")[0]
        raise ImportError(
            f"fastmup.coord_check needs `{pkg}` for {purpose}: pip install {pkg}{extra}"
        ) from e


def cov(x: torch.Tensor) -> torch.Tensor:
    """Gram matrix ``X Xᵀ / d`` of ``x`` seen as a stack of ``d``-vectors (last dim)."""
    if x.nelement() == 1:
        xx, width = x.reshape(1, 1), 1
    else:
        width = x.shape[-1]
        xx = x.reshape(-1, width)
    return xx @ xx.T / width


def covoffdiag(x: torch.Tensor) -> torch.Tensor:
    """Off-diagonal entries of :func:`cov` as a vector."""
    c = cov(x)
    return c[~torch.eye(c.shape[0], dtype=torch.bool, device=c.device)]


#: Statistics available by name in the ``*_fdict`` arguments.
FDICT: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "l1": lambda x: torch.abs(x).mean(),
    "l2": lambda x: (x**2).mean() ** 0.5,
    "mean": lambda x: x.mean(),
    "std": lambda x: x.std(),
    "covl1": lambda x: torch.abs(cov(x)).mean(),
    "covl2": lambda x: (cov(x) ** 2).mean() ** 0.5,
    "covoffdiagl1": lambda x: torch.abs(covoffdiag(x)).mean(),
    "covoffdiagl2": lambda x: (covoffdiag(x) ** 2).mean() ** 0.5,
}


def convert_fdict(d: Mapping[str, Union[str, Callable]]) -> Dict[str, Callable]:
    """Replace the string values of ``d`` by the functions of the same name in :data:`FDICT`."""
    out = {}
    for k, v in d.items():
        if isinstance(v, str):
            if v not in FDICT:
                raise ValueError(f"unknown statistic {v!r} for {k!r}; known: {sorted(FDICT)}")
            v = FDICT[v]
        out[k] = v
    return out


def _stats_into(records: list, row: dict, x: Any, fdict: Mapping[str, Callable]) -> None:
    # Walks nested outputs (tuples, lists, dicts such as HF ModelOutputs),
    # suffixing the module name with the position of each tensor.
    if isinstance(x, torch.Tensor):
        if not (x.is_floating_point() or x.is_complex()) or x.numel() == 0:
            return  # indices, masks: no meaningful coordinate size
        rec = dict(row)
        for fname, f in fdict.items():
            rec[fname] = f(x.detach()).item()
        records.append(rec)
    elif isinstance(x, (tuple, list)):
        for i, xi in enumerate(x):
            _stats_into(records, {**row, "module": f"{row['module']}[{i}]"}, xi, fdict)
    elif isinstance(x, Mapping):
        for k, xi in x.items():
            _stats_into(records, {**row, "module": f"{row['module']}[{k}]"}, xi, fdict)


def _record_hook(records: list, width: Any, name: str, t: int, output_fdict, input_fdict, param_fdict):
    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        row = {"width": width, "module": name, "t": t}
        with torch.no_grad():
            if isinstance(output, torch.Tensor):
                _stats_into(records, row, output, output_fdict)
            elif isinstance(output, (tuple, list, Mapping)):
                items = output.items() if isinstance(output, Mapping) else enumerate(output)
                for k, out in items:
                    _stats_into(records, {**row, "module": f"{name}:out[{k}]"}, out, output_fdict)
            if input_fdict:
                items = inputs.items() if isinstance(inputs, Mapping) else enumerate(inputs)
                for k, x in items:
                    _stats_into(records, {**row, "module": f"{name}:in[{k}]"}, x, input_fdict)
            if param_fdict:
                for pname, p in module.named_parameters():
                    _stats_into(records, {**row, "module": f"{name}:param[{pname}]"}, p, param_fdict)

    return hook


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, list):
        return [_to_device(v, device) for v in x]
    if isinstance(x, tuple):
        moved = [_to_device(v, device) for v in x]
        return type(x)(*moved) if hasattr(x, "_fields") else tuple(moved)
    return x


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _loss(output: torch.Tensor, target: torch.Tensor, lossfn, flatten_output: bool, one_hot_target) -> torch.Tensor:
    if flatten_output:
        output = output.reshape(-1, output.shape[-1])
        if not target.is_floating_point():  # class indices of shape (batch, seq)
            target = target.reshape(-1)
    if one_hot_target is None:
        one_hot_target = lossfn == "mse"
    if one_hot_target:
        target = F.one_hot(target.long(), num_classes=output.size(-1)).to(output.dtype)
    if callable(lossfn):
        return lossfn(output, target)
    if lossfn == "xent":
        return F.cross_entropy(output, target)
    if lossfn == "mse":
        return F.mse_loss(output, target)
    if lossfn == "nll":
        return F.nll_loss(output, target)
    raise ValueError(f"unknown lossfn {lossfn!r}: use 'xent', 'mse', 'nll' or a callable(output, target)")


def _get_coord_data(
    models: Mapping[Any, Callable[[], nn.Module]],
    dataloader,
    optcls: Callable[[nn.Module], torch.optim.Optimizer],
    nsteps: int = 3,
    dict_in_out: bool = False,
    flatten_input: bool = False,
    flatten_output: bool = False,
    output_name: str = "loss",
    lossfn: Union[str, Callable] = "xent",
    filter_module_by_name: Optional[Callable[[str], bool]] = None,
    fix_data: bool = True,
    cuda: Optional[bool] = None,
    nseeds: int = 1,
    output_fdict=None,
    input_fdict=None,
    param_fdict=None,
    show_progress: bool = True,
    one_hot_target: Optional[bool] = None,
):
    pd = _require("pandas", "the coord-check DataFrame")
    output_fdict = convert_fdict(output_fdict) if output_fdict is not None else {"l1": FDICT["l1"]}
    input_fdict = convert_fdict(input_fdict) if input_fdict else {}
    param_fdict = convert_fdict(param_fdict) if param_fdict else {}
    if fix_data:
        batch = next(iter(dataloader))
        dataloader = [batch] * nsteps
    pbar = None
    if show_progress:
        tqdm = _require("tqdm", "the progress bar", " (or pass show_progress=False)").tqdm
        pbar = tqdm(total=nseeds * len(models), desc="coord check")

    records: list = []
    try:
        for seed in range(nseeds):
            # One seed per repetition, shared by the widths in turn, as mup does
            # (so the DataFrames of the two packages can be compared).
            torch.manual_seed(seed)
            for width, make_model in models.items():
                model = make_model().train()
                if cuda:
                    model = model.cuda()
                device = _model_device(model)
                optimizer = optcls(model)
                for t, batch in enumerate(dataloader, 1):
                    handles = [
                        module.register_forward_hook(
                            _record_hook(records, width, name, t, output_fdict, input_fdict, param_fdict)
                        )
                        for name, module in model.named_modules()
                        if filter_module_by_name is None or filter_module_by_name(name)
                    ]
                    try:
                        if dict_in_out:
                            outputs = model(**_to_device(dict(batch), device))
                            loss = outputs[output_name] if isinstance(outputs, Mapping) else outputs[0]
                        else:
                            data, target = batch
                            data, target = _to_device(data, device), _to_device(target, device)
                            if flatten_input:
                                data = data.reshape(data.size(0), -1)
                            loss = _loss(model(data), target, lossfn, flatten_output, one_hot_target)
                    finally:
                        for h in handles:
                            h.remove()
                    optimizer.zero_grad()
                    # second-order optimizers (ESGD-M) ask for a graph on HVP steps
                    wants_graph = getattr(optimizer, "should_create_graph", None)
                    loss.backward(create_graph=bool(wants_graph()) if wants_graph else False)
                    optimizer.step()
                    if t == nsteps:
                        break
                if pbar is not None:
                    pbar.update(1)
    finally:
        if pbar is not None:
            pbar.close()
    return pd.DataFrame(records)


def get_coord_data(
    models: Mapping[Any, Callable[[], nn.Module]],
    dataloader,
    optimizer: Union[str, Callable] = "sgd",
    lr: Optional[float] = None,
    mup: bool = True,
    filter_trainable_by_name: Optional[Callable[[str], bool]] = None,
    **kwargs,
):
    """Train each model a few steps and record coordinate statistics.

    Args:
        models: ``{width: factory}``; ``factory()`` builds a fresh model (with
            base shapes set, for μP).
        dataloader: yields ``(input, target)`` batches, or dicts of model
            keyword arguments when ``dict_in_out``.  With ``fix_data`` (the
            default) only the first batch is used, ``nsteps`` times.
        optimizer: ``'sgd'``, ``'adam'``, ``'adamw'``, or a callable
            ``optimizer(params, lr=lr)`` (``lr`` only passed when given).
        lr: learning rate; defaults to 0.1 for SGD and 1e-3 otherwise.
        mup: use ``fastmup.optim.MuSGD/MuAdam/MuAdamW`` (True) or the plain
            ``torch.optim`` classes (False).
        filter_trainable_by_name: only parameters whose name passes are trained.

    Keyword Args:
        nsteps (3): training steps; the statistics of step ``t`` (1-based)
            are those of the forward pass before the ``t``-th update.
        dict_in_out (False): call ``model(**batch)``; the loss is
            ``output[output_name]`` for a dict output, else ``output[0]``.
        flatten_input (False): reshape inputs to ``(batch, -1)`` (MLPs).
        flatten_output (False): reshape outputs to ``(-1, n_classes)`` and
            targets to ``(-1,)`` (sequence models).
        output_name ('loss'): see ``dict_in_out``.
        lossfn ('xent'): ``'xent'``, ``'mse'``, ``'nll'`` or ``f(output, target)``.
        one_hot_target (None): pass the target one-hot encoded (as the
            output's dtype); ``None`` means only for ``'mse'``, as mup.
        filter_module_by_name (None): only record modules whose name passes.
        fix_data (True): see ``dataloader``.
        cuda (None): ``True`` moves each model to CUDA; by default models
            stay on the device they were built on.  Batches always follow the
            model's device.
        nseeds (1): repetitions; repetition ``i`` seeds torch with ``i`` once
            before building the models of every width in turn.
        output_fdict, input_fdict, param_fdict: ``{name: statistic}`` with a
            function or a key of :data:`FDICT`; by default only ``l1`` of each
            module's output.
        show_progress (True): tqdm progress bar.

    Returns:
        a pandas DataFrame with columns ``width``, ``module``, ``t``, one per
        statistic, ``optimizer`` and ``lr``.
    """
    if lr is None:
        lr = 0.1 if optimizer == "sgd" else 1e-3 if isinstance(optimizer, str) else None
    if isinstance(optimizer, str):
        if optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer should be 'sgd', 'adam', 'adamw' or a callable, got {optimizer!r}")
        if mup:
            # Imported here: fastmup.optim imports the rest of fastmup.
            from fastmup.optim import MuAdam, MuAdamW, MuSGD

            cls = {"sgd": MuSGD, "adam": MuAdam, "adamw": MuAdamW}[optimizer]
        else:
            cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]

        def make_opt(params):
            return cls(params, lr=lr)

        opt_name = optimizer
    elif callable(optimizer):
        def make_opt(params):
            return optimizer(params) if lr is None else optimizer(params, lr=lr)

        opt_name = getattr(optimizer, "__name__", type(optimizer).__name__)
    else:
        raise ValueError("optimizer should be 'sgd', 'adam', 'adamw' or a callable")

    def optcls(model: nn.Module):
        if filter_trainable_by_name is None:
            params = list(model.parameters())
        else:
            params = [p for n, p in model.named_parameters() if filter_trainable_by_name(n)]
        return make_opt(params)

    df = _get_coord_data(models, dataloader, optcls, **kwargs)
    df["optimizer"] = opt_name
    df["lr"] = lr
    return df


def plot_coord_data(
    df,
    y: str = "l1",
    save_to: Optional[str] = None,
    suptitle: Optional[str] = None,
    x: str = "width",
    hue: str = "module",
    legend: Union[str, bool, None] = "full",
    name_contains: Optional[str] = None,
    name_not_contains: Optional[str] = None,
    loglog: bool = True,
    logbase: float = 2,
    face_color: Optional[str] = None,
    subplot_width: float = 5,
    subplot_height: float = 4,
):
    """Plot ``y`` against ``x`` for every ``hue`` (module), one panel per step ``t``.

    Each line is the mean over seeds, with a band from the minimum to the
    maximum.  As with mup, the figure is made with ``pyplot`` (so
    ``plt.show()`` or ``plt.savefig()`` after the call show or write it, and
    a notebook displays it), in seaborn's "darkgrid" look (applied to this
    figure only: the global matplotlib style is left alone); with
    ``save_to`` it is also written as an image (PNG for a ``.png`` name) and
    the path is printed.  ``legend`` is shown on the first panel unless it is
    ``False``/``None``.  ``name_contains`` and ``name_not_contains`` select
    modules by substring (both may be given).  ``subplot_width`` and
    ``subplot_height`` size each panel (mup's fixed 5 x 4 inches by default).
    Returns the ``matplotlib.figure.Figure``; close it with
    ``plt.close(fig)`` when making many.
    """
    plt = _require("matplotlib.pyplot", "plot_coord_data")
    pd = _require("pandas", "plot_coord_data")

    df = df.copy()
    # The root module's name is '' and duplicates the last layer's output.
    if "module" in df:
        df = df[df["module"] != ""]
    if name_contains is not None:
        df = df[df["module"].astype(str).str.contains(name_contains, regex=False)]
    if name_not_contains is not None:
        df = df[~df["module"].astype(str).str.contains(name_not_contains, regex=False)]
    if hue in df:
        numeric = pd.to_numeric(df[hue], errors="coerce")
        if len(df) and numeric.notna().all():  # nn.Sequential children are named 0, 1, ...
            df[hue] = numeric

    ts = sorted(df["t"].unique()) if len(df) else []
    n = max(len(ts), 1)
    style = _STYLE if _STYLE in plt.style.available else "default"
    with plt.style.context(style):
        fig = plt.figure(figsize=(subplot_width * n, subplot_height))
        if face_color is not None:
            fig.patch.set_facecolor(face_color)
        axes = [fig.add_subplot(1, n, i + 1) for i in range(n)]
        hues = sorted(df[hue].unique(), key=lambda v: (isinstance(v, str), v)) if len(df) else []
        cmap = _colors(len(hues))
        for i, (ax, t) in enumerate(zip(axes, ts)):
            sub = df[df["t"] == t]
            for color, h in zip(cmap, hues):
                g = sub[sub[hue] == h].groupby(x)[y]
                mean, lo, hi = g.mean(), g.min(), g.max()
                if mean.empty:
                    continue
                ax.plot(mean.index, mean.values, marker="o", markersize=3, color=color, label=str(h))
                if (hi.values > lo.values).any():
                    ax.fill_between(mean.index, lo.values, hi.values, color=color, alpha=0.2, linewidth=0)
            ax.set_title(f"t={t}")
            ax.set_xlabel(x)
            ax.set_ylabel(y if i == 0 else "")
            if loglog:
                ax.set_xscale("log", base=logbase)
                ax.set_yscale("log", base=logbase)
            if i == 0 and legend not in (False, None) and hues:
                ax.legend(fontsize="small")
        if suptitle:
            fig.suptitle(suptitle)
        fig.tight_layout(rect=(0, 0.03, 1, 0.95))
        if save_to is not None:
            fig.savefig(save_to)
            print(f"coord check plot saved to {save_to}")
    return fig


#: matplotlib's copy of seaborn's "darkgrid" style, the look of mup's plots
#: (mup calls seaborn.set(), which changes the global style).
_STYLE = "seaborn-v0_8-darkgrid"


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"] if n > 10 else colormaps["tab10"]
    if n > 10:
        return [cmap(i / max(n - 1, 1)) for i in range(n)]
    return [cmap(i) for i in range(n)]
