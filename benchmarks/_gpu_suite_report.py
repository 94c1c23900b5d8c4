"""The report of ``benchmarks/gpu_suite.py``: goals (met / missed / not measured), the machine,
each device's dense bf16 peak (for MFU), the Markdown, and writing both files atomically.

Nothing here runs a model. A goal is a figure, a comparison and a target; ``judge`` decides
met / missed (or ``not measured`` when the figure could not be measured here, e.g. GPU memory or
MFU on a CPU).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PASS, MISS, NA = "met", "missed", "not measured"
OPS = (">=", "<=", "within")


def judge(value: float | None, op: str, target: float) -> str:
    """met / missed of ``value op target``; ``within`` means |value| <= target (a relative error,
    e.g. 0.15 for +-15 %); ``not measured`` when ``value`` is None (not measured on this machine)."""
    if op not in OPS:
        raise ValueError(f"goal op {op!r}: one of {OPS}")
    if value is None:
        return NA
    ok = {">=": value >= target, "<=": value <= target, "within": abs(value) <= target}[op]
    return PASS if ok else MISS


@dataclass
class Goal:
    section: str  # "1" .. "5"
    name: str  # what is measured, e.g. "resnet_scale eager throughput"
    value: float | None  # the figure (None: not measured here)
    op: str  # >=, <=, within
    target: float
    unit: str = ""  # img/s, x, % (value and target are fractions: 0.25 is 25 %)
    note: str = ""

    @property
    def status(self) -> str:
        return judge(self.value, self.op, self.target)

    def figure(self) -> str:
        if self.value is None:
            return "n/a"
        if self.op == "within":
            return f"{100 * self.value:+.1f} %"
        return f"{100 * self.value:.1f} %" if self.unit == "%" else f"{_num(self.value)} {self.unit}".strip()

    def goal(self) -> str:
        if self.op == "within":
            return f"±{100 * self.target:g} %"
        if self.unit == "%":
            return f"{self.op} {100 * self.target:g} %"
        return f"{self.op} {_num(self.target)} {self.unit}".strip()

    def describe(self) -> str:
        return f"({self.section}) {self.name}: {self.figure()} (goal {self.goal()}) {self.status}"

    def as_dict(self) -> dict:
        return {**asdict(self), "status": self.status, "figure": self.figure(), "goal": self.goal(),
                "describe": self.describe()}


def missed(goals: list[Goal]) -> list[Goal]:
    return [g for g in goals if g.status == MISS]


#: Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, by device name: the first entry whose
#: words all appear in the name torch reports ("NVIDIA H100 80GB HBM3" is the SXM part), so the
#: more specific names come first. A device not listed gets no MFU ("n/a").
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200", "NVL"), 835.0), (("H200",), 989.0), (("GH200",), 989.0),
    (("H100", "PCIE"), 756.0), (("H100", "NVL"), 835.0), (("H100",), 989.0),
    (("A100",), 312.0), (("L40S",), 362.0), (("L40",), 181.0), (("L4",), 121.0), (("A10",), 125.0),
)


def peak_bf16_tflops(device_name: str | None) -> float | None:
    """The dense bf16 peak of ``device_name`` (TFLOP/s), None when the table does not know it."""
    words = set(re.split(r"[\s_\-/]+", (device_name or "").upper()))
    for keys, peak in PEAK_BF16_TFLOPS:
        if all(k in words for k in keys):
            return peak
    return None


def add_flops(row: dict, flops_per_image: float | None, peak_tflops: float | None) -> dict:
    """``tflops`` (achieved: model FLOPs per image x images per second) and ``mfu`` (achieved over
    the device's dense bf16 peak) of a row that has ``img_per_s``; None where either is unknown."""
    ips = row.get("img_per_s")
    achieved = ips * flops_per_image / 1e12 if ips and flops_per_image else None
    row["tflops"] = achieved
    row["mfu"] = achieved / peak_tflops if achieved is not None and peak_tflops else None
    return row


def _num(v: float) -> str:
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"


def driver_version() -> str | None:
    """The NVIDIA driver as nvidia-smi reports it; None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "device": device}
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30,
                    compute_capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), driver=driver_version(),
                    peak_bf16_tflops=peak_bf16_tflops(props.name))
    else:
        info.update(gpu=None, peak_bf16_tflops=None)
    return info


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return _num(v)
    return str(v)


def _column_cell(col: str, v) -> str:
    if col == "mfu" and isinstance(v, float):
        return f"{100 * v:.1f} %"
    return _cell(v)


def table(rows: list[dict], cols: list[str]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_column_cell(c, r.get(c)) for c in cols) + " |" for r in rows]
    return out


#: What the figures of a throughput table mean; printed once under the goals.
LEGEND = [
    "How to read the tables: `img_per_s` is the median over the timed windows (each window a block "
    "of steps, the device synchronised at both ends) and `min`/`max` are the slowest and fastest "
    "window. `loop` rows time `resnet-scale train`'s own loop (its loader, step, metrics window, "
    "stop/save control and log lines; one metrics.jsonl train line per window); `step` rows time the "
    "same run's optimizer step alone on one resident batch; `loop_vs_step` = loop ÷ step img/s "
    "(1.0 = the loop costs nothing). The first window (warm-up: cuDNN autotuning, compilation, "
    "loader start) is never in the median: `warmup_s` is its wall time and `compile_s` the part of it "
    "beyond steady-state step time (for compiled rows: compilation). `tflops` = model FLOPs per image "
    "(forward + backward, counted by `count_step_flops`, no recomputation) × img/s; `mfu` = tflops ÷ the "
    "device's dense bf16 peak (n/a for a device the table does not know, and on a CPU). Goals are "
    "judged on the loop figures.",
]


def _status_line(report: dict) -> list[str]:
    if report.get("interrupted"):
        done = ", ".join(k for k, v in report["sections"].items() if not v.get("interrupted")) or "none"
        return [f"**Partial report: {report['interrupted']}.** Finished sections: {done}; the figures "
                "below are what was measured before the run stopped.", ""]
    if not report.get("complete", True):
        done = ", ".join(report["sections"]) or "none"
        return [f"**Partial report: the run is still going** (finished sections: {done}).", ""]
    return []


def render(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [f"# GPU benchmark suite — {report['date']}", ""] + _status_line(report)
    if report["smoke"]:
        lines += ["**Smoke run** (tiny sizes on CPU; the figures say nothing about speed — they "
                  "prove the code paths run).", ""]
    lines += [f"Command: `{report['command']}`", "",
              f"Device: {m.get('gpu') or 'CPU only'}; driver {m.get('driver') or 'n/a'}; "
              f"torch {m['torch']}; torchvision {m.get('torchvision', '?')}; CUDA {m.get('cuda') or 'n/a'}; "
              f"cuDNN {m.get('cudnn') or 'n/a'}; Python {m['python']}; {m['cpu_count']} CPUs; "
              f"dense bf16 peak {_cell(m.get('peak_bf16_tflops')) if m.get('peak_bf16_tflops') else 'unknown'}"
              f"{' TFLOP/s' if m.get('peak_bf16_tflops') else ' (no MFU)'}.", "",
              f"Total wall time: {report['wall_s']:.1f} s.", "", "## Goals", ""]
    goals = report["goals"]
    lines += table(goals, ["section", "name", "figure", "goal", "status", "note"])
    miss = [g for g in goals if g["status"] == MISS]
    lines += ["", "### Missed goals", ""]
    lines += [f"- {g['describe']}" for g in miss] or ["- none"]
    na = [g for g in goals if g["status"] == NA]
    if na:
        lines += ["", "Not measured on this machine: " + "; ".join(f"({g['section']}) {g['name']}" for g in na)]
    lines += [""] + LEGEND


    lines += ["", "## Settings", ""] + [f"- {k}: `{json.dumps(v, default=str)}`" for k, v in s.items()]
    for key, sec in report["sections"].items():
        lines += ["", f"## {key}. {sec.get('title', '')}", "", f"Elapsed: {sec.get('wall_s', 0):.1f} s."]
        if sec.get("interrupted"):
            lines += ["", f"**interrupted: {sec['interrupted']}** (the rows below were measured before it)"]
        if sec.get("skipped"):
            lines += ["", f"**skipped: {sec['skipped']}**"]
        for note in sec.get("notes", []):
            lines += ["", f"- {note}"]
        if sec.get("rows"):
            cols = sec.get("columns") or list(sec["rows"][0])
            lines += [""] + table(sec["rows"], cols)
        for name, extra in sec.get("tables", {}).items():
            lines += ["", f"**{name}**", ""] + table(extra["rows"], extra["columns"])
        if sec.get("error"):
            lines += ["", "Error:", "", "```", sec["error"].rstrip(), "```"]
        for label, text in sec.get("profiles", {}).items():
            lines += ["", f"### Profile: {label}", "", "```", text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader (or a signal
    that writes the report again meanwhile) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_counter)}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_counter = itertools.count()


def write_report(out: Path, stem: str, report: dict) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    _replace(md, render(report))
    _replace(js, json.dumps(report, indent=1, default=str) + "\n")  # last: a new json means both are new
    return md, js
