"""``build_report``: compare finished runs from their own folders, like a paper's figure and
tables — pictures first (curves, throughput, memory), then mean ± std per group and the
difference between groups, then every run.

Writes into ``out``: ``report.md`` (each figure beside it as PNG, SVG and PDF), ``report.html``
(self-contained: the PNGs embedded as base64), ``report.json`` (the raw numbers) and each table
as ``table_<name>.csv`` and ``table_<name>.tex`` (a LaTeX ``tabular``). No network, no tracker: only
``config.json``, ``metrics.jsonl`` and ``summary.json`` of each run are read.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path
from typing import Any

from resnet_scale.tracking.export import to_csv, to_latex
from resnet_scale.tracking.runs import ReportError, expand_run_dirs, group_runs, group_title, load_run
from resnet_scale.tracking.tables import (
    difference_table,
    differences,
    effective_lines,
    group_stats,
    group_table,
    run_table,
    setup_lines,
    significance_lines,
)

log = logging.getLogger("resnet_scale")
DEFAULT_TITLE = "ResNet comparison"


def _order(groups: dict[str, list], baseline: str | None) -> dict[str, list]:
    if baseline is None:
        return groups
    if baseline not in groups:
        raise ReportError(f"--baseline {baseline!r} is not a group; the groups are {', '.join(groups)}.")
    return {baseline: groups[baseline], **{k: v for k, v in groups.items() if k != baseline}}


def build_report(run_dirs: list[Path], out: Path, *, group_by: str | None = None, title: str = DEFAULT_TITLE,
                 baseline: str | None = None, per_seed: bool = False) -> dict[str, Any]:
    """Build the comparison of ``run_dirs`` (run folders, or output folders holding them) in
    ``out``, runs grouped by their config less the seed (``group_by=None``) or by the config key
    ``group_by`` (``block``, ``depth``, ``model.block`` ...). The first group (or ``baseline``)
    is the one the others are compared with. ``per_seed`` draws each run's line beside its
    group's mean. Returns the numbers and the paths written."""
    from resnet_scale.tracking.plots import build_plots

    paths = expand_run_dirs(run_dirs, warn=log.warning)
    runs = [load_run(p) for p in paths]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ReportError(f"run names must be unique in one report; {', '.join(dup)} appear more than once.")
    groups = _order(group_runs(runs, group_by), baseline)
    group_by = group_title(runs, group_by)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportError(f"--out {out}: cannot create it ({err.strerror}).") from None

    plots, plot_notes = build_plots(groups, group_by, out, per_seed=per_seed)
    stats = group_stats(groups, runs)
    diffs = differences(stats, next(iter(groups)))
    shared, differ = setup_lines(runs)
    ran = effective_lines(groups)
    if len({line.split(": ", 1)[1] for line in ran}) == 1:  # every group ran the same: one setting
        shared, ran = [*shared, "ran " + ran[0].split(": ", 1)[1]], []
    tables = {
        "groups": group_table(stats, group_by, runs),
        "differences": difference_table(diffs, group_by),
        "runs": run_table(groups, group_by, runs),
    }
    result: dict[str, Any] = {
        "title": title,
        "group_by": group_by,
        "groups": stats,
        "differences": diffs,
        "runs": [{"name": r.name, "path": str(r.path), "group": g, "summary": r.summary}
                 for g, members in groups.items() for r in members],
        "shared": shared,
        "differ": differ,
        "ran": ran,
        "significance": significance_lines(diffs, group_by),
        "plots": plots,
        "plot_notes": plot_notes,
        "tables": tables,
    }
    files = {"markdown": out / "report.md", "html": out / "report.html", "json": out / "report.json"}
    files["markdown"].write_text(render_markdown(result))
    files["html"].write_text(render_html(result, out))
    titles = _section_titles(result)
    for key, rows in tables.items():
        files[f"{key}_csv"] = out / f"table_{key}.csv"
        files[f"{key}_csv"].write_text(to_csv(rows))
        files[f"{key}_tex"] = out / f"table_{key}.tex"
        files[f"{key}_tex"].write_text(to_latex(rows, caption=titles[key]))
    result["files"] = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def _intro(result: dict[str, Any]) -> list[str]:
    groups = ", ".join(f"{g['group']} ({len(g['runs'])})" for g in result["groups"])
    lines = [f"{len(result['runs'])} runs grouped by `{result['group_by']}`: {groups}."]
    if result["shared"]:
        lines.append("Shared by every run: " + ", ".join(f"`{s}`" for s in result["shared"]) + ".")
    if result["ran"]:
        lines.append("Steps and epochs each group ran: " + "; ".join(f"`{r}`" for r in result["ran"]) + ".")
    if result["differ"]:
        lines.append("Differs between runs: " + ", ".join(f"`{d}`" for d in result["differ"]) + ".")
    return lines


