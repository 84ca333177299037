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

import functools
import os
import warnings
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastmup.sharpness import model_device

__all__ = [
    "FDICT",
    "cov",
    "covoffdiag",
    "convert_fdict",
    "get_coord_data",
    "plot_coord_data",
    "example_plot_coord_check",
]


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
                device = model_device(model)
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


# ---------------------------------------------------------------------------
# mup's example: its MLP and CNN on CIFAR-10


def _init_samplers() -> Dict[str, Callable[[torch.Tensor], Any]]:
    """The initializations mup's example offers by name, as μP initializers
    (applied to every parameter of rank >= 2)."""
    from fastmup import init

    return {
        "default": lambda t: t,
        "const_uniform": functools.partial(init.uniform_, a=-0.1, b=0.1),
        "const_normal": functools.partial(init.normal_, std=0.1),
        "const_trunc_normal": functools.partial(init.trunc_normal_, std=0.1, a=-0.2, b=0.2),
        "xavier_uniform": init.xavier_uniform_,
        "xavier_normal": init.xavier_normal_,
        "kaiming_fan_in_uniform": functools.partial(init.kaiming_uniform_, mode="fan_in"),
        "kaiming_fan_in_normal": functools.partial(init.kaiming_normal_, mode="fan_in"),
        "kaiming_fan_out_uniform": functools.partial(init.kaiming_uniform_, mode="fan_out"),
        "kaiming_fan_out_normal": functools.partial(init.kaiming_normal_, mode="fan_out"),
    }


def _example_net(arch: str, width: int, mu: bool, batchnorm: bool) -> nn.Sequential:
    """mup's example networks: for ``"mlp"`` 3072 → w → w → 10 (CIFAR-10
    images flattened); for ``"cnn"`` two 5x5 convolutions (w, 2w channels)
    with 2x2 max-pooling, then 50w → 16w → 10w → 10.  ReLUs; BatchNorm after
    every hidden layer with ``batchnorm``; a :class:`MuReadout` under μP."""
    from fastmup.layer import MuReadout

    if arch == "mlp":
        layers = [nn.Linear(3072, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()]
        readout_in = width
        norms = [(1, nn.BatchNorm1d(width)), (4, nn.BatchNorm1d(width))]
    elif arch == "cnn":
        layers = [
            nn.Conv2d(3, width, kernel_size=5), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Conv2d(width, 2 * width, kernel_size=5), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Flatten(),
            nn.Linear(50 * width, 16 * width), nn.ReLU(inplace=True),
            nn.Linear(16 * width, 10 * width), nn.ReLU(inplace=True),
        ]
        readout_in = 10 * width
        norms = [(1, nn.BatchNorm2d(width)), (5, nn.BatchNorm2d(2 * width)),
                 (10, nn.BatchNorm1d(16 * width)), (13, nn.BatchNorm1d(10 * width))]
    else:
        raise ValueError(f"arch should be 'mlp' or 'cnn', got {arch!r}")
    layers.append(MuReadout(readout_in, 10) if mu else nn.Linear(readout_in, 10))
    if batchnorm:
        for position, norm in norms:  # positions in the list as it grows
            layers.insert(position, norm)
    return nn.Sequential(*layers)


def _example_models(arch: str, widths: Sequence[int], mu: bool, batchnorm: bool, init: str) -> Dict[int, Callable[[], nn.Module]]:
    """``{width: factory}`` as mup's example builds them.  μP: base width 256
    (MLP) or 8 (CNN), base shapes from the base model alone (dimensions that
    differ from it scale), ``init`` applied, readout zeroed.  SP: torch's
    default initialization."""
    from fastmup.shape import set_base_shapes

    samplers = _init_samplers()
    if init not in samplers:
        raise ValueError(f"unknown init {init!r}; known: {sorted(samplers)}")
    base_width = 256 if arch == "mlp" else 8

    def build(width: int) -> nn.Module:
        model = _example_net(arch, width, mu, batchnorm)  # first: its init follows the seed
        if not mu:
            return set_base_shapes(model, None)
        set_base_shapes(model, _example_net(arch, base_width, mu, batchnorm))
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    samplers[init](p)
            readout = model[-1]
            readout.weight.zero_()
            readout.bias.zero_()
        return model

    return {w: functools.partial(build, int(w)) for w in widths}


def _example_loader(batch_size: int, download: bool):
    """CIFAR-10's training set as mup's example loads it (torchvision, in
    ``./dataset``, normalised to [-1, 1], not shuffled), or, when torchvision
    or the data is not available, one fixed batch of standard Gaussian images
    of the same shape."""
    try:
        from torchvision import datasets, transforms

        data = datasets.CIFAR10(
            root="dataset", train=True, download=download,
            transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)]),
        )
        return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    except Exception as e:  # ImportError, or no data and no download
        warnings.warn(
            f"example_plot_coord_check: CIFAR-10 is not available ({type(e).__name__}: {e}); "
            "using a fixed batch of random images instead (pass dataloader= to use your own data)",
            RuntimeWarning,
            stacklevel=3,
        )
        g = torch.Generator().manual_seed(0)
        return [(torch.randn(batch_size, 3, 32, 32, generator=g), torch.randint(0, 10, (batch_size,), generator=g))]


