"""The figures of a comparison report, drawn with matplotlib's Agg backend (no display needed):
test accuracy and train loss against epoch and against wall time (per group: the mean over its
runs with a ± 1 std band; each run's own line on request), and images/s and peak memory per
group (bars: mean ± 1 std, a dot per run). A chart no run has data for is left out.

Each ``plot_*`` function writes one figure as PNG, SVG and PDF and returns what it drew (the
group curves, point counts per run, bar values), so a test can check that a picture holds data.
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


FORMATS = ("png", "svg", "pdf")  # the PNG is embedded in the HTML; SVG and PDF for papers


def _save(fig, out: Path, stem: str) -> dict[str, str]:
    plt = _pyplot()
    fig.tight_layout()
    files = {}
    for fmt in FORMATS:
        fig.savefig(out / f"{stem}.{fmt}")
        files[fmt] = f"{stem}.{fmt}"
    plt.close(fig)
    return {"file": files["png"], "files": files}


def mean_curve(runs: list[Run], split: str, y: str, x: str) -> dict[str, list[float]]:
    """The group's curve: the runs' records aligned by optimizer step; at each step the mean of
    ``x``, the mean of ``y`` and its sample std over the runs that logged it (0 for one run)."""
    import statistics

    by_step: dict[int, list[tuple[float, float]]] = {}
    for run in runs:
        for r in run.split(split):
            if r.get(x) is not None and r.get(y) is not None and r.get("step") is not None:
                by_step.setdefault(r["step"], []).append((r[x], r[y]))
    curve: dict[str, list[float]] = {"step": [], "x": [], "mean": [], "std": [], "n": []}
    for step in sorted(by_step):
        xs, ys = zip(*by_step[step])
        curve["step"].append(step)
        curve["x"].append(statistics.fmean(xs))
        curve["mean"].append(statistics.fmean(ys))
        curve["std"].append(statistics.stdev(ys) if len(ys) > 1 else 0.0)
        curve["n"].append(len(ys))
    return curve


def plot_curve(groups: dict[str, list[Run]], group_by: str, out: Path, stem: str, split: str, y: str,
               x: str, title: str, ylabel: str, per_seed: bool = False) -> dict[str, Any] | None:
    """Per group, the mean of ``y`` against ``x`` over its runs with a ± 1 std band (``mean_curve``);
    with ``per_seed``, each run's own line too (thin). None when no run logged the values."""
    plt = _pyplot()
    colours = group_colours(groups)
    scale, xlabel = _time_scale(groups) if x == "time_s" else (1.0, "epoch")
    lines = {run.name: sum(1 for r in run.split(split) if r.get(x) is not None and r.get(y) is not None)
             for runs in groups.values() for run in runs}
    if not any(lines.values()):
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    curves, seed_lines = {}, []
    for group, runs in groups.items():
        curve = curves[group] = mean_curve(runs, split, y, x)
        if not curve["x"]:
            continue
        xs = [v / scale for v in curve["x"]]
        low = [m - s for m, s in zip(curve["mean"], curve["std"])]
        high = [m + s for m, s in zip(curve["mean"], curve["std"])]
        if y == "accuracy":  # a band, not a claim: no accuracy below 0 or above 100 %
            low, high = [max(v, 0.0) for v in low], [min(v, 1.0) for v in high]
        ax.fill_between(xs, low, high, color=colours[group], alpha=0.2, linewidth=0)
        ax.plot(xs, curve["mean"], "-", color=colours[group], label=f"{group} (n={len(runs)})", linewidth=1.8,
                marker="o" if len(xs) <= 12 else None, markersize=3)
        for i, run in enumerate(runs if per_seed else []):
            points = [(r[x] / scale, r[y]) for r in run.split(split) if r.get(x) is not None and r.get(y) is not None]
            if points:
                seed_lines.append(run.name)
                ax.plot(*zip(*points), _STYLES[1 + i % (len(_STYLES) - 1)], color=colours[group], linewidth=0.8,
                        alpha=0.6, gid=f"run-{run.name}")
    band = "mean ± 1 std over runs" + ("; thin lines: each run" if per_seed else "")
    ax.set(title=f"{title}\n({band})", xlabel=xlabel, ylabel=ylabel)
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    if x == "epoch":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if y == "accuracy":
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.legend(title=group_by, fontsize=8, title_fontsize=8)
    return {**_save(fig, out, stem), "title": f"{title} (mean ± 1 std over runs)", "lines": lines,
            "groups": curves, "seed_lines": seed_lines}


def plot_bars(groups: dict[str, list[Run]], group_by: str, out: Path, stem: str, key: str, title: str,
              ylabel: str, scale: float = 1.0) -> dict[str, Any] | None:
    """One bar per group: the mean of ``summary.json[key]`` (divided by ``scale``) with a ± 1 std
    error bar, each run's value as a dot, the group's label under it. None when no run has it."""
    import statistics

    values = {run.name: run.summary.get(key) for runs in groups.values() for run in runs}
    if all(v is None for v in values.values()):
        return None
    plt = _pyplot()
    colours = group_colours(groups)
    fig, ax = plt.subplots(figsize=(max(4.8, 1.2 * len(groups) + 2.5), 4.0), dpi=110)
    means = {}
    for i, (group, runs) in enumerate(groups.items()):
        present = [v / scale for v in (run.summary.get(key) for run in runs) if v is not None]
        if not present:
            ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8)
            means[group] = None
            continue
        mean = means[group] = statistics.fmean(present)
        std = statistics.stdev(present) if len(present) > 1 else 0.0
        ax.bar(i, mean, yerr=std, capsize=4, color=colours[group], width=0.6, ecolor="#333")
        ax.plot([i] * len(present), present, "o", color="#222", markersize=3, alpha=0.7)
        ax.text(i, mean + std, f"{mean:,.0f}\n" if abs(mean) >= 100 else f"{mean:.3g}\n", ha="center", va="bottom", fontsize=8)
    top = max((v / scale for v in values.values() if v is not None), default=1.0)
    ax.set_ylim(0, top * 1.25)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    ax.set(title=f"{title}\n(mean ± 1 std over runs; dots: each run)", xlabel=group_by, ylabel=ylabel)
    ax.title.set_fontsize(10)
    ax.grid(axis="y", alpha=0.3)
    return {**_save(fig, out, stem), "title": f"{title} (mean ± 1 std over runs)", "bars": values, "means": means}


BARS = (  # file stem, summary key, title, y label, scale, note when no run has the value
    ("images_per_s", "images_per_s", "Training throughput", "images/s", 1.0, "no run measured its throughput"),
    ("peak_memory", "peak_memory_bytes", "Peak GPU memory", "GiB", 2**30,
     "no run measured it (peak memory is measured on CUDA devices only; these runs ran on the CPU)"),
)


def build_plots(groups: dict[str, list[Run]], group_by: str, out: Path,
                per_seed: bool = False) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every figure of the report, in the order shown (curves, then throughput and memory), and a
    note for each chart left out because it would be empty."""
    plots, notes = {}, []
    for stem, split, y, x, title, ylabel in CURVES:
        plot = plot_curve(groups, group_by, out, stem, split, y, x, title, ylabel, per_seed=per_seed)
        if plot is None:
            notes.append(f"{title}: left out, no run logged {split} {y} against {x}.")
        else:
            plots[stem] = plot
    for stem, key, title, ylabel, scale, why in BARS:
        plot = plot_bars(groups, group_by, out, stem, key, title, ylabel, scale=scale)
        if plot is None:
            notes.append(f"{title}: left out, {why}.")
        else:
            plots[stem] = plot
    return plots, notes
