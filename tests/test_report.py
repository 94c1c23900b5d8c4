"""``resnet-scale report`` on real runs: two tiny digits runs per block (plain, basic) trained once
through the real CLI, then the report's plots, tables, files, the W&B Report object, the CLI's
errors. The recipes (launch/experiments/) are tested in test_recipes.py.
"""

import html.parser
import json
import shutil
import statistics
import sys
from pathlib import Path

import pytest

from resnet_scale.tracking.report import build_report
from resnet_scale.tracking.runs import ReportError, load_run
from resnet_scale.tracking.tables import format_spread, format_value
from resnet_scale.tracking.trackers import TrackingError

sys.path.insert(0, str(Path(__file__).parent))
from test_report_stats import t_mass  # noqa: E402
from test_train_e2e import run_cli  # noqa: E402

BLOCKS, SEEDS = ("plain", "basic"), (0, 1, 2)
RUN_KEYS = ("final_accuracy", "best_accuracy", "final_test_loss", "wall_time_s", "images_per_s",
            "peak_memory_bytes", "num_parameters", "weighted_layers", "epochs")
GROUP_KEYS = ("final_accuracy", "best_accuracy", "wall_time_s", "images_per_s", "num_parameters", "weighted_layers")

# The real CLI, four times (children of the tests' CLI server: tests/_cli_server.py); 8-px digits
# and one thread keep it to about a second per run, even on a busy 2-core machine.
def _train_runs(out: Path) -> None:

    for seed in SEEDS:
        for block in BLOCKS:
            proc = run_cli("--data", "digits", "--block", block, "--depth", "8", "--image-size", "8", "--batch-size",
                           "128", "--lr", "0.1", "--epochs", "2", "--seed", seed, "--log-every", "3", "--device", "cpu",
                           "--output-dir", out, "--run-name", f"{block}-s{seed}", "--tracker", "none", timeout=300)
            assert proc.returncode == 0, (block, seed, proc.stderr[-3000:])


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    _train_runs(out)
    return out


