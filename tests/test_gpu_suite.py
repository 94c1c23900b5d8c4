"""benchmarks/gpu_suite.py: the CPU smoke run end to end (a subprocess, as CI runs it), a smoke
run stopped by SIGTERM halfway, the goal met/missed logic, the MFU table and the timing helpers;
nothing here needs a GPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

from _gpu_suite_report import MISS, NA, PASS, Goal, judge, missed, render  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from test_train_e2e import python_script  # noqa: E402

TITLES = {"1": "Throughput: CIFAR-stem", "2": "Throughput:", "3": "Memory:", "4": "DDP vs ZeRO-2 vs ZeRO-3",
          "5": "Planner: predicted vs measured", "6": "Activation compression:"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    started = time.perf_counter()
    cmd, env = python_script(BENCH / "gpu_suite.py", "--smoke", "--profile", "--out", out)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, **env})
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    mds, jsons = sorted(out.glob("gpu-*.md")), sorted(out.glob("gpu-*.json"))
    assert len(mds) == 1 and len(jsons) == 1, list(out.iterdir())
    return {"md": mds[0].read_text(), "json": json.loads(jsons[0].read_text()), "stdout": proc.stdout,
            "stderr": proc.stderr, "seconds": seconds}


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
        assert all(r["img_per_s"] > 0 for r in rep["sections"][key]["rows"] if "skipped" not in r)
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
    assert rep["complete"] is True and rep["interrupted"] is None and "Partial report" not in md
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
    assert goals[1].describe() == "(4) ZeRO-2 step time vs DDP: 1.20 x (goal <= 1.10 x) missed"
    report = {"date": "2026-01-01", "smoke": False, "command": "x", "wall_s": 1.0, "settings": {"a": 1},
              "machine": {"gpu": "FAKE H100", "driver": "999", "torch": "2", "python": "3", "cpu_count": 1},
              "goals": [g.as_dict() for g in goals], "sections": {}}
    md = render(report)
    assert "FAKE H100; driver 999" in md
    assert "- (4) ZeRO-2 step time vs DDP: 1.20 x (goal <= 1.10 x) missed" in md
    assert "| 1 | eager throughput | 31,000 img/s | >= 30,000 img/s | met |" in md
    assert "Not measured on this machine: (3) batch ratio" in md
    mfu = Goal("1", "MFU", 0.153, ">=", 0.15, "%")
    assert (mfu.figure(), mfu.goal(), mfu.status) == ("15.3 %", ">= 15 %", PASS)


def test_no_missed_goals_says_none():
    report = {"date": "d", "smoke": True, "command": "x", "wall_s": 0.0, "settings": {},
              "machine": {"torch": "2", "python": "3", "cpu_count": 1},
              "goals": [Goal("1", "g", 2.0, ">=", 1).as_dict()], "sections": {}}
    assert "### Missed goals\n\n- none" in render(report)


def test_zero_section_records_the_deepspeed_import_error(monkeypatch, tmp_path, capsys):
    """`import deepspeed` failing on a module it imports: the real ImportError text is printed and
    recorded, the section is skipped with it, its goals are not measured."""
    import _gpu_suite_memory as gm
    import gpu_suite

    fake = tmp_path / "deepspeed"
    fake.mkdir()
    (fake / "__init__.py").write_text("import einops_is_not_installed_here  # noqa\n")
    monkeypatch.delitem(sys.modules, "deepspeed", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    goals: list = []
    sec: dict = {}
    gm.run_zero(dict(gpu_suite.SMOKE), gm._memory_module().Ops("cpu"), goals, lambda *a: None, sec)
    assert sec["skipped"] == ("import deepspeed failed: ModuleNotFoundError: "
                              "No module named 'einops_is_not_installed_here'")
    assert "No module named 'einops_is_not_installed_here'" in capsys.readouterr().err
    assert "einops msgpack" in sec["notes"][-1] and sec["rows"] == []
    assert [g.status for g in goals] == [NA, NA] and "import deepspeed failed" in goals[0].note
    md = render({"date": "d", "smoke": True, "command": "x", "wall_s": 0.0, "settings": {},
                 "machine": {"torch": "2", "python": "3", "cpu_count": 1},
                 "goals": [g.as_dict() for g in goals], "sections": {"4": {**sec, "wall_s": 0.0}}})
    assert "**skipped: import deepspeed failed: ModuleNotFoundError: No module named" in md


def test_sections_flag():
    import gpu_suite

    assert gpu_suite.parse_sections("5,1,1") == ["1", "5"]
    with pytest.raises(Exception):
        gpu_suite.parse_sections("7")


# ----------------------------------------------------------------------------- figures users can trust


def _throughput_rows(rep):
    return [r for key in ("1", "2") for r in rep["sections"][key]["rows"] if not r.get("skipped")]


def test_smoke_throughput_rows_time_the_real_loop_in_windows(smoke):
    """Every resnet_scale row is a `resnet-scale train` run: its loop's median over three
    metrics.jsonl windows, the same run's step alone beside it, the warm-up apart."""
    rep = smoke["json"]
    assert "epoch 1 step 4/8" in smoke["stderr"]  # the trainer's own log lines (section 1: 4 windows of 2 steps)
    s1, s2 = rep["sections"]["1"]["rows"], rep["sections"]["2"]["rows"]
    assert [r["config"].split(":")[0] for r in s1] == ["baseline", "resnet-scale train", "resnet-scale train"]
    assert len(s2) == 4 and "needs a CUDA GPU" in s2[1]["skipped"]  # fp16 on a CPU: refused, said so
    loops = [r for r in _throughput_rows(rep) if r["config"].startswith("resnet-scale train")]
    assert len(loops) == 5
    for r in loops:
        loop, step = r["loop"], r["step"]
        assert r["windows"] == loop["windows"] == step["windows"] == 3 == len(loop["window_img_per_s"])
        assert r["img_per_s"] == loop["img_per_s"] == sorted(loop["window_img_per_s"])[1]
        assert r["img_per_s_min"] <= r["img_per_s"] <= r["img_per_s_max"]
        assert r["step_img_per_s"] == step["img_per_s"] > 0
        assert r["loop_vs_step"] == pytest.approx(r["img_per_s"] / r["step_img_per_s"])
        assert loop["warmup_steps"] == loop["steps_per_window"] and loop["warmup_s"] > 0  # the first window
        assert r["warmup_s"] > 0 and (r["compile_s"] is not None) == ("--compile" in r["flags"])
    base = s1[0]
    assert base["windows"] == 3 and base["drained_batches"] == 4 and base["img_per_s_min"] <= base["img_per_s"]
    md = smoke["md"]
    assert "| config | precision | batch | windows | img_per_s | img_per_s_min | img_per_s_max | step_img_per_s | " \
           "loop_vs_step | warmup_s | compile_s | tflops | mfu |" in md
    assert "`loop_vs_step` = loop ÷ step img/s" in md


