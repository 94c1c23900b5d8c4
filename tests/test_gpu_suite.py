"""benchmarks/gpu_suite.py: the CPU smoke run end to end (a subprocess, as CI runs it) and the
goal PASS/MISS logic; nothing here needs a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

from _gpu_suite_report import MISS, NA, PASS, Goal, judge, missed, render  # noqa: E402

TITLES = {"1": "Throughput: CIFAR-stem", "2": "Throughput:", "3": "Memory:", "4": "DDP vs ZeRO-2 vs ZeRO-3",
          "5": "Planner: predicted vs measured"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--smoke", "--profile", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    mds, jsons = sorted(out.glob("gpu-*.md")), sorted(out.glob("gpu-*.json"))
    assert len(mds) == 1 and len(jsons) == 1, list(out.iterdir())
    return {"md": mds[0].read_text(), "json": json.loads(jsons[0].read_text()), "stdout": proc.stdout,
            "seconds": seconds}


def test_smoke_writes_every_section(smoke):
    rep, md = smoke["json"], smoke["md"]
    assert rep["smoke"] is True and rep["machine"]["torch"]
    assert set(rep["sections"]) == set(TITLES)
    for key, title in TITLES.items():
        sec = rep["sections"][key]
        assert "error" not in sec, sec.get("error")
        assert title in sec["title"]
        assert f"## {key}. {sec['title']}" in md
        assert sec["wall_s"] >= 0
        assert sec.get("rows") or sec.get("skipped"), key
        assert f"[gpu_suite] section {key}:" in smoke["stdout"]  # elapsed printed per section
    for key in ("1", "2"):
        assert all(r["img_per_s"] > 0 for r in rep["sections"][key]["rows"] if "error" not in r)
    assert [r["config"] for r in rep["sections"]["1"]["rows"]][0].startswith("baseline")
    # CPU: no max_memory_allocated, no memory fraction -> recorded as n/a
    assert all(r["peak_gib"] is None for r in rep["sections"]["3"]["rows"])
    assert "n/a on CPU" in md
    assert all(r["predicted_gib"] > 0 for r in rep["sections"]["5"]["rows"])
    for k in ("device", "smoke", "cifar", "r50", "mem", "zero", "cudnn_benchmark"):
        assert k in rep["settings"]


def test_smoke_goals_table(smoke):
    rep, md = smoke["json"], smoke["md"]
    assert "## Goals" in md and "| section | name | figure | goal | status |" in md
    assert "### Missed goals" in md
    sections = {g["section"] for g in rep["goals"]}
    assert {"1", "2", "3", "4", "5"} <= sections
    assert all(g["status"] in (PASS, MISS, NA) for g in rep["goals"])
    assert rep["missed"] == [g["describe"] for g in rep["goals"] if g["status"] == MISS]
    for line in rep["missed"]:
        assert f"- {line}" in md
    # --profile: a tiny CPU run misses the throughput goals, so their profiles are written
    assert "### Profile:" in md


@pytest.mark.parametrize("value, op, target, status", [
    (30000, ">=", 30000, PASS), (29999.9, ">=", 30000, MISS), (1.10, "<=", 1.10, PASS), (1.11, "<=", 1.10, MISS),
    (0.15, "within", 0.15, PASS), (-0.149, "within", 0.15, PASS), (-0.16, "within", 0.15, MISS),
    (0.2, "within", 0.15, MISS), (None, ">=", 1, NA), (None, "within", 0.15, NA),
])
def test_judge(value, op, target, status):
    assert judge(value, op, target) == status


def test_judge_rejects_unknown_op():
    with pytest.raises(ValueError):
        judge(1.0, ">", 1.0)


def test_goals_render_and_missed_list():
    goals = [Goal("1", "eager throughput", 31000.0, ">=", 30000, "img/s"),
             Goal("4", "ZeRO-2 step time vs DDP", 1.2, "<=", 1.10, "x"),
             Goal("5", "planner peak", 0.05, "within", 0.15),
             Goal("3", "batch ratio", None, ">=", 4, "x", "n/a on CPU")]
    assert [g.name for g in missed(goals)] == ["ZeRO-2 step time vs DDP"]
    assert goals[2].figure() == "+5.0 %" and goals[2].goal() == "±15 %"
    assert goals[1].describe() == "(4) ZeRO-2 step time vs DDP: 1.20 x (goal <= 1.10 x) MISS"
    report = {"date": "2026-01-01", "smoke": False, "command": "x", "wall_s": 1.0, "settings": {"a": 1},
              "machine": {"gpu": "FAKE H100", "driver": "999", "torch": "2", "python": "3", "cpu_count": 1},
              "goals": [g.as_dict() for g in goals], "sections": {}}
    md = render(report)
    assert "FAKE H100; driver 999" in md
    assert "- (4) ZeRO-2 step time vs DDP: 1.20 x (goal <= 1.10 x) MISS" in md
    assert "| 1 | eager throughput | 31,000 img/s | >= 30,000 img/s | PASS |" in md
    assert "Not measured on this machine (n/a): (3) batch ratio" in md


def test_no_missed_goals_says_none():
    report = {"date": "d", "smoke": True, "command": "x", "wall_s": 0.0, "settings": {},
              "machine": {"torch": "2", "python": "3", "cpu_count": 1},
              "goals": [Goal("1", "g", 2.0, ">=", 1).as_dict()], "sections": {}}
    assert "### Missed goals\n\n- none" in render(report)


def test_zero_section_skips_without_deepspeed(monkeypatch):
    """No deepspeed: a 'skipped: deepspeed not installed' entry and the offline install hint."""
    import _gpu_suite_memory as gm
    import gpu_suite

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    goals: list = []
    ops = gm._memory_module().Ops("cpu")
    sec = gm.run_zero(dict(gpu_suite.SMOKE), ops, goals, lambda *a: None)
    assert sec["skipped"] == "deepspeed not installed"
    assert "--no-index" in sec["notes"][0]
    assert [g.status for g in goals] == [NA, NA]
    md = render({"date": "d", "smoke": True, "command": "x", "wall_s": 0.0, "settings": {},
                 "machine": {"torch": "2", "python": "3", "cpu_count": 1},
                 "goals": [g.as_dict() for g in goals], "sections": {"4": {**sec, "wall_s": 0.0}}})
    assert "**skipped: deepspeed not installed**" in md


def test_sections_flag():
    import gpu_suite

    assert gpu_suite.parse_sections("5,1,1") == ["1", "5"]
    with pytest.raises(Exception):
        gpu_suite.parse_sections("6")
