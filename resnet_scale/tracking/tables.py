"""The numbers of a comparison report: per-run rows straight from each ``summary.json``, mean ±
sample std and n over the runs (seeds) of each group, and each group's difference from the
baseline group with its 95 % interval and Welch t-test p-value (``stats.py``).

Tables are lists of rows of already formatted strings, so the Markdown, the HTML and the W&B
report show the same text; ``format_value`` is the one formatter.
"""

from __future__ import annotations

from typing import Any

from resnet_scale.tracking.runs import Run, config_value
from resnet_scale.tracking.stats import mean_std, welch

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
OPTIONAL_KEYS = (("time_to_target_s", "time to target"),  # shown when some run has them
                 ("peak_memory_bytes", "peak memory"))
#: The summary values each group is compared on (those of OPTIONAL_KEYS only when measured).
COMPARED = ("final_accuracy", "best_accuracy", "time_to_target_s", "wall_time_s", "images_per_s",
            "peak_memory_bytes")
TITLES = dict(RUN_COLUMNS + OPTIONAL_KEYS)
SIGNIFICANCE = 0.05
# config keys worth stating when every run shares them (the honest-comparison line)
SETUP_KEYS = ("data.source", "model.depth", "train.batch_size", "optim.lr", "optim.schedule",
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


def present_optional(runs: list[Run]) -> tuple[tuple[str, str], ...]:
    return tuple(col for col in OPTIONAL_KEYS if any(r.summary.get(col[0]) is not None for r in runs))


def group_stats(groups: dict[str, list[Run]], runs: list[Run]) -> list[dict[str, Any]]:
    """Per group: run names and ``{key: {"mean", "std", "n"}}`` (sample std, ddof=1) for each
    group column and compared value."""
    keys = [k for k, _ in GROUP_COLUMNS + present_optional(runs)]
    out = []
    for name, members in groups.items():
        stats = {}
        for key in keys:
            mean, std, n = mean_std([r.summary.get(key) for r in members])
            stats[key] = {"mean": mean, "std": std, "n": n}
        out.append({"group": name, "runs": [r.name for r in members], "stats": stats})
    return out


def compared_keys(stats: list[dict[str, Any]]) -> list[str]:
    return [k for k in COMPARED if k in stats[0]["stats"]]


def differences(stats: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Each other group against the baseline: for each compared value, Welch's difference of
    means with its 95 % interval and two-sided p-value (``stats.welch``), and the wall-time
    ratio."""
    base = next(s for s in stats if s["group"] == baseline)["stats"]
    rows = []
    for other in stats:
        if other["group"] == baseline:
            continue
        row: dict[str, Any] = {"group": other["group"], "baseline": baseline, "compared": {}}
        for key in compared_keys(stats):
            a, b = other["stats"][key], base[key]
            row["compared"][key] = welch(a["mean"], a["std"], a["n"], b["mean"], b["std"], b["n"])
            row[key] = row["compared"][key]["diff"]
        a, b = other["stats"]["wall_time_s"]["mean"], base["wall_time_s"]["mean"]
        row["wall_time_ratio"] = a / b if a is not None and b else None
        rows.append(row)
    return rows


def _signed(key: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if key.endswith("accuracy"):
        return f"{100 * value:+.2f} pp"
    if key == "peak_memory_bytes":
        return f"{value / 2**30:+.2f} GiB"
    if key == "images_per_s":
        return f"{value:+,.1f}" if abs(value) < 100 else f"{value:+,.0f}"
    if abs(value) < 10:
        return f"{value:+.2f} s"
    return f"{value:+.1f} s" if abs(value) < 600 else f"{value / 60:+.1f} min"


def format_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def run_table(groups: dict[str, list[Run]], group_by: str, runs: list[Run]) -> list[list[str]]:
    columns = RUN_COLUMNS + tuple(c for c in present_optional(runs) if c not in RUN_COLUMNS) + (("steps", "steps"),)
    rows = [["run", group_by, "seed", *[title for _, title in columns]]]
    for name, members in groups.items():
        for run in members:
            seed = run.config.get("train", {}).get("seed")
            rows.append([run.name, name, "n/a" if seed is None else str(seed),
                         *[format_value(key, run.summary.get(key)) for key, _ in columns]])
    return rows


def group_table(stats: list[dict[str, Any]], group_by: str, runs: list[Run]) -> list[list[str]]:
    """One row per group: n (runs), then mean ± std of each value; a value measured by fewer
    runs than the group has says its own n."""
    columns = GROUP_COLUMNS + present_optional(runs)
    rows = [[group_by, "n", *[f"{title} (mean ± std)" for _, title in columns]]]
    for group in stats:
        cells = []
        for key, _ in columns:
            s = group["stats"][key]
            text = format_value(key, s["mean"])
            text = text if s["std"] is None else f"{text} ± {format_spread(key, s['std'], s['mean'])}"
            cells.append(text if s["n"] in (0, len(group["runs"])) else f"{text} (n={s['n']})")
        rows.append([group["group"], str(len(group["runs"])), *cells])
    return rows


def difference_table(diffs: list[dict[str, Any]], group_by: str) -> list[list[str]]:
    """One row per (group, value): Δ mean against the baseline, its 95 % interval (Welch), the
    two-sided p-value, and whether it is significant at 0.05 — or why that cannot be told."""
    rows = [[group_by, "vs", "value", "Δ mean", "95 % CI (Welch)", "p (Welch t-test)", "significant"]]
    for d in diffs:
        for key, w in d["compared"].items():
            if w["note"]:
                ci, sig = w["note"], "cannot tell"
            else:
                ci = f"[{_signed(key, w['low'])}, {_signed(key, w['high'])}]"
                sig = "yes" if w["p"] < SIGNIFICANCE else "no"
            rows.append([d["group"], d["baseline"], TITLES[key], _signed(key, w["diff"]), ci, format_p(w["p"]), sig])
    return rows


def significance_lines(diffs: list[dict[str, Any]], group_by: str) -> list[str]:
    """Plain sentences: which differences are significant at 0.05, which are not, which cannot be told."""
    lines = []
    for d in diffs:
        sig, nsig, unknown = [], [], []
        for key, w in d["compared"].items():
            if w["note"]:
                unknown.append(f"{TITLES[key]} ({w['note']})")
            elif w["p"] < SIGNIFICANCE:
                sig.append(f"{TITLES[key]} ({_signed(key, w['diff'])}, p={format_p(w['p'])})")
            else:
                nsig.append(f"{TITLES[key]} (p={format_p(w['p'])})")
        head = f"{d['group']} vs {d['baseline']}" if "=" in d["group"] else f"{group_by}={d['group']} vs {d['baseline']}"
        lines.append(f"{head}: significant at 0.05: {', '.join(sig) or 'none'}."
                     + (f" Not significant: {', '.join(nsig)}." if nsig else "")
                     + (f" Too few runs to tell: {', '.join(unknown)}." if unknown else ""))
    return lines


def effective_lines(groups: dict[str, list[Run]]) -> list[str]:
    """What each group actually ran: optimizer steps and epochs (from summary.json and the last
    metrics.jsonl record), which may be fewer than configured (``--max-steps``, a stop)."""
    lines = []
    for name, members in groups.items():
        steps = sorted({r.summary.get("steps") for r in members if r.summary.get("steps") is not None})
        epochs = sorted({round(max((rec.get("epoch") or 0 for rec in r.records), default=0), 2) for r in members})
        lines.append(f"{name}: {'/'.join(map(str, steps)) or 'n/a'} steps, "
                     f"{'/'.join(f'{e:g}' for e in epochs) or 'n/a'} epochs")
    return lines


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
