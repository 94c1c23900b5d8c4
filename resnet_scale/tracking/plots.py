"""The figures of a comparison report, drawn with matplotlib's Agg backend (no display needed):
test accuracy and train loss against epoch and against wall time (one line per run, one colour
per group), and images/s and peak memory per run (bars).

Each ``plot_*`` function writes one PNG and returns what it drew (lines and their point counts,
or bar values), so a test can check that a picture holds data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resnet_scale.tracking.runs import Run

_STYLES = ("-", "--", ":", "-.")
CURVES = (  # file stem, split, y key, x key, title, y label
    ("test_accuracy_vs_epoch", "test", "accuracy", "epoch", "Test accuracy vs epoch", "test accuracy"),
    ("test_accuracy_vs_time", "test", "accuracy", "time_s", "Test accuracy vs wall time", "test accuracy"),
    ("train_loss_vs_epoch", "train", "loss", "epoch", "Train loss vs epoch", "train loss"),
    ("train_loss_vs_time", "train", "loss", "time_s", "Train loss vs wall time", "train loss"),
)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        from resnet_scale.tracking.runs import ReportError

        raise ReportError("reports need matplotlib: pip install 'resnet-scale[reports]'.") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def group_colours(groups: dict[str, list[Run]]) -> dict[str, Any]:
    plt = _pyplot()
    palette = plt.get_cmap("tab10").colors
    return {name: palette[i % len(palette)] for i, name in enumerate(groups)}


def _time_scale(groups: dict[str, list[Run]]) -> tuple[float, str]:
    longest = max((r.get("time_s") or 0 for runs in groups.values() for run in runs for r in run.records), default=0)
    if longest > 2 * 3600:
        return 3600.0, "wall time (h)"
    if longest > 600:
        return 60.0, "wall time (min)"
    return 1.0, "wall time (s)"


def plot_curve(groups: dict[str, list[Run]], group_by: str, out: Path, stem: str, split: str, y: str,
               x: str, title: str, ylabel: str) -> dict[str, Any]:
    """One line per run of ``y`` against ``x`` over the ``split`` records of ``metrics.jsonl``."""
    plt = _pyplot()
    colours = group_colours(groups)
    scale, xlabel = _time_scale(groups) if x == "time_s" else (1.0, "epoch")
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    lines: dict[str, int] = {}
    for group, runs in groups.items():
        for i, run in enumerate(runs):
            points = [(r[x] / scale, r[y]) for r in run.split(split) if r.get(x) is not None and r.get(y) is not None]
            lines[run.name] = len(points)
            if not points:
                continue
            xs, ys = zip(*points)
            label = f"{group} (n={len(runs)})" if i == 0 else None
            ax.plot(xs, ys, _STYLES[i % len(_STYLES)], color=colours[group], label=label, linewidth=1.6,
                    marker="o" if len(points) <= 12 else None, markersize=3)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    if x == "epoch":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if y == "accuracy":
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    if any(lines.values()):
        ax.legend(title=group_by, fontsize=8, title_fontsize=8)
    fig.tight_layout()
    path = out / f"{stem}.png"
    fig.savefig(path)
    plt.close(fig)
    return {"file": path.name, "title": title, "lines": lines}


def plot_bars(groups: dict[str, list[Run]], group_by: str, out: Path, stem: str, key: str, title: str,
              ylabel: str, scale: float = 1.0, missing: str = "n/a", none_note: str = "") -> dict[str, Any]:
    """One bar per run of ``summary.json[key]`` (divided by ``scale``), coloured by group; runs
    without a value get the text ``missing`` instead of a bar."""
    plt = _pyplot()
    colours = group_colours(groups)
    runs = [(group, run) for group, members in groups.items() for run in members]
    values = {run.name: run.summary.get(key) for _, run in runs}
    fig, ax = plt.subplots(figsize=(max(6.4, 0.7 * len(runs) + 2), 4.0), dpi=110)
    heights = [(values[run.name] or 0) / scale for _, run in runs]
    bars = ax.bar(range(len(runs)), heights, color=[colours[g] for g, _ in runs])
    top = max(heights, default=0) or 1.0
    for bar, (_, run) in zip(bars, runs):
        value = values[run.name]
        text = missing if value is None else f"{value / scale:,.3g}"
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01 * top, text,
                ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, top * 1.18)  # room for the value labels and the legend
    if all(v is None for v in values.values()):
        ax.set_ylim(0, 1)
        ax.text(0.5, 0.6, none_note or f"{missing}: no run measured {key}", transform=ax.transAxes, ha="center")
    ax.set_xticks(range(len(runs)), [run.name for _, run in runs], rotation=30, ha="right", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[g]) for g in groups]
    ax.legend(handles, list(groups), title=group_by, fontsize=8, title_fontsize=8)
    ax.set(title=title, ylabel=ylabel)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / f"{stem}.png"
    fig.savefig(path)
    plt.close(fig)
    return {"file": path.name, "title": title, "bars": values}


def build_plots(groups: dict[str, list[Run]], group_by: str, out: Path) -> dict[str, dict[str, Any]]:
    """Every figure of the report, in the order shown: curves, then throughput and memory."""
    plots = {stem: plot_curve(groups, group_by, out, stem, split, y, x, title, ylabel)
             for stem, split, y, x, title, ylabel in CURVES}
    plots["images_per_s"] = plot_bars(groups, group_by, out, "images_per_s", "images_per_s",
                                      "Training throughput per run", "images/s")
    plots["peak_memory"] = plot_bars(groups, group_by, out, "peak_memory", "peak_memory_bytes",
                                     "Peak GPU memory per run", "GiB", scale=2**30, missing="n/a (CPU)",
                                     none_note="n/a (CPU): peak memory is measured on CUDA devices only")
    return plots
