"""The numbers of a comparison report: per-run rows straight from each ``summary.json``, mean ±
std over the runs (seeds) of each group, and each group's difference from the baseline group.

Tables are lists of rows of already formatted strings, so the Markdown, the HTML and the W&B
report show the same text; ``format_value`` is the one formatter.
"""

from __future__ import annotations

import statistics
from typing import Any

from resnet_scale.tracking.runs import Run, config_value

# summary.json key, column title
RUN_COLUMNS = (
    ("final_accuracy", "final accuracy"),
    ("best_accuracy", "best accuracy"),
    ("final_test_loss", "final test loss"),
    ("wall_time_s", "wall time"),
    ("images_per_s", "images/s"),
    ("peak_memory_bytes", "peak memory"),
    ("num_parameters", "parameters"),
    ("weighted_layers", "weighted layers"),
    ("epochs", "epochs"),
)
GROUP_COLUMNS = (
    ("final_accuracy", "final accuracy"),
    ("best_accuracy", "best accuracy"),
    ("wall_time_s", "wall time"),
    ("images_per_s", "images/s"),
    ("num_parameters", "parameters"),
    ("weighted_layers", "weighted layers"),
)
OPTIONAL_KEYS = (("time_to_target_s", "time to target"),)  # shown when some run has them
# config keys worth stating when every run shares them (the honest-comparison line)
SETUP_KEYS = ("data.source", "model.depth", "train.batch_size", "optim.lr", "optim.schedule", "train.epochs",
              "memory.precision", "environment.gpu", "world_size")


def format_value(key: str, value: Any) -> str:
    """How a summary value is written in every table of a report."""
    if value is None:
        return "n/a (CPU)" if key == "peak_memory_bytes" else "n/a"
    if key.endswith("accuracy"):
        return f"{100 * value:.2f}%"
    if key.endswith("_s") and key != "images_per_s":
        return f"{value:.1f} s" if value < 600 else f"{value / 60:.1f} min"
    if key == "images_per_s":
        return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"
    if key == "peak_memory_bytes":
        return f"{value / 2**30:.2f} GiB"
    if key == "final_test_loss":
        return f"{value:.4f}"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}"
    return f"{int(value):,}"


def format_spread(key: str, value: float, mean: float) -> str:
    """A standard deviation in the unit and precision of its mean (percentage points for
    accuracies)."""
    if key.endswith("accuracy"):
        return f"{100 * value:.2f} pp"
    if key.endswith("_s") and key != "images_per_s" and mean >= 600:
        return f"{value / 60:.1f} min"
    if key == "images_per_s" and mean >= 100:
        return f"{value:,.0f}"
    return format_value(key, value)


def mean_std(values: list[Any]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation or None for one value, count) of the non-None values."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None, 0
    std = statistics.stdev(present) if len(present) > 1 else None
    return statistics.fmean(present), std, len(present)


def present_optional(runs: list[Run]) -> tuple[tuple[str, str], ...]:
    return tuple(col for col in OPTIONAL_KEYS if any(r.summary.get(col[0]) is not None for r in runs))


def group_stats(groups: dict[str, list[Run]], runs: list[Run]) -> list[dict[str, Any]]:
    """Per group: run names and ``{key: {"mean", "std", "n"}}`` for each group column."""
    keys = [k for k, _ in GROUP_COLUMNS + present_optional(runs)]
    out = []
    for name, members in groups.items():
        stats = {}
        for key in keys:
            mean, std, n = mean_std([r.summary.get(key) for r in members])
            stats[key] = {"mean": mean, "std": std, "n": n}
        out.append({"group": name, "runs": [r.name for r in members], "stats": stats})
    return out


def differences(stats: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Each other group against the baseline: Δ mean final accuracy, Δ mean wall time (and the
    wall-time ratio)."""
    base = next(s for s in stats if s["group"] == baseline)["stats"]
    rows = []
    for other in stats:
        if other["group"] == baseline:
            continue
        row: dict[str, Any] = {"group": other["group"], "baseline": baseline}
        for key in ("final_accuracy", "best_accuracy", "wall_time_s"):
            a, b = other["stats"][key]["mean"], base[key]["mean"]
            row[key] = None if a is None or b is None else a - b
        a, b = other["stats"]["wall_time_s"]["mean"], base["wall_time_s"]["mean"]
        row["wall_time_ratio"] = a / b if a is not None and b else None
        rows.append(row)
    return rows


def _signed(key: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if key.endswith("accuracy"):
        return f"{100 * value:+.2f} pp"
    return f"{value:+.1f} s" if abs(value) < 600 else f"{value / 60:+.1f} min"


def run_table(groups: dict[str, list[Run]], group_by: str, runs: list[Run]) -> list[list[str]]:
    columns = RUN_COLUMNS + present_optional(runs)
    rows = [["run", group_by, "seed", *[title for _, title in columns]]]
    for name, members in groups.items():
        for run in members:
            seed = run.config.get("train", {}).get("seed")
            rows.append([run.name, name, "n/a" if seed is None else str(seed),
                         *[format_value(key, run.summary.get(key)) for key, _ in columns]])
    return rows


def group_table(stats: list[dict[str, Any]], group_by: str, runs: list[Run]) -> list[list[str]]:
    columns = GROUP_COLUMNS + present_optional(runs)
    rows = [[group_by, "runs", *[f"{title} (mean ± std)" for _, title in columns]]]
    for group in stats:
        cells = []
        for key, _ in columns:
            s = group["stats"][key]
            text = format_value(key, s["mean"])
            cells.append(text if s["std"] is None else f"{text} ± {format_spread(key, s['std'], s['mean'])}")
        rows.append([group["group"], str(len(group["runs"])), *cells])
    return rows


def difference_table(diffs: list[dict[str, Any]], group_by: str) -> list[list[str]]:
    rows = [[group_by, "vs", "Δ mean final accuracy", "Δ mean best accuracy", "Δ mean wall time", "wall time ratio"]]
    for d in diffs:
        ratio = "n/a" if d["wall_time_ratio"] is None else f"×{d['wall_time_ratio']:.2f}"
        rows.append([d["group"], d["baseline"], _signed("final_accuracy", d["final_accuracy"]),
                     _signed("best_accuracy", d["best_accuracy"]), _signed("wall_time_s", d["wall_time_s"]), ratio])
    return rows


def setup_lines(runs: list[Run]) -> tuple[list[str], list[str]]:
    """(settings every run shares, config keys whose values differ between runs)."""
    shared = []
    for key in SETUP_KEYS:
        try:
            values = {repr(config_value(run, key)) for run in runs}
        except ValueError:
            continue
        if len(values) == 1:
            value = config_value(runs[0], key)
            shared.append(f"{key}={'CPU' if key == 'environment.gpu' and value is None else value}")
    differ = []
    sections = sorted({(s, k) for r in runs for s, d in r.config.items() if isinstance(d, dict) for k in d})
    for section, key in sections:
        if key in ("run_name", "output_dir"):
            continue
        if len({repr(r.config.get(section, {}).get(key)) for r in runs}) > 1:
            differ.append(f"{section}.{key}")
    return shared, differ
