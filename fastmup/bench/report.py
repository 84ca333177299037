"""Output: the table on stdout (rich, else tabulate, else plain text), the
skip notes, the JSON file and the PNG plot."""
from __future__ import annotations

import json
import math
import os
import sys
from collections import OrderedDict
from typing import Any, Optional, Sequence, TextIO

__all__ = ["HEADERS", "table_rows", "print_header", "print_table", "print_notes", "write_json", "write_plot"]

HEADERS = ("model", "optimizer", "impl", "tensors", "params", "ms median", "ms min–max",
           "GB/s", "% copy BW", "× baseline", "max rel err")


def _params(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _ms(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _err(x: Optional[float], reference: bool) -> str:
    if reference:
        return "(reference)"
    if x is None:
        return "—"
    if math.isinf(x):
        return "inf"
    return "0" if x == 0 else f"{x:.1e}"


def table_rows(rows: Sequence[dict], labels: Optional[dict[str, str]] = None) -> list[list[str]]:
    labels = labels or {}
    out = []
    for r in rows:
        speedup = r.get("speedup_vs_baseline", r.get("speedup_vs_torch_fused"))
        pct = r.get("pct_of_copy_bw")
        out.append([
            r["model"],
            labels.get(r["optimizer"], r["optimizer"]),
            r["impl"],
            str(r["n_tensors"]),
            _params(r["n_params"]),
            _ms(r["ms_median"]),
            f"{_ms(r['ms_min'])}–{_ms(r['ms_max'])}",
            f"{r['GBps']:.2f}",
            "—" if pct is None else f"{pct:.1f}",
            "—" if speedup is None else f"{speedup:.2f}×",
            _err(r.get("max_rel_err_vs_eager"), r["impl"] == "fastmup-eager"),
        ])
    return out


def print_header(meta: dict[str, Any], file: TextIO = sys.stdout) -> None:
    info = meta["device_info"]
    print(f"fastmup benchmark — {meta['device']}", file=file)
    v = meta["versions"]
    print("versions: " + ", ".join(f"{k} {v[k]}" for k in v if v[k]), file=file)
    if meta.get("git_commit"):
        print(f"git commit: {meta['git_commit']}", file=file)
    cb = meta["copy_bandwidth"]
    print(f"measured copy bandwidth: {meta['copy_bandwidth_GBps']:.1f} GB/s "
          f"(best of {cb['repeats']}; median {cb['median_GBps']:.1f} GB/s; {cb['bytes'] / 2**20:.0f} MiB copies, read+write)", file=file)
    if meta.get("inplace_add_bandwidth_GBps"):
        print(f"measured in-place add bandwidth: {meta['inplace_add_bandwidth_GBps']:.1f} GB/s (a.add_(b): 2 reads + 1 write)", file=file)
    if info.get("type") == "cuda":
        keys = ("name", "total_memory_GiB", "multi_processor_count", "major", "minor", "L2_cache_size",
                "clock_rate", "memory_clock_rate", "memory_bus_width")
        print("GPU: " + ", ".join(f"{k}={info[k]}" for k in keys if k in info), file=file)
    else:
        print(f"CPU: {info.get('name')}, {info.get('threads')} torch threads, {info.get('capability')}, "
              f"LLC {info.get('llc_bytes', 0) / 2**20:.0f} MiB, {info.get('total_memory_GiB')} GiB RAM", file=file)
    load = meta.get("loadavg_start")
    if load:
        print(f"load average at start: {' '.join(f'{x:.2f}' for x in load)}", file=file)
    cfg = meta.get("config", {})
    if cfg:
        print("config: " + ", ".join(f"{k}={cfg[k]}" for k in cfg), file=file)
    print(file=file)


def print_table(rows: Sequence[dict], labels: Optional[dict[str, str]] = None, file: TextIO = sys.stdout,
                title: str = "optimizer step") -> None:
    body = table_rows(rows, labels)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    if Console is not None:
        width = 200 if not (hasattr(file, "isatty") and file.isatty()) else None
        console = Console(file=file, width=width, highlight=False, soft_wrap=False)
        table = Table(title=title, title_justify="left")
        right = {"tensors", "params", "ms median", "ms min–max", "GB/s", "% copy BW", "× baseline", "max rel err"}
        for h in HEADERS:
            table.add_column(h, justify="right" if h in right else "left", no_wrap=True)
        previous = None
        for r, cells in zip(rows, body):
            key = (r["model"], r["optimizer"])
            if previous is not None and key != previous:
                table.add_section()
            previous = key
            table.add_row(*cells)
        console.print(table)
        return
    try:
        from tabulate import tabulate

        print(tabulate(body, headers=HEADERS, tablefmt="github", disable_numparse=True), file=file)
        return
    except ImportError:
        pass
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(HEADERS)]
    print("  ".join(h.ljust(w) for h, w in zip(HEADERS, widths)), file=file)
    for cells in body:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)), file=file)


