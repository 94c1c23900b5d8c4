"""The report of ``benchmarks/gpu_suite.py``: goals (PASS / MISS), the machine, the Markdown.

Nothing here runs a model. A goal is a figure, a comparison and a target; ``judge`` decides
PASS / MISS (or ``n/a`` when the figure could not be measured, e.g. GPU memory on a CPU).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PASS, MISS, NA = "PASS", "MISS", "n/a"
OPS = (">=", "<=", "within")


def judge(value: float | None, op: str, target: float) -> str:
    """PASS / MISS of ``value op target``; ``within`` means |value| <= target (a relative error,
    e.g. 0.15 for +-15 %); ``n/a`` when ``value`` is None (not measured on this machine)."""
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
    unit: str = ""  # img/s, x, rel. error
    note: str = ""

    @property
    def status(self) -> str:
        return judge(self.value, self.op, self.target)

    def figure(self) -> str:
        if self.value is None:
            return "n/a"
        return f"{100 * self.value:+.1f} %" if self.op == "within" else f"{_num(self.value)} {self.unit}".strip()

    def goal(self) -> str:
        return f"±{100 * self.target:g} %" if self.op == "within" else f"{self.op} {_num(self.target)} {self.unit}".strip()

    def describe(self) -> str:
        return f"({self.section}) {self.name}: {self.figure()} (goal {self.goal()}) {self.status}"

    def as_dict(self) -> dict:
        return {**asdict(self), "status": self.status, "figure": self.figure(), "goal": self.goal(),
                "describe": self.describe()}


def missed(goals: list[Goal]) -> list[Goal]:
    return [g for g in goals if g.status == MISS]


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
                    cudnn=torch.backends.cudnn.version(), driver=driver_version())
    else:
        info["gpu"] = None
    return info


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return _num(v)
    return str(v)


def table(rows: list[dict], cols: list[str]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return out


def render(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [f"# GPU benchmark suite — {report['date']}", ""]
    if report["smoke"]:
        lines += ["**Smoke run** (tiny sizes on CPU; the figures say nothing about speed — they "
                  "prove the code paths run).", ""]
    lines += [f"Command: `{report['command']}`", "",
              f"Device: {m.get('gpu') or 'CPU only'}; driver {m.get('driver') or 'n/a'}; "
              f"torch {m['torch']}; torchvision {m.get('torchvision', '?')}; CUDA {m.get('cuda') or 'n/a'}; "
              f"cuDNN {m.get('cudnn') or 'n/a'}; Python {m['python']}; {m['cpu_count']} CPUs.", "",
              f"Total wall time: {report['wall_s']:.1f} s.", "", "## Goals", ""]
    goals = report["goals"]
    lines += table(goals, ["section", "name", "figure", "goal", "status", "note"])
    miss = [g for g in goals if g["status"] == MISS]
    lines += ["", "### Missed goals", ""]
    lines += [f"- {g['describe']}" for g in miss] or ["- none"]
    na = [g for g in goals if g["status"] == NA]
    if na:
        lines += ["", "Not measured on this machine (n/a): " + "; ".join(f"({g['section']}) {g['name']}" for g in na)]
    lines += ["", "## Settings", ""] + [f"- {k}: `{json.dumps(v, default=str)}`" for k, v in s.items()]
    for key, sec in report["sections"].items():
        lines += ["", f"## {key}. {sec.get('title', '')}", "", f"Elapsed: {sec.get('wall_s', 0):.1f} s."]
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


def write_report(out: Path, stem: str, report: dict) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    js.write_text(json.dumps(report, indent=1, default=str) + "\n")
    md.write_text(render(report))
    return md, js