def test_smoke_tflops_mfu_and_goals(smoke):
    """TFLOP/s on every throughput row (MFU "not measured" on a CPU: no bf16 peak), and the goals:
    3x the seed-style baseline and the MFU goals, never the old 10x."""
    rep = smoke["json"]
    rows = _throughput_rows(rep) + rep["sections"]["3"]["rows"] + rep["sections"]["4"]["rows"]
    assert len(rows) >= 14
    for r in rows:
        assert r["tflops"] > 0 and r["mfu"] is None, r["config"] if "config" in r else r["label"]
    assert rep["machine"]["peak_bf16_tflops"] is None
    goals = {g["name"]: g for g in rep["goals"]}
    assert goals["eager speed-up over the seed-style baseline"]["goal"] == ">= 3.00 x"
    assert not any("10.00 x" in g["goal"] for g in rep["goals"])
    mfu = {name: (g["goal"], g["status"]) for name, g in goals.items() if name.endswith("MFU")}
    assert mfu == {"CIFAR-stem basic-8 (smoke) eager MFU": (">= 15 %", NA),
                   "CIFAR-stem basic-8 (smoke) compiled MFU": (">= 25 %", NA),
                   "basic-8 (smoke) 16 px compiled MFU": (">= 20 %", NA)}
    assert "| 1 | CIFAR-stem basic-8 (smoke) eager MFU | n/a | >= 15 % | not measured |" in smoke["md"]


def test_smoke_compression_rows(smoke):
    """Section 6: bf16+CL without and with compression, the mode read back from the timed model;
    each ratio judged against 1.5x; the meter's saved bytes per image shrink."""
    rows, modes = smoke["json"]["sections"]["6"]["rows"], ["none", "int2"]  # smoke: int8/int4 only on a GPU
    assert [r["applied"] for r in rows] == [r["mode"] for r in rows] == modes and rows[0]["vs_uncompressed"] == 1.0
    assert all(r["windows"] == 3 and r["peak_gib"] is None and f"--activation-compression {r['mode']}" in r["flags"]
               and r["vs_uncompressed"] == pytest.approx(r["ms_per_image"] / rows[0]["ms_per_image"]) for r in rows)
    saved = [r["saved_mib_per_image"] for r in rows]
    assert saved == sorted(saved, reverse=True) and saved[-1] < saved[0] / 4
    goals = [(g["name"], g["value"], g["goal"]) for g in smoke["json"]["goals"] if g["section"] == "6"]
    assert goals == [(f"basic-8 (smoke) bf16+CL+{m} time/image vs bf16+CL", r["vs_uncompressed"], "<= 1.50 x")
                     for m, r in zip(modes[1:], rows[1:])]
    assert "| bf16 + channels_last + int2 | int2 | 8 |" in smoke["md"]


