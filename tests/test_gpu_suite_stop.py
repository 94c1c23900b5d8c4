"""benchmarks/gpu_suite.py: a stop signal whose exception was swallowed still stops the suite.

A signal handler's exception raised while Python runs a weakref callback (a garbage collection in
torch's code, as it happened in a CI run) is printed as "Exception ignored" and the code under it
goes on: the suite must still stop with the signal's status, the section marked interrupted."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import types
import weakref
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_suite  # noqa: E402


class _Thing:
    pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed Interrupted
def test_a_swallowed_stop_still_stops_after_the_section(tmp_path):
    args = argparse.Namespace(out=tmp_path, smoke=True, sections=["2", "3"], profile=False, time_limit=None)
    suite = gpu_suite.Suite(args, dict(gpu_suite.SMOKE), "cpu", "python benchmarks/gpu_suite.py --smoke")
    ran = []

    def section_two(sec):
        thing = _Thing()
        ref = weakref.ref(thing, lambda _ref: suite.on_signal(signal.SIGTERM, None))  # noqa: F841
        del thing  # the callback runs here; its Interrupted is printed and dropped
        suite.watchdog.cancel()  # the grace timer would end this test process
        sec["rows"].append({"config": "a", "img_per_s": 1.0})
        ran.append("2")  # reached: the Interrupted was swallowed

    runners = {"2": section_two, "3": lambda sec: ran.append("3")}
    with pytest.raises(gpu_suite.Interrupted) as stop:
        suite.run(runners, types.SimpleNamespace(section=None), types.SimpleNamespace(free=lambda: None))
    assert stop.value.code == 128 + signal.SIGTERM and ran == ["2"]  # section 3 never started
    suite.write()  # as main() does on Interrupted
    rep = json.loads(next(tmp_path.glob("gpu-*.json")).read_text())
    assert rep["interrupted"].startswith("stopped by SIGTERM during section 2 (r50)") and not rep["complete"]
    assert rep["sections"]["2"]["interrupted"] == rep["interrupted"]
    assert rep["sections"]["2"]["rows"] == [{"config": "a", "img_per_s": 1.0}] and "3" not in rep["sections"]
