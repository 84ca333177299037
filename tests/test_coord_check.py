import sys

import mup
import mup.coord_check as mup_cc
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmup
from fastmup.coord_check import FDICT, convert_fdict, cov, covoffdiag, get_coord_data, plot_coord_data

pd = pytest.importorskip("pandas")

try:
    from tests.models import lm_batch, make_mlp, make_mup_mlp, make_transformer, mlp_batch
except ImportError:
    from models import lm_batch, make_mlp, make_mup_mlp, make_transformer, mlp_batch

WIDTHS = [64, 128, 256, 512, 1024]


def lazy_models(fn, lib, widths, mu, base=64, delta=128):
    def factory(w):
        return lambda: lib.set_base_shapes(fn(w), fn(base) if mu else None, delta=fn(delta) if mu else None)

    return {w: factory(w) for w in widths}


def l1_at(df, module, t):
    rows = df[(df.module == module) & (df.t == t)]
    return rows.groupby("width").l1.mean()


def test_all():
    assert set(fastmup.coord_check.__all__) == {
        "FDICT", "cov", "covoffdiag", "convert_fdict", "get_coord_data", "plot_coord_data", "example_plot_coord_check"}


def test_mup_keeps_hidden_activations_stable_and_sp_does_not():
    """The coord check itself: 3 steps of SGD at lr 4 on widths 64..1024."""
    x, y = mlp_batch(16)
    nsteps = 3
    out = {}
    for mu in (True, False):
        df = get_coord_data(lazy_models(make_mlp, fastmup, WIDTHS, mu), [(x, y)], optimizer="sgd", lr=4.0,
                            mup=mu, nsteps=nsteps, show_progress=False)
        assert sorted(df.width.unique()) == WIDTHS and sorted(df.t.unique()) == [1, 2, 3]
        out[mu] = df
    for module in ("fc1", "fc2"):
        l1 = l1_at(out[True], module, nsteps)
        assert l1.max() / l1.min() < 2.0, (module, l1.to_dict())
    # at initialization (t=1) μP and SP are the same model up to the base width
    assert torch.allclose(torch.tensor(l1_at(out[True], "fc2", 1).values),
                          torch.tensor(l1_at(out[False], "fc2", 1).values), rtol=0.2)
    sp = l1_at(out[False], "fc2", nsteps)
    assert sp[1024] / sp[64] > 3.5, sp.to_dict()
    assert sp.is_monotonic_increasing
    # SP logits blow up too; μP's do not
    assert l1_at(out[False], "readout", nsteps)[1024] > 10 * l1_at(out[True], "readout", nsteps)[1024]


