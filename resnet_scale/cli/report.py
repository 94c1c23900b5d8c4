"""``resnet-scale report RUN_DIR... --out DIR``: compare finished runs from their folders.

A RUN_DIR is a run folder (``config.json``, ``metrics.jsonl``, ``summary.json``) or an output
folder holding run folders (``--output-dir`` of ``resnet-scale train``). ``--wandb-report``
also builds the same comparison as a W&B Report and publishes it; offline, it says what is
needed and the command still succeeds with the local report. Bad input exits with status 2 (a
damaged summary.json or metrics.jsonl: one line naming the file, line and value); an --out that
cannot be written, with 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from resnet_scale.cli.parser import EXIT_BAD_INPUT, standalone
from resnet_scale.tracking.report import DEFAULT_TITLE

NAME = "report"
HELP = "compare run folders over seeds: mean +- std curves, confidence intervals and p-values"
DESCRIPTION = "Build a comparison report from local run folders (or output folders holding runs)."


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="Run folders, or output folders whose run sub-folders are all compared.")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="Folder for report.html (self-contained), report.md, report.json, the figures (PNG, SVG, "
                             "PDF) and the tables (CSV, LaTeX).")
    parser.add_argument("--group-by", default=None, metavar="KEY",
                        help="Config key whose value groups the runs: a field name (block, depth, precision) "
                             "or a dotted path (model.block). Default: the whole config less the seed (runs "
                             "that differ only by seed form one group).")
    parser.add_argument("--baseline", default=None, metavar="VALUE",
                        help="The group the others are compared with (default: the first group found).")
    parser.add_argument("--per-seed", action="store_true",
                        help="Also draw each run's own line beside its group's mean ± std curve.")
    parser.add_argument("--title", default=DEFAULT_TITLE, metavar="TEXT",
                        help=f"Report title (default: {DEFAULT_TITLE.replace('%', '%%')}).")
    wb = parser.add_argument_group("W&B report")
    wb.add_argument("--wandb-report", action="store_true",
                    help="Also publish the comparison as a W&B Report (needs WANDB_API_KEY, network, synced runs).")
    wb.add_argument("--wandb-project", default="resnet-scale", metavar="NAME",
                    help="W&B project of the runs (default: resnet-scale).")
    wb.add_argument("--wandb-entity", default=None, metavar="NAME",
                    help="W&B entity (user or team) of the runs.")
    wb.add_argument("--wandb-group", default=None, metavar="NAME",
                    help="W&B group to show (default: the runs' --run-group, else their names).")
    return parser


def _publish(ns: argparse.Namespace) -> None:
    from resnet_scale.tracking.trackers import TrackingError
    from resnet_scale.tracking.wandb_report import build_wandb_report, publish_wandb_report

    try:
        report = build_wandb_report(ns.run_dirs, project=ns.wandb_project, entity=ns.wandb_entity,
                                    group=ns.wandb_group, title=ns.title, group_by=ns.group_by,
                                    baseline=ns.baseline)
        print(f"W&B report: {publish_wandb_report(report, run_dirs=ns.run_dirs)}")
    except TrackingError as err:
        print(f"resnet-scale report: W&B report not published: {err}", file=sys.stderr)


def run(ns: argparse.Namespace) -> int:
    from resnet_scale.tracking.runs import ReportError

    logging.basicConfig(format="resnet-scale: %(message)s", level=logging.WARNING)
    try:
        from resnet_scale.tracking.report import build_report

        result = build_report(ns.run_dirs, ns.out, group_by=ns.group_by, title=ns.title, baseline=ns.baseline,
                              per_seed=ns.per_seed)
    except ReportError as err:
        print(f"resnet-scale report: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:  # a run folder that cannot be listed (2), or --out that cannot be written (1)
        written = err.filename is not None and Path(os.fsdecode(err.filename)).resolve().is_relative_to(
            Path(ns.out).resolve())
        print(f"resnet-scale report: error: {'cannot write' if written else 'cannot read'} "
              f"{err.filename or 'a file'}: {err.strerror or err}.", file=sys.stderr)
        return 1 if written else EXIT_BAD_INPUT
    groups = ", ".join(f"{g['group']} ({len(g['runs'])})" for g in result["groups"])
    print(f"report of {len(result['runs'])} runs by {result['group_by']}: {groups}")
    print(f"  {result['files']['html']}\n  {result['files']['markdown']}")
    if ns.wandb_report:
        _publish(ns)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``resnet-scale report`` without the subcommand word (``python -m resnet_scale.cli.report``)."""
    return standalone(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