def test_smoke_zero_rows_are_like_for_like(smoke):
    """DDP, ZeRO-2 and ZeRO-3 train the same NHWC inputs with NCHW weights (read from the tensors)."""
    rows = smoke["json"]["sections"]["4"]["rows"]
    assert [r["config"] for r in rows] == ["DDP (plain model, 1 process)", "ZeRO-2", "ZeRO-3"]
    assert {r["weights_format"] for r in rows} == {"NCHW"}
    assert {r["input_format"] for r in rows} == {"channels_last"}
    assert all(r["windows"] == 3 and r["img_per_s_min"] <= r["img_per_s"] <= r["img_per_s_max"] for r in rows)


def test_sigterm_halfway_keeps_a_partial_report(tmp_path):
    """SIGTERM once section 2 is on disk: exit 143 promptly; the .md/.json keep section 2's rows
    and mark section 3 as interrupted, with no temporary file left behind."""
    out = tmp_path / "out"
    cmd, env = python_script(BENCH / "gpu_suite.py", "--smoke", "--sections", "2,3", "--out", out)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            found = sorted(out.glob("gpu-*.json"))
            if found and "2" in json.loads(found[0].read_text())["sections"]:
                break
            time.sleep(0.1)
        time.sleep(0.5)  # section 3 is under way (it takes seconds)
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-4000:]
    assert took < 30, took
    rep = json.loads(next(out.glob("gpu-*.json")).read_text())
    md = next(out.glob("gpu-*.md")).read_text()
    assert rep["complete"] is False and rep["interrupted"].startswith("stopped by SIGTERM during section 3 (memory)")
    assert set(rep["sections"]) == {"2", "3"}
    rows = rep["sections"]["2"]["rows"]
    assert "interrupted" not in rep["sections"]["2"] and len(rows) == 4
    assert all(r["img_per_s"] > 0 for r in rows if "skipped" not in r)
    assert rep["sections"]["3"]["interrupted"] == rep["interrupted"]
    assert f"**Partial report: {rep['interrupted']}.** Finished sections: 2;" in md
    assert "## 2. Throughput: basic-8 (smoke)" in md and "**interrupted: stopped by SIGTERM" in md
    assert "partial report" in err and not list(out.glob(".*.tmp"))


def test_loop_bench_hands_a_sigterm_the_trainer_caught_to_the_suite(tmp_path):
    """A SIGTERM during a `resnet-scale train` run is the trainer's (it stops the loop as in a real
    run); leaving the bench closes the run, deletes its scratch folder, puts the suite's handler
    back and raises the signal again for it."""
    import gpu_suite
    from _gpu_suite_memory import _memory_module
    from _gpu_suite_speed import model_flags
    from _gpu_suite_timing import LoopBench, Stopped

    got: list = []
    handler = lambda signum, frame: got.append(signum)  # noqa: E731 -- stands in for the suite's
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        spec = gpu_suite.SMOKE["cifar"]
        bench = LoopBench(model_flags(spec, 8) + ["--precision", "fp32"], device="cpu", spec=spec, batch=8,
                          timing=(1, 3, 1), ops=_memory_module().Ops("cpu"))
        with pytest.raises(Stopped):
            with bench:
                assert signal.getsignal(signal.SIGTERM) is not handler  # the trainer's StopFlag
                signal.raise_signal(signal.SIGTERM)
                assert got == []
                bench.loop_figures()  # stops after its first step, as a pre-empted run does
        assert got == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is handler
        assert not bench.scratch.exists() and bench.run is None
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_time_limit_writes_the_partial_report(tmp_path):
    """The time limit's alarm: the report says so, the exit status is 124."""
    import argparse

    import gpu_suite

    args = argparse.Namespace(out=tmp_path, smoke=True, sections=["1", "2"], profile=False, time_limit=5.0)
    suite = gpu_suite.Suite(args, dict(gpu_suite.SMOKE), "cpu", "python benchmarks/gpu_suite.py --time-limit 5")
    suite.sections["1"] = {"title": "Throughput: x", "rows": [{"config": "a", "img_per_s": 1.0}], "wall_s": 1.0}
    suite.current = ("2", {"title": "Throughput: y", "rows": [{"config": "b", "img_per_s": 2.0}]}, time.perf_counter())
    with pytest.raises(gpu_suite.Interrupted) as stop:
        suite.on_signal(signal.SIGALRM, None)
    suite.watchdog.cancel()
    assert stop.value.code == 124
    rep = json.loads(next(tmp_path.glob("gpu-*.json")).read_text())
    assert rep["interrupted"].startswith("time limit of 5 s reached during section 2 (r50)")
    assert rep["sections"]["2"]["rows"] == [{"config": "b", "img_per_s": 2.0}]  # rows measured so far are kept
    assert rep["sections"]["2"]["interrupted"] == rep["interrupted"] and "interrupted" not in rep["sections"]["1"]