@pytest.mark.parametrize("mu", [False, True], ids=["sp", "mup"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_same_dataframe_as_mup(mu, optimizer):
    x, y = mlp_batch(8)
    lr = 0.5 if optimizer == "sgd" else 0.01
    ours = get_coord_data(lazy_models(make_mlp, fastmup, [64, 256], mu), [(x, y)], optimizer=optimizer, lr=lr,
                          mup=mu, nsteps=3, show_progress=False)
    theirs = mup_cc.get_coord_data(lazy_models(make_mup_mlp, mup, [64, 256], mu), [(x, y)], optimizer=optimizer,
                                   lr=lr, mup=mu, nsteps=3, cuda=False, show_progress=False)
    assert list(ours.columns) == list(theirs.columns) == ["width", "module", "t", "l1", "optimizer", "lr"]
    assert ours[["width", "module", "t", "optimizer", "lr"]].equals(theirs[["width", "module", "t", "optimizer", "lr"]])
    assert torch.allclose(torch.tensor(ours.l1.values), torch.tensor(theirs.l1.values), rtol=1e-5, atol=0)


def small(mu=True, widths=(8, 16)):
    return lazy_models(make_mlp, fastmup, list(widths), mu, base=8, delta=16)


def test_statistics_and_filters():
    x, y = mlp_batch(4)
    df = get_coord_data(
        small(), [(x, y)], nsteps=2, show_progress=False,
        filter_module_by_name=lambda n: n in ("fc1", "readout"),
        output_fdict={"l2": "l2", "max": lambda t: t.abs().max()},
        input_fdict={"l1": "l1"},
        param_fdict={"l1": "l1"},
    )
    assert set(df.module) == {"fc1", "fc1:in[0]", "fc1:param[weight]", "fc1:param[bias]",
                              "readout", "readout:in[0]", "readout:param[weight]", "readout:param[bias]"}
    out = df[df.module == "fc1"]
    assert out[["l2", "max"]].notna().all().all() and out.l1.isna().all()
    inp = df[(df.module == "fc1:in[0]") & (df.t == 1)]
    assert inp.l1.iloc[0] == pytest.approx(x.abs().mean().item())
    assert len(df[(df.module == "fc1") & (df.width == 8)]) == 2


def test_nseeds_and_trainable_filter():
    x, y = mlp_batch(4)
    df = get_coord_data(small(), [(x, y)], nsteps=3, nseeds=2, show_progress=False,
                        filter_trainable_by_name=lambda n: n.startswith("readout"),
                        param_fdict={"l1": "l1"}, filter_module_by_name=lambda n: n in ("fc1", "readout"))
    assert len(df[(df.module == "fc1") & (df.width == 8) & (df.t == 1)]) == 2
    frozen = df[(df.module == "fc1:param[weight]") & (df.width == 8)].groupby("t").l1.first()
    trained = df[(df.module == "readout:param[weight]") & (df.width == 8)].groupby("t").l1.first()
    assert frozen.nunique() == 1 and trained.nunique() == 3


def test_loss_functions_and_one_hot_targets():
    x, y = mlp_batch(4)
    kw = dict(nsteps=2, show_progress=False, filter_module_by_name=lambda n: n == "readout")
    mse = get_coord_data(small(), [(x, y)], lossfn="mse", **kw)
    seen = []

    def my_mse(output, target):
        seen.append(target.dtype)
        return F.mse_loss(output, target)

    custom = get_coord_data(small(), [(x, y)], lossfn=my_mse, one_hot_target=True, **kw)
    assert seen == [torch.float32] * 4
    assert mse.l1.tolist() == custom.l1.tolist()
    xent = get_coord_data(small(), [(x, y)], lossfn="xent", **kw)
    xent_onehot = get_coord_data(small(), [(x, y)], lossfn="xent", one_hot_target=True, **kw)
    assert torch.allclose(torch.tensor(xent.l1.values), torch.tensor(xent_onehot.l1.values))
    assert xent.l1.tolist() != mse.l1.tolist()
    get_coord_data(small(), [(x, y)], lossfn="nll", **kw)
    with pytest.raises(ValueError, match="unknown lossfn"):
        get_coord_data(small(), [(x, y)], lossfn="hinge", **kw)


def test_sequence_model_with_flatten_output_and_dict_io():
    x, y = lm_batch()
    models = lazy_models(make_transformer, fastmup, [8, 16], True, base=8, delta=16)
    df = get_coord_data(models, [(x, y)], optimizer="adam", nsteps=2, flatten_output=True, show_progress=False)
    assert {"embed", "qkv", "readout"} <= set(df.module)

    class DictModel(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.net = make_mlp(w)

        def forward(self, x, labels):
            logits = self.net(x)
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    xb, yb = mlp_batch(4)
    models = lazy_models(DictModel, fastmup, [8, 16], True, base=8, delta=16)
    df = get_coord_data(models, [{"x": xb, "labels": yb}], optimizer="adamw", dict_in_out=True, nsteps=2,
                        show_progress=False)
    assert {":out[loss]", ":out[logits]", "net.fc2"} <= set(df.module)


def test_fix_data_false_iterates_the_loader():
    batches = [mlp_batch(4, seed=s) for s in range(3)]
    kw = dict(nsteps=3, show_progress=False, input_fdict={"l1": "l1"}, filter_module_by_name=lambda n: n == "fc1")
    fixed = get_coord_data(small(widths=[8]), batches, **kw)
    moving = get_coord_data(small(widths=[8]), batches, fix_data=False, **kw)
    seen = moving[moving.module == "fc1:in[0]"].sort_values("t").l1.tolist()
    assert seen == pytest.approx([b[0].abs().mean().item() for b in batches])
    assert fixed[fixed.module == "fc1:in[0]"].l1.nunique() == 1


def test_optimizer_choices():
    x, y = mlp_batch(4)
    df = get_coord_data(small(), [(x, y)], nsteps=1, show_progress=False)
    assert (df.optimizer == "sgd").all() and (df.lr == 0.1).all()
    df = get_coord_data(small(mu=False), [(x, y)], optimizer="adamw", mup=False, nsteps=1, show_progress=False)
    assert (df.lr == 1e-3).all()
    made = []

    def my_opt(params, lr):
        made.append(lr)
        return torch.optim.SGD(params, lr=lr)

    df = get_coord_data(small(), [(x, y)], optimizer=my_opt, lr=0.3, nsteps=1, show_progress=False)
    assert made == [0.3, 0.3] and (df.optimizer == "my_opt").all()
    with pytest.raises(ValueError, match="sgd"):
        get_coord_data(small(), [(x, y)], optimizer="rmsprop", show_progress=False)
    # μP optimizers need base shapes
    with pytest.raises(Exception, match="set_base_shapes"):
        get_coord_data({8: lambda: make_mlp(8)}, [(x, y)], mup=True, show_progress=False)


def test_runs_on_the_models_device_by_default():
    x, y = mlp_batch(4)
    a = get_coord_data(small(), [(x, y)], nsteps=2, show_progress=False)
    b = get_coord_data(small(), [(x, y)], nsteps=2, show_progress=False, cuda=False)
    assert a.equals(b)
    models = {8: lambda: fastmup.set_base_shapes(make_mlp(8).double(), None)}
    df = get_coord_data(models, [(x.double(), y)], nsteps=1, mup=False, show_progress=False)
    assert len(df)


def test_progress_bar(capsys):
    x, y = mlp_batch(4)
    get_coord_data(small(), [(x, y)], nsteps=1)
    assert "coord check" in capsys.readouterr().err


def test_missing_optional_dependency_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    x, y = mlp_batch(4)
    with pytest.raises(ImportError, match="pip install tqdm.*show_progress=False"):
        get_coord_data(small(), [(x, y)], nsteps=1)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        get_coord_data(small(), [(x, y)], nsteps=1, show_progress=False)


def test_stat_helpers():
    x = torch.arange(6.0).reshape(2, 3)
    assert torch.allclose(cov(x), x @ x.T / 3)
    assert covoffdiag(x).tolist() == [cov(x)[0, 1].item(), cov(x)[1, 0].item()]
    assert cov(torch.tensor(2.0)).item() == 4.0
    for name in ("l1", "l2", "mean", "std", "covl1", "covl2", "covoffdiagl1", "covoffdiagl2"):
        assert torch.isclose(FDICT[name](x), mup_cc.FDICT[name](x))
    assert convert_fdict({"a": "l1", "b": len})["b"] is len
    with pytest.raises(ValueError, match="unknown statistic"):
        convert_fdict({"a": "l7"})


def test_plot_coord_data_writes_png(tmp_path):
    import matplotlib

    x, y = mlp_batch(4)
    df = get_coord_data(small(widths=(8, 16, 32)), [(x, y)], nsteps=2, nseeds=2, show_progress=False)
    backend = matplotlib.get_backend()
    path = tmp_path / "coord.png"
    fig = plot_coord_data(df, save_to=str(path), suptitle="μP MLP", face_color="xkcd:light grey",
                          subplot_width=3, subplot_height=2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tuple(fig.get_size_inches()) == (6.0, 2.0)
    assert len(fig.axes) == 2 and fig.axes[0].get_title() == "t=1"
    assert fig.axes[0].get_xscale() == "log" and fig.axes[0].get_yscale() == "log"
    assert fig.axes[0].get_legend() is not None and fig.axes[1].get_legend() is None
    labels = {line.get_label() for line in fig.axes[0].get_lines()}
    assert labels == {"fc1", "act1", "fc2", "act2", "readout"}  # root module '' dropped
    assert matplotlib.get_backend() == backend

    fig = plot_coord_data(df, name_contains="fc", legend=False, loglog=False)
    assert {line.get_label() for line in fig.axes[0].get_lines()} == {"fc1", "fc2"}
    assert fig.axes[0].get_legend() is None and fig.axes[0].get_xscale() == "linear"
    fig = plot_coord_data(df, name_not_contains="act")
    assert {line.get_label() for line in fig.axes[0].get_lines()} == {"fc1", "fc2", "readout"}
    assert matplotlib.get_backend() == backend


def test_plot_numeric_module_names_of_sequential(tmp_path):
    models = {w: (lambda w=w: fastmup.set_base_shapes(
        nn.Sequential(nn.Linear(16, w), nn.ReLU(), fastmup.MuReadout(w, 10)), None)) for w in (8, 16)}
    x, y = mlp_batch(4)
    df = get_coord_data(models, [(x, y)], nsteps=1, mup=False, show_progress=False)
    fig = plot_coord_data(df, save_to=tmp_path / "seq.png")
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["0", "1", "2"]


def _painted(path) -> int:
    """Number of distinct colours in an image file (1: blank)."""
    from matplotlib.image import imread

    img = imread(str(path))
    return len({tuple(px) for px in img.reshape(-1, img.shape[-1])[::7].tolist()})


def test_plot_is_registered_with_pyplot_as_mup_does(tmp_path, capsys):
    """mup's README pattern: plot_coord_data(...), then plt.show() or
    plt.savefig().  The data here is mup's own DataFrame."""
    import matplotlib.pyplot as plt

    plt.close("all")
    x, y = mlp_batch(4)
    df = mup_cc.get_coord_data(lazy_models(make_mup_mlp, mup, [8, 16, 32], True, base=8, delta=16), [(x, y)],
                               nsteps=2, cuda=False, show_progress=False)
    path = tmp_path / "saved.png"
    fig = plot_coord_data(df, save_to=str(path), suptitle="μP MLP")
    assert capsys.readouterr().out == f"coord check plot saved to {path}\n"
    assert plt.get_fignums() == [fig.number] and plt.gcf() is fig
    assert tuple(fig.get_size_inches()) == (10.0, 4.0)  # mup's 5 x 4 inches per panel
    plt.show()  # non-interactive backend: a no-op, and the figure stays
    after = tmp_path / "after.png"
    plt.savefig(after)
    assert _painted(path) > 50 and _painted(after) > 50
    plt.figure()
    plt.savefig(tmp_path / "blank.png")
    assert _painted(tmp_path / "blank.png") == 1  # what the check above would see for a lost figure
    plt.close("all")
    # seaborn's darkgrid look on this figure only (mup calls seaborn.set(),
    # which changes the global style)
    import matplotlib
    from matplotlib.colors import to_rgba

    assert fig.axes[0].get_facecolor() == to_rgba("#EAEAF2")
    assert matplotlib.rcParams["axes.facecolor"] == "white"


def test_example_plot_coord_check_as_mup(tmp_path, capsys):
    """mup's README example runs (mup's own needs its test package and
    torchvision); its data are what mup's get_coord_data gives for the same
    models and batch."""
    import matplotlib.pyplot as plt

    from fastmup.coord_check import _example_loader, _example_models, example_plot_coord_check

    plt.close("all")
    with pytest.warns(RuntimeWarning, match="CIFAR-10 is not available"):
        fig = example_plot_coord_check("mlp", widths=[32, 64], nseeds=1, nsteps=2, plotdir=str(tmp_path),
                                       download_cifar=False, show_progress=False)
    path = tmp_path / "μp_mlp_sgd_lr0.1_nseeds1_bn0_coord.png"
    assert capsys.readouterr().out == f"coord check plot saved to {path}\n"
    assert path.exists() and plt.gcf() is fig
    assert fig._suptitle.get_text() == "μP MLP sgd lr=0.1 bn=off nseeds=1"
    assert [line.get_label() for line in fig.axes[1].get_lines()] == ["0", "1", "2", "3", "4"]
    with pytest.warns(RuntimeWarning):
        fig = example_plot_coord_check("cnn", optimizer="adam", widths=[2, 4], nseeds=1, nsteps=2, mup=False,
                                       batchnorm=True, plotdir=str(tmp_path), legend=None, show_progress=False)
    assert (tmp_path / "sp_cnn_adam_lr0.001_nseeds1_bn1_coord.png").exists()
    assert fig.patch.get_facecolor() != (1.0, 1.0, 1.0, 1.0)  # SP plots are greyed, as in mup
    plt.close("all")

    with pytest.warns(RuntimeWarning):
        loader = _example_loader(batch_size=2, download=False)
    for arch, mu in (("mlp", True), ("cnn", True), ("mlp", False)):
        models = _example_models(arch, [4, 8] if arch == "cnn" else [32, 64], mu, batchnorm=False, init="kaiming_fan_in_normal")
        kw = dict(mup=mu, nsteps=2, nseeds=1, flatten_input=arch == "mlp", cuda=False, show_progress=False)
        ours = get_coord_data(models, loader, **kw)
        theirs = mup_cc.get_coord_data(models, loader, **kw)
        assert ours[["width", "module", "t"]].equals(theirs[["width", "module", "t"]])
        assert torch.allclose(torch.tensor(ours.l1.values), torch.tensor(theirs.l1.values), rtol=1e-5, atol=0)
    model = models[32]()
    assert isinstance(model[-1], nn.Linear) and not isinstance(model[-1], fastmup.MuReadout)
    model = _example_models("mlp", [512], True, batchnorm=True, init="xavier_normal")[512]()
    assert isinstance(model[1], nn.BatchNorm1d) and not model[-1].weight.any()
    assert model[3].weight.infshape.width_mult() == 2.0
    with pytest.raises(ValueError, match="unknown init"):
        _example_models("mlp", [8], True, False, "orthogonal")
    with pytest.raises(ValueError, match="arch"):
        example_plot_coord_check("rnn")


# ---------------------------------------------------------------------------
# across depth


def _deep_models(alpha, depths, width=32):
    from fastmup.demo.models import build_deep

    def factory(d):
        return lambda: build_deep(d, alpha, 2, width=width, vocab=16, seq_len=16, n_heads=4)

    return {d: factory(d) for d in depths}


def _deep_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(16, (8, 17), generator=g)
    return [(x[:, :-1], x[:, 1:])]


def _at(df, module, stat, depth, t):
    sel = df[(df["module"] == module) & (df["depth"] == depth) & (df["t"] == t)]
    assert len(sel) == 1, (module, depth, t, len(sel))
    return float(sel[stat].iloc[0])


def _depth_df(alpha, depths=(2, 16)):
    from fastmup.coord_check import get_depth_coord_data

    def opt(params, lr):
        return fastmup.MuAdam(params, lr=lr, backend="eager")

    return get_depth_coord_data(
        _deep_models(alpha, depths), _deep_batch(), optimizer=opt, lr=2.0**-6, nsteps=4, flatten_output=True,
        show_progress=False,
    )


def test_depth_coord_check_completep_is_flat_and_no_depth_scaling_drifts():
    """The residual stream after 3 updates and every block's update: flat in
    depth under CompleteP; without depth scaling the stream grows with depth,
    and under depth-μP the per-block updates shrink like L^(-1/2)."""
    dfs = {a: _depth_df(a) for a in (0.0, 0.5, 1.0)}
    stream = {a: _at(df, "blocks[last]", "delta_l1", 16, 4) / _at(df, "blocks[last]", "delta_l1", 2, 4) for a, df in dfs.items()}
    block = {a: _at(df, "blocks[mean].mlp", "delta_l1", 16, 4) / _at(df, "blocks[mean].mlp", "delta_l1", 2, 4) for a, df in dfs.items()}
    assert 0.5 < stream[1.0] < 2 and 0.5 < block[1.0] < 2, (stream, block)
    assert stream[0.0] > 4, stream  # ~ m_L = 8 in theory
    assert block[0.5] < 0.6, block  # ~ m_L^(-1/2) = 0.35 in theory
    # depth-free names: the last block, the block means, and the modules outside
    modules = set(dfs[1.0]["module"])
    assert {"blocks[last]", "blocks[mean].mlp", "blocks[mean].attn", "ln_f", "readout"} <= modules
    assert not any(m.startswith("blocks.") for m in modules)
    assert _at(dfs[1.0], "ln_f", "delta_l1", 2, 1) == 0.0  # nothing moved at t=1


def test_delta_fdict_needs_fixed_data():
    with pytest.raises(ValueError, match="fix_data=True"):
        get_coord_data(
            {32: lambda: make_mup_mlp(32)}, [mlp_batch()], optimizer="adam", delta_fdict={"l1": "l1"}, fix_data=False,
            show_progress=False, flatten_input=True,
        )
