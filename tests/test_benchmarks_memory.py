"""benchmarks/memory.py: the smoke run end to end (a subprocess, as CI and users run it), and
the pieces of the GPU section that can be checked without a GPU -- the batch search with a fake
``fits``, out-of-memory handling, the predicted-peak formula, the measuring code path on CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "memory.py"


def _load():
    spec = importlib.util.spec_from_file_location("benchmarks_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


bm = _load()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster, and immune to oversubscribed CI cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fake_cuda_section() -> dict:
    """A section 3 as a GPU run writes it (numbers made up), to check it is kept and rendered."""
    rows = [{"precision": s.precision, "policy": s.policy, "channels_last": s.channels_last,
             "label": s.label, "batch": 4, "ms_per_image": 1.0 + i, "min_ms_per_image": 1.0 + i,
             "cpu_ms_per_image": 0.1, "peak_gib": 0.5, "peak_mib_per_image": 128.0}
            for i, s in enumerate(bm.CUDA_SETTINGS)]
    search = {bm.BASELINE.label: {"largest_batch": 90, "trials": [{"batch": 64, "fits": True}],
                                  "seconds": 3.0},
              bm.LOW_MEMORY.label: {"largest_batch": 400, "trials": [], "seconds": 5.0}}
    return {"model": bm.SMOKE["cuda"].name, "batch": 4, "image_size": 16, "warmup_steps": 1, "timed_steps": 2,
            "cudnn_benchmark": True, "limit_gib": 8.0, "gpu_total_gib": 79.1, "max_batch": 64,
            "rows": rows, "search": search, "batch_ratio": 400 / 90, "time_ratio_vs_fast": 1.2,
            "goal_met": True, "date": "2026-01-01T00:00:00+00:00", "wall_s": 1.0,
            "machine": {"cpu": "x", "cpu_count": 16, "python": "3.12", "torch": "2.11",
                        "gpu": "FAKE GPU"}}


def test_smoke_run_writes_sane_tables(tmp_path):
    # A GPU section from an earlier run must survive a CPU run (and be rendered).
    (tmp_path / "memory.json").write_text(json.dumps(
        {"smoke": True, "sections": {"cuda": _fake_cuda_section()}}))
    sys.path.insert(0, str(ROOT / "tests"))
    from test_train_e2e import python_script

    cmd, env = python_script(SCRIPT, "--smoke", "--out", tmp_path)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    md = (tmp_path / "memory.md").read_text()
    report = json.loads((tmp_path / "memory.json").read_text())
    sections = report["sections"]
    assert set(sections) == {"predicted", "cpu", "cuda"}
    assert not any("error" in s for s in sections.values())

    pred = {(r["precision"], r["policy"]): r for r in sections["predicted"]["rows"]}
    assert len(pred) == len(bm.DTYPES) * len(bm.POLICIES)
    for policy in bm.POLICIES:
        fp32, bf16 = pred["fp32", policy], pred["bf16", policy]
        assert 0 < bf16["saved_mib_per_image"] < fp32["saved_mib_per_image"]
        assert 0.4 < bf16["saved_vs_fp32_none"] / fp32["saved_vs_fp32_none"] < 0.6  # ~half
    for precision in bm.DTYPES:
        none = pred[precision, "none"]
        assert none["recompute_mib_per_image"] == 0 and none["flops_vs_none"] == 1
        for policy in ("block", "stage", "sqrt"):
            r = pred[precision, policy]
            assert r["saved_mib_per_image"] < none["saved_mib_per_image"]
            assert r["predicted_gib"]["total"] < none["predicted_gib"]["total"]
            assert r["max_batch_in_limit"] > none["max_batch_in_limit"] > 0
            assert 1.2 < r["flops_vs_none"] < 1.4  # ~ one extra forward of the blocks
    assert pred["bf16", "none"]["predicted_gib"]["total"] < pred["fp32", "none"]["predicted_gib"]["total"]

    cpu = sections["cpu"]
    assert [r["label"] for r in cpu["rows"]] == [s.label for s in bm.CPU_SETTINGS]
    for r in cpu["rows"]:
        assert math.isfinite(r["ms_per_image"]) and r["ms_per_image"] > 0
        assert r["peak_gib"] is None  # no memory measurement on CPU
    assert cpu["machine"]["torch"] == torch.__version__ and cpu["date"]

    assert "## 1. Activation memory" in md and "## 2. Step time on CPU" in md
    assert "| fp32 | block |" in md and "| bf16+cl/block |" in md
    assert "FAKE GPU" in md and "4.44× the batch" in md and "**met**" in md
    gpu_row = next(line for line in md.splitlines() if line.startswith("| fp32/none | 0.50 |"))
    assert "–" not in gpu_row  # predicted GiB looked up in section 1 for the same model


def test_without_gpu_section_says_how_to_measure_it():
    report = {"command": "x", "sections": {}}
    assert "python benchmarks/memory.py --device cuda --limit-gib 8" in bm.render(report)


# ----------------------------------------------------------------------------- batch search


@pytest.mark.parametrize("answer", [0, 1, 2, 63, 64, 65, 300, 1000, 8191, 8192, 10_000])
@pytest.mark.parametrize("start", [1, 64, 5000])
def test_largest_batch_finds_the_threshold(answer, start):
    calls = []

    def fits(batch):
        assert 1 <= batch <= 8192 and batch not in calls  # in range, never asked twice
        calls.append(batch)
        return batch <= answer

    assert bm.largest_batch(fits, start=start, max_batch=8192) == min(answer, 8192)
    assert len(calls) <= 2 * math.log2(8192) + 2


def test_make_fits_treats_only_out_of_memory_as_no():
    freed, trials = [], []

    class FakeOps:
        def free(self):
            freed.append(1)

    def attempt(batch):
        if batch > 100:
            raise bm.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if batch == 13:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    fits = bm.make_fits(attempt, FakeOps(), trials)
    assert bm.largest_batch(fits, start=64, max_batch=1000) == 100
    assert trials[:2] == [{"batch": 64, "fits": True}, {"batch": 128, "fits": False}]
    assert len(freed) == len(trials)
    with pytest.raises(RuntimeError, match="shapes"):
        fits(13)


def test_is_oom():
    assert bm.is_oom(bm.OutOfMemoryError("CUDA out of memory"))
    assert bm.is_oom(RuntimeError("CUDA error: out of memory"))
    assert bm.is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not bm.is_oom(RuntimeError("expected scalar type BFloat16 but found Float"))
    assert not bm.is_oom(ValueError("out of memory"))


def test_cuda_code_path_runs_on_cpu():
    """The GPU section's measuring and search functions, on CPU (no peak memory there)."""
    spec, ops = bm.SMOKE["cuda"], bm.Ops("cpu")
    rows = bm.measure_grid(spec, [bm.BASELINE, bm.LOW_MEMORY], ops, warmup=1, steps=2,
                           interleave=False)
    assert [r["label"] for r in rows] == ["fp32/none", "bf16+cl/block"]
    assert all(r["ms_per_image"] > 0 and r["peak_gib"] is None for r in rows)
    trials: list = []
    fits = bm.make_fits(bm.train_attempt(spec, bm.LOW_MEMORY, ops), ops, trials)
    assert bm.largest_batch(fits, start=2, max_batch=4) == 4
    assert trials == [{"batch": 2, "fits": True}, {"batch": 4, "fits": True}]