def summarize_skips(skipped: Sequence[dict], models: Sequence[str], optimizers: Sequence[str]) -> list[str]:
    """One line per (implementation, reason), naming the cases it applies to
    ("all cases" when it covers every model × optimizer)."""
    groups: "OrderedDict[tuple[str, str], list[tuple[str, str]]]" = OrderedDict()
    for s in skipped:
        groups.setdefault((s["impl"], s["reason"]), []).append((s["model"], s["optimizer"]))
    lines = []
    every = len(models) * len(optimizers)
    by_reason: "OrderedDict[str, list[str]]" = OrderedDict()
    for (impl, reason), cases in groups.items():
        where_models = list(OrderedDict.fromkeys(m for m, _ in cases))
        where_opts = list(OrderedDict.fromkeys(o for _, o in cases))
        if len(set(cases)) == every:
            where = "all cases"
        elif len(set(cases)) == len(where_models) * len(where_opts):
            where = f"{'/'.join(where_models)} × {'/'.join(where_opts)}"
        else:
            where = ", ".join(f"{m} {o}" for m, o in cases)
        by_reason.setdefault(f"{reason} [{where}]", []).append(impl)
    for text, impls in by_reason.items():
        lines.append(f"{', '.join(impls)}: {text}")
    return lines


def print_notes(skipped: Sequence[dict], models: Sequence[str], optimizers: Sequence[str],
                notes: Sequence[str] = (), file: TextIO = sys.stdout) -> None:
    lines = list(notes) + summarize_skips(skipped, models, optimizers)
    if lines:
        print("\nnotes / skipped:", file=file)
        for line in lines:
            print(f"  - {line}", file=file)


def _clean(x: Any) -> Any:
    """JSON-safe values (inf/nan become strings)."""
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return str(x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path: str, document: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_clean(document), f, indent=2, allow_nan=False)
        f.write("\n")


def write_plot(path: str, rows: Sequence[dict], labels: Optional[dict[str, str]] = None, title: str = "") -> None:
    """Grouped bars per model (one bar per implementation), one column per
    optimizer: step time (log scale) on top, % of copy bandwidth below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.patches import Patch

    from fastmup.bench.impls import IMPLS

    labels = labels or {}
    optimizers = list(OrderedDict.fromkeys(r["optimizer"] for r in rows))
    models = list(OrderedDict.fromkeys(r["model"] for r in rows))
    order = list(IMPLS)
    impls = sorted(OrderedDict.fromkeys(r["impl"] for r in rows), key=lambda n: order.index(n) if n in order else len(order))
    ncols = max(1, len(optimizers))
    fig, axes = plt.subplots(2, ncols, figsize=(max(6.0, 4.2 * ncols), 7.5), squeeze=False)
    cmap = plt.get_cmap("tab10")

    def color(impl: str):  # one colour per implementation, the same in every run
        return cmap((order.index(impl) if impl in order else len(order) + impls.index(impl)) % 10)

    width = 0.8 / max(1, len(impls))
    for c, opt in enumerate(optimizers):
        for metric, ax in (("ms_median", axes[0][c]), ("pct_of_copy_bw", axes[1][c])):
            for i, impl in enumerate(impls):
                xs, ys, lo, hi = [], [], [], []
                for m, model in enumerate(models):
                    r = next((r for r in rows if r["model"] == model and r["optimizer"] == opt and r["impl"] == impl), None)
                    if r is None or r.get(metric) is None:
                        continue
                    xs.append(m - 0.4 + width * (i + 0.5))
                    ys.append(r[metric])
                    if metric == "ms_median":
                        lo.append(r["ms_median"] - r["ms_min"])
                        hi.append(r["ms_max"] - r["ms_median"])
                err = (lo, hi) if metric == "ms_median" and xs else None
                if xs:
                    ax.bar(xs, ys, width, color=color(impl), yerr=err, capsize=1.5, error_kw={"lw": 0.6})
            ax.set_xticks(range(len(models)))
            ax.set_xticklabels(models, rotation=20, ha="right", fontsize=8)
            if metric == "ms_median":
                ax.set_yscale("log")
                ax.set_ylabel("step time, ms (median; bars: min–max)")
                ax.set_title(labels.get(opt, opt))
            else:
                ax.set_ylabel("% of measured copy bandwidth")
            ax.grid(axis="y", alpha=0.3, which="both")
    handles = [Patch(color=color(impl), label=impl) for impl in impls]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97 if title else 1))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