@pytest.fixture(scope="module")
def report(runs_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return build_report([runs_root], out, group_by="block", title="plain vs basic", baseline="plain"), out


def summaries(runs_root):
    return {p.name: json.loads((p / "summary.json").read_text()) for p in sorted(runs_root.iterdir())}


class Tables(html.parser.HTMLParser):
    """Cell texts of every <table>, by its class."""

    def __init__(self):
        super().__init__()
        self.tables, self._cls, self._cell = {}, None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._cls = dict(attrs)["class"]
            self.tables[self._cls] = []
        elif tag == "tr":
            self.tables[self._cls].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[self._cls][-1].append(self._cell)
            self._cell = None


def test_report_has_every_run_and_pictures_with_data(report, runs_root):
    result, out = report
    assert {r["name"] for r in result["runs"]} == {f"{b}-s{s}" for b in BLOCKS for s in SEEDS}
    assert [g["group"] for g in result["groups"]] == ["plain", "basic"]
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.image import imread

    colours = colormaps["tab10"].colors[:2]  # plain, basic
    for name, plot in result["plots"].items():
        image = imread(out / plot["file"])[..., :3]
        assert int((image.min(axis=-1) < 0.85).sum()) > 5000, name  # axes, text: not a blank picture
        # The data itself: enough pixels in each group's colour (lines or bars).
        drawn = [int((np.abs(image - np.array(c)).max(axis=-1) < 0.08).sum()) for c in colours]
        assert min(drawn) > 500, (name, drawn)  # a legend entry alone is ~100-250 pixels
        if "lines" in plot:  # every run adds at least one point per epoch to its group's curve
            assert set(plot["lines"]) == {r["name"] for r in result["runs"]}
            assert min(plot["lines"].values()) >= 2, plot
        for fmt in ("svg", "pdf"):  # beside the PNG, for papers
            assert (out / plot["files"][fmt]).read_bytes()[:5] == (b"%PDF-" if fmt == "pdf" else b"<?xml"), name
    # CPU: no run measured peak memory, so its chart is left out and the report says why
    assert "peak_memory" not in result["plots"] and not (out / "peak_memory.png").exists()
    assert any(n.startswith("Peak GPU memory: left out") for n in result["plot_notes"])
    assert all(v > 0 for v in result["plots"]["images_per_s"]["bars"].values())

    md = (out / "report.md").read_text()
    assert md.index("![") < md.index("## Summary by block")  # pictures first, tables after
    for plot in result["plots"].values():
        assert f"]({plot['file']})" in md
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(result["plots"]) == 5
    assert "Peak GPU memory: left out" in md and "Peak GPU memory: left out" in page
    assert "src=\"http" not in page and "<script" not in page  # self-contained
    assert json.loads((out / "report.json").read_text())["group_by"] == "block"


def test_tables_hold_the_numbers_of_each_summary_json(report, runs_root):
    result, out = report
    by_name = summaries(runs_root)
    for run in result["runs"]:
        assert run["summary"] == by_name[run["name"]]  # report.json: exact numbers

    parser = Tables()
    parser.feed((out / "report.html").read_text())
    runs = parser.tables["runs"]
    header = runs[0]
    for row in runs[1:]:
        summary = by_name[row[0]]
        for key, title in zip(RUN_KEYS, header[3:]):
            assert row[header.index(title)] == format_value(key, summary[key]), (row[0], key)
    assert {row[0] for row in runs[1:]} == set(by_name)
    assert "n/a (CPU)" in runs[1]

    groups = parser.tables["groups"]
    assert [row[0] for row in groups[1:]] == ["plain", "basic"]
    for row in groups[1:]:
        members = [s for name, s in by_name.items() if name.startswith(row[0] + "-")]
        assert row[1] == str(len(SEEDS))
        for key, cell in zip(GROUP_KEYS, row[2:]):
            values = [m[key] for m in members]
            mean, _, std = cell.partition(" ± ")
            assert mean == format_value(key, statistics.fmean(values)), (row[0], key)
            assert std == format_spread(key, statistics.stdev(values), statistics.fmean(values)), (row[0], key)
            if key.endswith("accuracy"):
                assert std == f"{100 * statistics.stdev(values):.2f} pp"

    diff = parser.tables["differences"]
    assert diff[1][:3] == ["basic", "plain", "final accuracy"]
    mean = {b: statistics.fmean(s["final_accuracy"] for n, s in by_name.items() if n.startswith(b)) for b in BLOCKS}
    assert diff[1][3] == f"{100 * (mean['basic'] - mean['plain']):+.2f} pp"


def test_group_by_dotted_resolved_and_single_group(runs_root, tmp_path):
    dotted = build_report([runs_root], tmp_path / "a", group_by="model.block")
    assert sorted(g["group"] for g in dotted["groups"]) == ["basic", "plain"]
    single = build_report([runs_root / "plain-s0", runs_root / "basic-s1"], tmp_path / "b", group_by="precision")
    assert [g["group"] for g in single["groups"]] == ["fp32"]  # unset in the config: the resolved value
    assert single["differences"] == [] and "Difference from" not in (tmp_path / "b" / "report.md").read_text()
    # --activation-compression unset (null), absent (a run saved before it existed) or "none": one setting
    spellings = {"plain-s0": None, "plain-s1": "absent", "plain-s2": "none"}
    for name, value in spellings.items():
        shutil.copytree(runs_root / name, tmp_path / "c" / name)
        payload = json.loads((tmp_path / "c" / name / "config.json").read_text())
        payload["config"]["memory"].pop("activation_compression", None)
        if value != "absent":
            payload["config"]["memory"]["activation_compression"] = value
        (tmp_path / "c" / name / "config.json").write_text(json.dumps(payload))
    same = build_report([tmp_path / "c"], tmp_path / "d")
    assert len(same["groups"]) == 1 and not any("activation_compression" in d for d in same["differ"])


def test_bad_input_names_the_folder(runs_root, tmp_path, capsys):
    from resnet_scale.cli.report import main

    stray = tmp_path / "not-a-run"
    stray.mkdir()
    (stray / "notes.txt").write_text("hello")
    with pytest.raises(ReportError, match="not-a-run"):
        build_report([stray], tmp_path / "out")
    with pytest.raises(ReportError, match="no such config key"):
        build_report([runs_root], tmp_path / "out", group_by="colour")
    with pytest.raises(ReportError, match="--baseline 'resnet'"):
        build_report([runs_root], tmp_path / "out", baseline="resnet")
    unfinished = tmp_path / "crashed"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((runs_root / "plain-s0" / "config.json").read_text())
    with pytest.raises(ReportError, match="unfinished or crashed run: it has no metrics.jsonl, summary.json"):
        load_run(unfinished)

    assert main([str(stray), "--out", str(tmp_path / "out")]) == 2
    assert "not-a-run" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2


def test_cli_report_and_offline_wandb_report_explains_instead_of_failing(runs_root, tmp_path, capsys, monkeypatch):
    from resnet_scale.cli.report import main

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert main([str(runs_root), "--out", str(tmp_path / "rep"), "--wandb-report", "--wandb-project", "p"]) == 0
    captured = capsys.readouterr()
    assert "report of 6 runs by block" in captured.out and (tmp_path / "rep" / "report.html").is_file()
    assert "W&B report not published" in captured.err and "WANDB_API_KEY" in captured.err
    assert "wandb sync" in captured.err


def test_wandb_report_object_has_the_panels_and_filters(runs_root, monkeypatch, tmp_path):
    import wandb_workspaces.reports.v2 as wr

    from resnet_scale.tracking.wandb_report import build_wandb_report, publish_wandb_report

    report = build_wandb_report([runs_root], project="resnet-scale", entity="me", group="r18-plain-vs-basic",
                                title="plain vs basic", baseline="plain")
    assert isinstance(report, wr.Report) and report.title == "plain vs basic" and report.entity == "me"
    grid = next(b for b in report.blocks if isinstance(b, wr.PanelGrid))
    (runset,) = grid.runsets
    assert runset.project == "resnet-scale" and "Group" in str(runset.filters)
    assert "r18-plain-vs-basic" in str(runset.filters)
    assert runset.groupby == ["config.model.block"]
    lines = {(p.x, tuple(p.y)) for p in grid.panels if isinstance(p, wr.LinePlot)}
    assert lines == {("epoch", ("test/accuracy",)), ("time_s", ("test/accuracy",)),
                     ("epoch", ("train/loss",)), ("time_s", ("train/loss",))}
    assert sum(isinstance(p, wr.RunComparer) for p in grid.panels) == 1
    assert {tuple(p.metrics) for p in grid.panels if isinstance(p, wr.BarPlot)} == {("images_per_s",),
                                                                                    ("peak_memory_bytes",)}
    tables = [b.text for b in report.blocks if isinstance(b, wr.MarkdownBlock)]
    assert any("| plain | 3 |" in t and "| basic | 3 |" in t and "±" in t for t in tables)

    by_name = build_wandb_report([runs_root / "plain-s0", runs_root / "basic-s0"], project="p")
    filters = str(next(b for b in by_name.blocks if isinstance(b, wr.PanelGrid)).runsets[0].filters)
    assert "Name" in filters and "plain-s0" in filters and "basic-s0" in filters

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(TrackingError, match="WANDB_API_KEY.*wandb sync"):
        publish_wandb_report(report)


def test_groups_and_welch_interval_match_the_runs_files_and_a_hand_computation(report, runs_root):
    result, out = report
    by_name = summaries(runs_root)
    members = {b: [s for n, s in by_name.items() if n.startswith(b + "-")] for b in BLOCKS}
    for group in result["groups"]:  # report.json: mean, sample std (ddof=1) and n from each summary.json
        for key, s in group["stats"].items():
            values = [m[key] for m in members[group["group"]] if m[key] is not None]
            assert s["n"] == len(values) == (len(SEEDS) if key != "peak_memory_bytes" else 0), key
            if values:
                assert s["mean"] == pytest.approx(statistics.fmean(values), rel=1e-12), key
                assert s["std"] == pytest.approx(statistics.stdev(values), rel=1e-12), key

    # Welch by hand for final accuracy, basic - plain
    a = [m["final_accuracy"] for m in members["basic"]]
    b = [m["final_accuracy"] for m in members["plain"]]
    v1, v2 = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = (v1 + v2) ** 0.5
    df = (v1 + v2) ** 2 / (v1 ** 2 / (len(a) - 1) + v2 ** 2 / (len(b) - 1))
    diff = statistics.fmean(a) - statistics.fmean(b)
    w = result["differences"][0]["compared"]["final_accuracy"]
    assert w["note"] is None and w["diff"] == pytest.approx(diff, rel=1e-12)
    assert w["df"] == pytest.approx(df, rel=1e-12) and w["t"] == pytest.approx(diff / se, rel=1e-12)
    q = (w["high"] - w["low"]) / 2 / se  # the t quantile the interval used: 95 % of the mass within ±q
    assert w["low"] + q * se == pytest.approx(diff, rel=1e-9)
    assert t_mass(q, df) == pytest.approx(0.475, abs=1e-6)
    assert w["p"] == pytest.approx(1 - 2 * t_mass(abs(diff / se), df), abs=1e-6)

    md = (out / "report.md").read_text()
    verdict = "yes" if w["p"] < 0.05 else "no"
    row = next(r for r in result["tables"]["differences"] if r[2] == "final accuracy")
    assert row[4] == f"[{100 * w['low']:+.2f} pp, {100 * w['high']:+.2f} pp]" and row[6] == verdict
    sig_line = next(line for line in md.splitlines() if line.startswith("block=basic vs plain: significant at 0.05:"))
    assert ("final accuracy (" in sig_line.split("Not significant")[0]) == (w["p"] < 0.05)

    # the same tables as CSV and LaTeX
    import csv

    for key, rows in result["tables"].items():
        assert list(csv.reader((out / f"table_{key}.csv").open())) == rows, key
        tex = (out / f"table_{key}.tex").read_text()
        assert "\\begin{tabular}{l" in tex and "\\end{tabular}" in tex
        assert tex.count("\\\\\n") == len(rows), key  # one LaTeX row per table row
        if key == "groups":  # LaTeX's own symbols, not raw unicode
            assert "±" not in tex and "$\\pm$" in tex


def test_too_few_runs_to_tell_and_the_steps_each_group_ran(runs_root, tmp_path):
    """A 4th basic run stopped by --max-steps: its own group of one (labelled by the setting that
    differs), no interval or p-value, and the steps and epochs each group really ran."""
    proc = run_cli("--data", "digits", "--block", "basic", "--depth", "8", "--image-size", "8", "--batch-size",
                   "128", "--lr", "0.1", "--epochs", "2", "--max-steps", "5", "--seed", "0", "--device", "cpu",
                   "--output-dir", tmp_path / "runs", "--run-name", "short", "--tracker", "none", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    basic = [runs_root / f"basic-s{s}" for s in SEEDS]
    result = build_report([*basic, tmp_path / "runs" / "short"], tmp_path / "rep")
    assert result["group_by"] == "max_steps"
    assert {g["group"]: len(g["runs"]) for g in result["groups"]} == {"max_steps=None": 3, "max_steps=5": 1}
    (d,) = result["differences"]
    for w in d["compared"].values():
        assert w["p"] is None and w["low"] is None and w["note"].startswith("n too small to tell (n=1 vs 3")
    assert all(row[5] == "n/a" and row[6] == "cannot tell" for row in result["tables"]["differences"][1:])
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Too few runs to tell: final accuracy (n too small to tell" in md

    short = json.loads((tmp_path / "runs" / "short" / "summary.json").read_text())
    full = {json.loads((p / "summary.json").read_text())["steps"] for p in basic}
    assert short["steps"] == 5 and len(full) == 1 and full != {5}
    epochs = {p.name: max(json.loads(line)["epoch"] for line in (p / "metrics.jsonl").read_text().splitlines())
              for p in [*basic, tmp_path / "runs" / "short"]}
    assert result["ran"] == [f"max_steps=None: {full.pop()} steps, {epochs['basic-s0']:g} epochs",
                             f"max_steps=5: 5 steps, {round(epochs['short'], 2):g} epochs"]
    assert not any(s.startswith("train.epochs") for s in result["shared"])  # configured, not run
    assert "Steps and epochs each group ran: `max_steps=None: " in md


def test_per_seed_lines_on_request(report, runs_root, tmp_path):
    result, _ = report
    per_seed = build_report([runs_root], tmp_path / "rep", per_seed=True)
    for stem in ("test_accuracy_vs_epoch", "train_loss_vs_time"):  # a line per run beside the group means
        assert sorted(per_seed["plots"][stem]["seed_lines"]) == sorted(f"{b}-s{s}" for b in BLOCKS for s in SEEDS)
        assert result["plots"][stem]["seed_lines"] == []
        drawn = [(folder / f"{stem}.svg").read_text() for folder in (tmp_path / "rep", Path(result["files"]["markdown"]).parent)]
        assert sorted(line.split('"')[0] for line in drawn[0].split('<g id="run-')[1:]) == \
            sorted(f"{b}-s{s}" for b in BLOCKS for s in SEEDS), stem  # in the picture itself
        assert '<g id="run-' not in drawn[1], stem
    curve = per_seed["plots"]["test_accuracy_vs_epoch"]["groups"]["plain"]
    runs = [load_run(runs_root / f"plain-s{s}") for s in SEEDS]
    first = [run.split("test")[0]["accuracy"] for run in runs]
    assert curve["mean"][0] == pytest.approx(statistics.fmean(first)) and curve["n"][0] == len(SEEDS)
    assert curve["std"][0] == pytest.approx(statistics.stdev(first))