# ----------------------------------------------------------------------------- pieces


def test_peak_table_and_mfu():
    from _gpu_suite_report import add_flops, peak_bf16_tflops

    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989 and peak_bf16_tflops("NVIDIA H200") == 989
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756 and peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert peak_bf16_tflops("NVIDIA L4") == 121 and peak_bf16_tflops("NVIDIA L40S") == 362
    assert peak_bf16_tflops("Tesla V100-SXM2-32GB") is None and peak_bf16_tflops(None) is None
    row = add_flops({"img_per_s": 10_000.0}, 24.3e9, 989.0)
    assert row["tflops"] == pytest.approx(243.0) and row["mfu"] == pytest.approx(243.0 / 989)
    assert add_flops({"img_per_s": 10_000.0}, 24.3e9, None)["mfu"] is None
    assert add_flops({"skipped": "x"}, 24.3e9, 989.0)["tflops"] is None


def test_precision_label_says_tf32(monkeypatch):
    from _gpu_suite_timing import precision_label

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert precision_label("fp32", "cuda") == "fp32 (TF32 convs)"
    assert precision_label("fp32", "cpu") == "fp32" and precision_label("bf16", "cuda") == "bf16"
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert precision_label("fp32", "cuda") == "fp32 (TF32 convs and matmuls)"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert precision_label("fp32", "cuda") == "fp32"


class _Recorder:
    """An ``Ops`` for the CPU that writes down when it is asked to synchronise."""

    def __init__(self, events: list) -> None:
        self.events, self.cuda, self.device = events, False, torch.device("cpu")

    def sync(self) -> None:
        self.events.append("sync")

    def reset_peak(self) -> None:
        self.events.append("reset")

    def peak(self) -> None:
        return None


def test_time_windows_drains_after_warmup_then_times_windows():
    from _gpu_suite_timing import drain, time_windows

    events: list = []
    batches = iter(range(100))
    fig = time_windows(lambda: events.append(("step", next(batches))), warmup=2, windows=3, per_window=2,
                       ops=_Recorder(events), batch=4,
                       before_timing=lambda: events.append(("drained", drain(batches, 5))))
    kinds = [e if isinstance(e, str) else e[0] for e in events]
    assert kinds == ["sync", "step", "step", "sync", "drained", "sync", "reset"] + ["step", "step", "sync"] * 3
    assert [e[1] for e in events if e[0] == "step"] == [0, 1, 7, 8, 9, 10, 11, 12]  # 2..6 dropped
    assert fig["windows"] == 3 and len(fig["window_img_per_s"]) == 3 and fig["warmup_steps"] == 2
    assert fig["img_per_s_min"] <= fig["img_per_s"] <= fig["img_per_s_max"]
    assert fig["ms_per_step"] == pytest.approx(4e3 / fig["img_per_s"]) and fig["warmup_s"] >= 0


def test_batch_search_records_a_non_oom_error(monkeypatch):
    """An error other than out-of-memory ends that setting's search, is recorded, and the other
    setting is still searched."""
    import _gpu_suite_memory as gm
    import gpu_suite

    bm = gm._memory_module()

    def train_attempt(spec, setting, ops):
        def attempt(batch):
            if setting == bm.BASELINE:
                raise RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")
            if batch > 24:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return attempt

    monkeypatch.setattr(bm, "train_attempt", train_attempt)
    cfg, search = dict(gpu_suite.SMOKE), {}
    rows = gm.search_rows(bm, gm._spec(bm, cfg["mem"], 8), cfg, bm.Ops("cpu"), search)
    assert [r["label"] for r in rows] == [bm.BASELINE.label, bm.LOW_MEMORY.label]
    assert rows[0]["error"] == "RuntimeError: cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"
    assert rows[0]["largest_batch"] is None and rows[0]["tries"] == 0
    assert rows[1]["largest_batch"] == 24 and "error" not in rows[1]
