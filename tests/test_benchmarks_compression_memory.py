"""benchmarks/compression_memory.py: its core (one model's table) for a tiny model, and the page it
renders."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compression_memory as bm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_model_table_and_page():
    limit = 300 * 2**20  # a budget a little above the workspace floor: batches stay small
    rows = bm.measure_model(bm.TINY, limit, precisions=("fp32",), policies=("none", "block"))
    assert len(rows) == 2 * len(bm.COMPRESSIONS)
    cell = {(r["precision"], r["policy"], r["compression"]): r for r in rows}
    ctx = bm.context(bm.TINY)
    for key, r in cell.items():
        assert r["largest_batch"] > 0
        # the largest batch fits and one more does not, by the planner's own estimate
        assert bm.estimate(ctx, *key, r["largest_batch"]).total <= limit < bm.estimate(ctx, *key, r["largest_batch"] + 1).total
    for precision in ("fp32",):
        for policy in ("none", "block"):
            saved = [cell[precision, policy, c]["saved_mib_per_image"] for c in bm.COMPRESSIONS]
            assert saved == sorted(saved, reverse=True) and saved[-1] < saved[0]  # int2 < int4 < int8 < none
    assert cell["fp32", "none", "none"]["batch_vs_fp32_none"] == 1
    v = bm.verdict(rows)
    assert v["best"]["largest_batch"] == max(r["largest_batch"] for r in rows)
    report = {"command": "x", "wall_s": 1.0, "machine": "m", "date": "d", "limit_gib": 0.29,
              "models": [{"name": "tiny", "rows": rows}], "verdict": {**v, "why": "because"}}
    page = bm.render(report)
    assert "## tiny" in page and "| fp32 | block |" in page and "because" in page
    assert ("**Met.**" in page) == v["met"]