def _conclusions(result: dict[str, Any]) -> list[str]:
    """What the difference table says, in words (empty with one group)."""
    if not result["differences"]:
        return []
    method = ("Differences are Welch's: the 95 % confidence interval of the difference of means "
              "(t quantile at the Welch–Satterthwaite degrees of freedom) and the two-sided p-value "
              "of Welch's t-test; with fewer than 2 runs in a group (or no spread in either), the "
              "report cannot tell and gives neither.")
    return [method, *result["significance"]]


def _section_titles(result: dict[str, Any]) -> dict[str, str]:
    first = result["groups"][0]["group"]
    return {
        "groups": f"Summary by {result['group_by']} (mean ± sample std over runs; n runs)",
        "differences": f"Difference from {result['group_by']}={first}",
        "runs": "Every run (numbers from its summary.json)",
    }


def _md_table(rows: list[list[str]]) -> list[str]:
    esc = [[c.replace("|", "\\|") for c in row] for row in rows]
    return ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(esc[0]),
            *["| " + " | ".join(row) + " |" for row in esc[1:]]]


def render_markdown(result: dict[str, Any]) -> str:
    lines = [f"# {result['title']}", "", *_intro(result), "", "## Figures", ""]
    for plot in result["plots"].values():
        other = ", ".join(f"[{fmt.upper()}]({name})" for fmt, name in plot["files"].items() if fmt != "png")
        lines += [f"![{plot['title']}]({plot['file']})", "", f"{plot['title']}: {other}.", ""]
    lines += [f"- {note}" for note in result["plot_notes"]] + ([""] if result["plot_notes"] else [])
    titles = _section_titles(result)
    for key in ("groups", "differences", "runs"):
        if key == "differences" and len(result["tables"][key]) == 1:
            continue  # one group: nothing to compare with
        lines += [f"## {titles[key]}", "", *_md_table(result["tables"][key]), ""]
        if key == "differences":
            lines += [*(f"{line}\n" for line in _conclusions(result))]
    lines += ["Tables as CSV and LaTeX: " + ", ".join(f"`table_{k}.csv`/`.tex`" for k in result["tables"]) + ".", ""]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}
.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:1em}
figure{margin:0}figure img{width:100%}figcaption{font-size:.9em;color:#555}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}code{background:#f3f3f3;padding:0 .2em}"""


def _html_table(rows: list[list[str]], css_class: str) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _md_inline(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(result: dict[str, Any], folder: Path) -> str:
    """One HTML file with every figure embedded (it can be mailed or attached as it is)."""
    figs = []
    for plot in result["plots"].values():
        data = base64.b64encode((folder / plot["file"]).read_bytes()).decode("ascii")
        figs.append(f'<figure><img alt="{html.escape(plot["title"])}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(plot['title'])}</figcaption></figure>")
    parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(result['title'])}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(result['title'])}</h1>"]
    parts += [f"<p>{_md_inline(line)}</p>" for line in _intro(result)]
    parts += ["<h2>Figures</h2>", f'<div class="figs">{"".join(figs)}</div>']
    parts += [f"<p>{html.escape(note)}</p>" for note in result["plot_notes"]]
    titles = _section_titles(result)
    for key in ("groups", "differences", "runs"):
        if key == "differences" and len(result["tables"][key]) == 1:
            continue
        parts += [f"<h2>{html.escape(titles[key])}</h2>", _html_table(result["tables"][key], key)]
        if key == "differences":
            parts += [f"<p>{html.escape(line)}</p>" for line in _conclusions(result)]
    parts.append("</body></html>\n")
    return "\n".join(parts)
