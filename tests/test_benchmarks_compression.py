"""benchmarks/compression_gradients.py: its core function on one tiny model (the full table is a
benchmark, run by hand; docs/benchmarks/compression_gradients.md says how)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from compression_gradients import STAGES, Spec, measure_model, stage_of  # noqa: E402


def test_gradient_errors_of_a_tiny_model():
    """Every parameter is compared for every setting; fewer bits give a larger error; the mean of
    K compressed gradients is closer than one of them (the rounding noise averages away); the
    uncompressed references with and without checkpointing agree (only compression differs)."""
    spec = Spec("tiny", "basic", None, "cifar", 8, 10, 4, (1, 1, 1))
    res = measure_model(spec, draws=3, modes=("int8", "int2"), policies=("none", "block"),
                        data="noise")
    names = [n for n, _ in spec.build().named_parameters()]
    assert [(r["policy"], r["mode"]) for r in res["rows"]] == [
        ("none", "int8"), ("none", "int2"), ("block", "int8"), ("block", "int2")]
    for policy, mode in [(r["policy"], r["mode"]) for r in res["rows"]]:
        got = [p["parameter"] for p in res["params"] if (p["policy"], p["mode"]) == (policy, mode)]
        assert got == names
    by = {(r["policy"], r["mode"]): r for r in res["rows"]}
    for policy in ("none", "block"):
        int8, int2 = by[policy, "int8"], by[policy, "int2"]
        assert 0 < int8["overall"] < int2["overall"]
        assert int8["median"] <= int8["max"] and int8["overall_sd"] >= 0
        assert int2["mean_k"] < int2["overall"]
    assert by["none", "int8"]["overall"] < 0.02  # 8 bits and exact ReLU masks: well under 2 %
    assert res["checkpoint_vs_plain"]["block"] == pytest.approx(0, abs=1e-6)
    assert res["sgd_noise"]["overall"] > 0
    assert {stage_of(n) for n in names} == {"stem", "layer1", "layer2", "layer3", "fc"} <= set(STAGES)