# ----------------------------------------------------------------------------- the formula


def test_predicted_peak_formula():
    params, b = 1_000_000, 10
    fp32 = bm.predict_peak_bytes(params, "fp32", b, saved_per_image=100.0,
                                 recompute_per_image=20.0, input_per_image=7)
    assert fp32 == {"states": 12_000_000, "casts": 0, "activations": 1000.0, "recompute": 200.0,
                    "input": 0, "total": 12_001_200.0}  # fp32: conv1 saves the input already
    bf16 = bm.predict_peak_bytes(params, "bf16", b, 50.0, 10.0, 7)
    assert bf16["casts"] == 2_000_000 and bf16["input"] == 70
    assert bf16["total"] == 12_000_000 + 2_000_000 + 500 + 100 + 70
    limit = 12_000_000 + 2_000_000 + 67 * 100
    n = bm.max_batch_for(limit, bf16, b)  # 67 images at 67 B each
    assert n == 100
    assert bm.max_batch_for(1_000, bf16, b) == 0


def test_render_survives_failed_and_partial_sections():
    cuda = _fake_cuda_section()
    cuda["rows"][0].update(ms_per_image=None, min_ms_per_image=None, peak_gib=None,
                           peak_mib_per_image=None, out_of_memory=True)
    cuda.update(search={}, search_error="Traceback: boom", batch_ratio=None, goal_met=None)
    md = bm.render({"command": "x", "sections": {"cpu": {"error": "Traceback: cpu broke"},
                                                 "cuda": cuda}})
    assert "Section `cpu` failed" in md and "cpu broke" in md and "## 2." not in md
    assert "The search failed" in md and "**unknown**" in md
    md = bm.render({"command": "x", "sections": {"cuda": {"error": "Traceback: no"}}})
    assert "**Failed**" in md and "Not measured yet" not in md


def test_grid_reports_out_of_memory_settings(monkeypatch):
    real = bm._measure_alone

    def measure(spec, s, ops, warmup, steps):
        if s == bm.BASELINE:
            raise bm.OutOfMemoryError("CUDA out of memory")
        return real(spec, s, ops, warmup, steps)

    monkeypatch.setattr(bm, "_measure_alone", measure)
    rows = bm.measure_grid(bm.SMOKE["cuda"], [bm.BASELINE, bm.FAST], bm.Ops("cpu"), 1, 1,
                           interleave=False)
    assert rows[0]["out_of_memory"] and rows[0]["ms_per_image"] is None
    assert not rows[1]["out_of_memory"] and rows[1]["ms_per_image"] > 0
