"""The comparison as a W&B Report (``wandb-workspaces``): the same curves as live panels over the
runs' W&B history, a runs table, and the local summary tables.

``build_wandb_report`` only builds the ``Report`` object (no network). ``publish_wandb_report``
saves it and returns its URL; it needs an API key, the network, and the runs uploaded first
(``wandb sync`` for runs that trained offline), and says so instead of failing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resnet_scale.tracking.report import DEFAULT_TITLE, _md_table
from resnet_scale.tracking.runs import (
    ReportError,
    Run,
    config_value,
    expand_run_dirs,
    group_runs,
    group_title,
    load_run,
    varying_keys,
)
from resnet_scale.tracking.tables import difference_table, differences, group_stats, group_table
from resnet_scale.tracking.trackers import TrackingError, has_wandb_credentials, wandb_server_reachable

# title, y metric, x metric: the keys the wandb tracker logs (trackers.tracker_metrics)
LINE_PANELS = (
    ("Test accuracy vs epoch", "test/accuracy", "epoch"),
    ("Test accuracy vs wall time (s)", "test/accuracy", "time_s"),
    ("Train loss vs epoch", "train/loss", "epoch"),
    ("Train loss vs wall time (s)", "train/loss", "time_s"),
)
BAR_PANELS = (("Images/s", "images_per_s"), ("Peak memory (bytes)", "peak_memory_bytes"))
TABLE_COLUMNS = ("summary:final_accuracy", "summary:best_accuracy", "summary:wall_time_s",
                 "summary:images_per_s", "summary:num_parameters", "summary:weighted_layers")


def _wr():
    try:
        import wandb_workspaces.reports.v2 as wr
        from wandb_workspaces import expr
    except ImportError:
        raise TrackingError("--wandb-report needs wandb-workspaces: pip install 'resnet-scale[reports]'.") from None
    return wr, expr


def wandb_config_path(run: Run, key: str) -> str:
    """The W&B config path of a report ``--group-by`` key (the tracker puts the config sections
    at the top level, so ``block`` is ``model.block``)."""
    if "." in key:
        return key
    for section, values in run.config.items():
        if isinstance(values, dict) and key in values:
            return f"{section}.{key}"
    return key


def runs_group(runs: list[Run]) -> str | None:
    """The W&B group every run shares (``--run-group``, saved in their configs), if any."""
    groups = set()
    for run in runs:
        try:
            groups.add(config_value(run, "run_group"))
        except ReportError:
            return None
    return groups.pop() if len(groups) == 1 else None


def build_wandb_report(run_dirs: list[Path], *, project: str, entity: str | None = None,
                       group: str | None = None, title: str = DEFAULT_TITLE, group_by: str | None = None,
                       baseline: str | None = None):
    """A ``wandb_workspaces.reports.v2.Report`` comparing these runs, built and not saved. Its
    run set is filtered to the W&B ``group`` (default: the runs' shared ``--run-group``), else to
    the runs' names, and grouped by ``group_by``."""
    wr, expr = _wr()
    runs = [load_run(p) for p in expand_run_dirs(run_dirs)]
    group = group or runs_group(runs)
    names = [r.name for r in runs]
    filters = expr.And(expr.Metric("Group") == group if group else expr.Metric("Name").isin(names))
    config_keys = [wandb_config_path(runs[0], group_by)] if group_by else varying_keys(runs)
    runset = wr.Runset(entity=entity or "", project=project, name=group or "runs", filters=filters,
                       groupby=[f"config.{k}" for k in config_keys], pinned_columns=list(TABLE_COLUMNS))
    panels: list[Any] = []
    for i, (panel_title, y, x) in enumerate(LINE_PANELS):
        panels.append(wr.LinePlot(title=panel_title, x=x, y=[y], title_x=x, title_y=y,
                                  layout=wr.Layout(x=12 * (i % 2), y=8 * (i // 2), w=12, h=8)))
    for i, (panel_title, metric) in enumerate(BAR_PANELS):
        panels.append(wr.BarPlot(title=panel_title, metrics=[metric], orientation="v",
                                 layout=wr.Layout(x=12 * i, y=16, w=12, h=8)))
    panels.append(wr.RunComparer(diff_only="split", layout=wr.Layout(x=0, y=24, w=24, h=10)))

    groups = group_runs(runs, group_by)
    group_by = group_title(runs, group_by)
    if baseline in groups:
        groups = {baseline: groups[baseline], **{k: v for k, v in groups.items() if k != baseline}}
    stats = group_stats(groups, runs)
    scope = f"W&B group `{group}`" if group else f"runs {', '.join(names)}"
    blocks: list[Any] = [
        wr.P(f"{len(runs)} runs ({scope}), grouped by {group_by}: "
             + ", ".join(f"{g} ({len(m)})" for g, m in groups.items()) + "."),
        wr.PanelGrid(runsets=[runset], panels=panels),
        wr.H2(f"Summary by {group_by} (mean ± std over runs, from each run's summary.json)"),
        wr.MarkdownBlock("\n".join(_md_table(group_table(stats, group_by, runs)))),
    ]
    if len(stats) > 1:
        first = next(iter(groups))
        blocks += [wr.H2(f"Difference from {group_by}={first}"),
                   wr.MarkdownBlock("\n".join(_md_table(difference_table(differences(stats, first), group_by))))]
    return wr.Report(project=project, entity=entity or "", title=title,
                     description=f"resnet-scale comparison by {group_by}", blocks=blocks, width="fluid")


def publish_wandb_report(report, *, run_dirs: list[Path] | None = None) -> str:
    """Save the report to W&B and return its URL. Without an API key or network, raise a
    TrackingError that says what is needed (and the ``wandb sync`` commands for offline runs)."""
    offline = []
    for path in run_dirs or []:
        try:
            paths = expand_run_dirs([path])
        except ReportError:
            continue
        offline += [p for run in paths for p in sorted((run / "wandb").glob("offline-run-*"))]
    sync = "".join(f"\n  wandb sync {p}" for p in offline)
    needs = ("Publishing a W&B report needs: an API key (set WANDB_API_KEY or run `wandb login`), network "
             "access to the W&B server, and the runs uploaded first"
             + (f":{sync}" if sync else " (`wandb sync <run_dir>/wandb/offline-run-*` for runs trained offline)."))
    if not has_wandb_credentials():
        raise TrackingError(f"no W&B API key found. {needs}")
    unreachable = wandb_server_reachable()
    if unreachable:
        raise TrackingError(f"{unreachable}. {needs}")
    try:
        report.save()
    except Exception as err:  # noqa: BLE001 - the server's own message, with what to check
        raise TrackingError(f"saving the W&B report failed ({type(err).__name__}: {err}). {needs}") from None
    return report.url