def example_plot_coord_check(
    arch: str = "mlp",
    optimizer: str = "sgd",
    lr: Optional[float] = None,
    widths: Optional[Sequence[int]] = None,
    mup: bool = True,
    nsteps: int = 3,
    nseeds: int = 10,
    plotdir: str = "",
    batchnorm: bool = False,
    batch_size: int = 1,
    init: str = "kaiming_fan_in_normal",
    download_cifar: bool = True,
    legend: Union[str, bool, None] = "full",
    dict_in_out: bool = False,
    name_contains: Optional[str] = None,
    name_not_contains: Optional[str] = None,
    *,
    dataloader=None,
    show_progress: bool = True,
):
    """mup's example coordinate check, for its MLP (``arch="mlp"``) or CNN
    (``"cnn"``) on CIFAR-10, in μP (``mup=True``) or SP; returns the figure.

    The arguments are mup's.  ``widths`` default to 2^7…2^13 (MLP) or
    2^3…2^9 (CNN); ``batchnorm`` inserts BatchNorm layers and sets the batch
    size to 5; ``init`` names the initialization of the μP models (see
    ``_init_samplers``); ``lr`` defaults to 0.1 for SGD and 1e-3 otherwise.
    The plot is saved in ``plotdir`` as mup names it,
    ``{μp|sp}_{arch}_{optimizer}_lr{lr}_nseeds{nseeds}_bn{0|1}_coord.png``.

    The models are built here (mup imports them from its test package, which
    is not installed with it).  CIFAR-10 needs torchvision (``./dataset``,
    downloaded with ``download_cifar``); without it, or without the data, a
    fixed batch of random images is used, with a warning.  ``dataloader``
    (extra) gives the data instead; ``show_progress`` (extra) switches off
    the progress bar.
    """
    if arch not in ("mlp", "cnn"):
        raise ValueError(f"arch should be 'mlp' or 'cnn', got {arch!r}")
    if batchnorm:
        batch_size = 5
    if dataloader is None:
        dataloader = _example_loader(batch_size, download_cifar)
    if widths is None:
        widths = [2**k for k in (range(7, 14) if arch == "mlp" else range(3, 10))]
    models = _example_models(arch, widths, mup, batchnorm, init)
    df = get_coord_data(
        models, dataloader, mup=mup, lr=lr, optimizer=optimizer, flatten_input=arch == "mlp",
        nseeds=nseeds, nsteps=nsteps, dict_in_out=dict_in_out, show_progress=show_progress,
    )
    if lr is None:
        lr = 0.1 if optimizer == "sgd" else 1e-3
    prm = "μP" if mup else "SP"
    return plot_coord_data(
        df,
        legend=legend,
        name_contains=name_contains,
        name_not_contains=name_not_contains,
        save_to=os.path.join(plotdir, f"{prm.lower()}_{arch}_{optimizer}_lr{lr}_nseeds{nseeds}_bn{int(batchnorm)}_coord.png"),
        suptitle=f"{prm} {arch.upper()} {optimizer} lr={lr} bn={'on' if batchnorm else 'off'} nseeds={nseeds}",
        face_color=None if mup else "xkcd:light grey",
    )
