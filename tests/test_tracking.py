"""Trackers: W&B offline by itself, one run from the main process only, the full config sent,
no API key written anywhere; --tracker none creates nothing; clear errors for missing packages.

W&B runs are real (offline, ~1-2 s each) and few; the rest is in-process and fast.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from resnet_scale.config import Config
from resnet_scale.config.errors import ConfigError
from resnet_scale.tracking import tracker_base
from resnet_scale.tracking.offline import find_offline_runs, read_offline_run
from resnet_scale.tracking.tensorboard_tracker import TensorBoardTracker
from resnet_scale.tracking.trackers import (
    NullTracker,
    TrackerGroup,
    TrackingError,
    build_tracker,
    build_tracker_config,
    tracker_metrics,
    wandb_mode,
)
from resnet_scale.tracking.wandb_tracker import WandbTracker

REPO = Path(__file__).resolve().parents[1]
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 hex digits, like a real W&B key

TRAIN = {"step": 10, "epoch": 0.5, "split": "train", "loss": 2.0, "accuracy": 0.2, "lr": 0.05,
         "images_per_s": 900.0, "time_s": 1.5, "step_time_s": 0.07, "grad_norm": 3.5}
TEST = {"step": 20, "epoch": 1, "split": "test", "loss": 1.5, "accuracy": 0.45, "lr": 0.05,
        "images_per_s": None, "samples": 360, "epoch_time_s": 2.9, "time_s": 3.0, "peak_memory_bytes": None}
SUMMARY = {"final_accuracy": 0.45, "best_accuracy": 0.45, "wall_time_s": 3.0, "time_to_target_s": None,
           "num_parameters": 78042, "weighted_layers": 8}


def payload() -> dict:
    """What config.json holds (and what the trainer passes to build_tracker)."""
    cfg = Config()
    cfg.model.depth, cfg.train.run_name = 8, "t"
    return {"config": cfg.to_dict(), "environment": {"torch": "x", "git_commit": "abc", "gpu": None, "cpu": "x86_64"},
            "world_size": 1, "memory": {"precision": "fp32"}, "num_parameters": 78042, "weighted_layers": 8}


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """Offline W&B with no key, its caches and settings kept inside tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setattr(tracker_base, "_warned", set())


def test_tracker_metrics_name_splits_and_drop_missing_values():
    assert tracker_metrics(TRAIN) == {"epoch": 0.5, "time_s": 1.5, "train/loss": 2.0, "train/accuracy": 0.2,
                                      "train/lr": 0.05, "train/images_per_s": 900.0, "train/step_time_s": 0.07,
                                      "train/grad_norm": 3.5}
    assert tracker_metrics(TEST) == {"epoch": 1, "time_s": 3.0, "test/loss": 1.5, "test/accuracy": 0.45,
                                     "test/lr": 0.05, "test/samples": 360, "test/epoch_time_s": 2.9}


def test_tracker_config_puts_sections_on_top_and_drops_credentials(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    raw = payload()
    raw["config"]["train"]["note"] = FAKE_KEY
    raw["wandb_api_key"] = FAKE_KEY
    out = build_tracker_config(raw)
    assert out["model"] == raw["config"]["model"] and out["environment"]["git_commit"] == "abc"
    assert out["memory"] == raw["config"]["memory"] and out["memory_resolved"] == {"precision": "fp32"}
    assert "wandb_api_key" not in out and out["train"]["note"] == "<redacted>"
    assert FAKE_KEY not in json.dumps(out)


def test_wandb_offline_main_process_creates_one_run_with_the_full_config(wandb_env, tmp_path, caplog):
    run_dir = tmp_path / "run"
    raw = payload()
    with caplog.at_level(logging.WARNING, logger="resnet_scale"):
        tracker = build_tracker("wandb", is_main=True, run_dir=run_dir, config=raw, project="resnet-scale-test",
                                entity=None, group="g1", tags=["a", "b"], run_name="t")
        assert isinstance(tracker.get("wandb"), WandbTracker) and tracker.run_id
        tracker.log(TRAIN, step=10)
        tracker.log(TEST, step=20)
        tracker.summary(SUMMARY)
        tracker.finish()
    # The offline run's file is written by W&B's service process, which this test process keeps after
    # run.finish() (a CLI run ends it at exit); teardown waits for it to finish writing. Read at once,
    # the file once (1 run in ~10 on a loaded machine) held no config yet.
    import wandb

    wandb.teardown()
    runs = find_offline_runs(run_dir)
    assert len(runs) == 1 and runs[0].name.endswith(tracker.run_id)
    notices = [r.getMessage() for r in caplog.records if "offline" in r.getMessage()]
    assert len(notices) == 1 and f"wandb sync {runs[0]}" in notices[0]

    stored = read_offline_run(runs[0])
    for section, values in raw["config"].items():
        assert stored["config"][section] == values, section
    assert stored["config"]["environment"] == raw["environment"]
    assert (stored["group"], stored["name"], stored["tags"]) == ("g1", "t", ["a", "b"])
    assert [row["train/loss"] for row in stored["history"] if "train/loss" in row] == [2.0]
    assert [row["test/accuracy"] for row in stored["history"] if "test/accuracy" in row] == [0.45]
    assert stored["summary"]["final_accuracy"] == 0.45 and stored["summary"]["weighted_layers"] == 8
    assert stored["metrics"] == {"epoch": None, "time_s": None, "test/*": "epoch"}  # test metrics against epochs

    # The other ranks, and --tracker none, create nothing.
    for kind, main in (("wandb", False), ("none", True)):
        other = tmp_path / f"{kind}-{main}"
        tracker = build_tracker(kind, is_main=main, run_dir=other, config=raw, project="p", run_name="t")
        assert isinstance(tracker, NullTracker) and tracker.run_id is None
        tracker.log(TRAIN, step=1), tracker.summary(SUMMARY), tracker.finish()
        assert not other.exists()


def test_api_key_is_never_written_and_an_unreachable_server_means_offline(tmp_path):
    """In a fresh process: a key is set but the server cannot be reached -> offline, once; the key
    appears in no file under the run, the W&B folders, or the output."""
    script = textwrap.dedent(f"""
        import json, logging, sys
        from pathlib import Path
        logging.basicConfig(level=logging.WARNING)
        from resnet_scale.tracking.trackers import build_tracker
        raw = json.loads(Path(sys.argv[1]).read_text())  # not argv: W&B records the command line
        t = build_tracker("wandb", is_main=True, run_dir=Path(sys.argv[2]), config=raw, project="p",
                          entity=None, group=None, tags=[], run_name="k")
        print(type(t.get("wandb")).__name__)
        t.log({json.dumps(TRAIN)}, step=10)
        t.summary({{"final_accuracy": 0.5}})
        t.finish()
    """)
    raw = payload()
    raw["config"]["train"]["api_key"] = FAKE_KEY
    config_file = tmp_path / "in" / "config.json"
    config_file.parent.mkdir()
    config_file.write_text(json.dumps(raw))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_API_KEY=FAKE_KEY, WANDB_BASE_URL="http://127.0.0.1:9", PYTHONPATH=str(REPO),
               WANDB_CONFIG_DIR=str(tmp_path / "home"), WANDB_CACHE_DIR=str(tmp_path / "home"),
               WANDB_DATA_DIR=str(tmp_path / "home"))
    out = subprocess.run([sys.executable, "-c", script, str(config_file), str(tmp_path / "run")], env=env,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "WandbTracker"
    assert out.stderr.count("W&B is offline: cannot reach http://127.0.0.1:9") == 1, out.stderr
    assert "wandb sync" in out.stderr
    runs = find_offline_runs(tmp_path / "run")
    assert len(runs) == 1
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p != config_file]
    assert any(p.suffix == ".wandb" for p in files)
    for path in files:
        assert FAKE_KEY.encode() not in path.read_bytes(), path
    assert FAKE_KEY not in out.stdout + out.stderr


def test_wandb_mode_goes_offline_without_key_or_network(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.com login u password p\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    mode, why = wandb_mode()
    assert mode == "offline" and "WANDB_API_KEY is unset" in why
    netrc.write_text(f"machine 127.0.0.1 login user password {FAKE_KEY}\n")  # what `wandb login` writes
    mode, why = wandb_mode()
    assert mode == "offline" and why.startswith("cannot reach http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode() == ("offline", "WANDB_MODE=offline")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = build_tracker("wandb", is_main=True, run_dir=tmp_path / "r", config=payload(), project="p", run_name="t")
    assert isinstance(tracker, NullTracker) and not (tmp_path / "r").exists()


def test_missing_packages_and_unknown_kinds_are_clear_errors_on_every_rank(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    missing = {"wandb", "tensorboard"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    for main in (True, False):  # every rank stops, not only the main one
        for kind in ("wandb", "tensorboard", "tensorboard,wandb"):
            with pytest.raises(TrackingError, match=r"pip install 'resnet-scale\[(wandb|tensorboard)\]'.*--tracker "):
                build_tracker(kind, is_main=main, run_dir=tmp_path, config=payload(), project="p", run_name="t")
    with pytest.raises(TrackingError, match="not one of wandb, tensorboard, none"):
        build_tracker("wandb,mlflow", is_main=True, run_dir=tmp_path, config=payload(), project="p", run_name="t")
    assert not list(tmp_path.iterdir())  # nothing was written


def test_tracking_failures_never_stop_training(wandb_env, monkeypatch, tmp_path, caplog):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("server says no")

    monkeypatch.setattr(wandb, "init", broken_init)
    with caplog.at_level(logging.WARNING, logger="resnet_scale"):
        tracker = build_tracker("wandb", is_main=True, run_dir=tmp_path / "r", config=payload(), project="p",
                                run_name="t")
    assert isinstance(tracker, NullTracker)
    assert "server says no" in caplog.text and "training goes on without it" in caplog.text

    class BrokenRun:
        id = "x"

        def log(self, *a, **k):
            raise ConnectionError("gone")

    tracker = TrackerGroup([WandbTracker(BrokenRun())])
    tracker.log(TRAIN, step=1)  # warns, then goes quiet
    tracker.log(TRAIN, step=2)
    tracker.summary(SUMMARY), tracker.finish()
    assert caplog.text.count("W&B log failed") == 1


class FakeWriter:
    """What TensorBoardTracker calls of a SummaryWriter (the tests of the real one need tensorboard)."""

    def __init__(self, fail_after: int | None = None):
        self.scalars, self.texts, self.closed, self.fail_after = [], {}, False, fail_after

    def add_scalar(self, key, value, step):
        if self.fail_after is not None and len(self.scalars) >= self.fail_after:
            raise OSError("disk full")
        self.scalars.append((key, value, step))

    def add_text(self, key, text):
        self.texts[key] = text

    def close(self):
        self.closed = True


def test_tensorboard_tracker_writes_scalars_and_the_config():
    writer = FakeWriter()
    tracker = TrackerGroup([TensorBoardTracker(writer, build_tracker_config(payload()))])
    tracker.log(TEST, step=20)
    tracker.finish()
    assert ("test/accuracy", 0.45, 20) in writer.scalars and ("epoch", 1, 20) in writer.scalars
    assert '"block": "basic"' in writer.texts["config"] and writer.closed and tracker.run_id is None


def test_a_failing_tracker_is_dropped_with_one_warning_and_the_others_go_on(caplog, monkeypatch):
    """Two trackers; one fails at its second record: one warning line, it gets nothing more, the
    other gets every record. The W&B run id is what a checkpoint keeps, and a part without W&B
    carries the id it was resumed with."""
    monkeypatch.setattr(tracker_base, "_warned", set())
    broken, good = FakeWriter(fail_after=len(tracker_metrics(TRAIN))), FakeWriter()
    config = build_tracker_config(payload())
    group = TrackerGroup([TensorBoardTracker(broken, config), TensorBoardTracker(good, config)])
    with caplog.at_level(logging.WARNING, logger="resnet_scale"):
        for step in (1, 2, 3):
            group.log(TRAIN, step=step)
        group.finish()
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed) == 1 and "TensorBoard log failed (OSError: disk full)" in failed[0]
    assert {step for _, _, step in broken.scalars} == {1}
    assert [v for k, v, _ in good.scalars if k == "train/loss"] == [2.0, 2.0, 2.0] and good.closed

    class Run:
        id = "wb123"

    assert TrackerGroup([TensorBoardTracker(FakeWriter(), config), WandbTracker(Run())]).run_id == "wb123"
    assert TrackerGroup([TensorBoardTracker(FakeWriter(), config)], resume_id="wb123").run_id == "wb123"
    none = build_tracker("none", is_main=True, run_dir=Path("/nonexistent"), config={}, project="p", run_name="t",
                         resume_id="wb123")
    assert isinstance(none, NullTracker) and none.run_id == "wb123"


def test_each_backend_is_an_accelerate_tracker():
    """A backend works through Accelerate's own tracker API (a loop of the user's own)."""
    from accelerate import Accelerator

    writer = FakeWriter()
    accelerator = Accelerator(cpu=True, log_with=[TensorBoardTracker(writer, build_tracker_config(payload()))])
    accelerator.init_trackers("p", config={"lr": 0.1})
    accelerator.log({"train/loss": 2.0}, step=3)
    assert accelerator.get_tracker("tensorboard", unwrap=True) is writer
    assert ("train/loss", 2.0, 3) in writer.scalars and '"lr": 0.1' in writer.texts["config"]


def test_several_trackers_in_flags_files_and_old_configs(tmp_path):
    from resnet_scale.config import load_config_file

    assert Config.from_dict({"train": {"tracker": "wandb,tensorboard"}}).trackers() == ("wandb", "tensorboard")
    assert Config.from_dict({"train": {"tracker": ["tensorboard", "wandb"]}}).train.tracker == "tensorboard,wandb"
    old = tmp_path / "config.json"  # a run saved before --tracker took several names
    old.write_text(json.dumps({"config": {"train": {"tracker": "wandb"}}, "environment": {}}))
    cfg = load_config_file(old)
    assert cfg.trackers() == ("wandb",) and cfg.tracker() == "wandb"
    cfg.train.tracker = "none"
    assert cfg.trackers() == () and cfg.tracker() == "none"
    for bad, message in (("wandb,mlflow", "'mlflow' is not one of auto, wandb, tensorboard, none"),
                         ("none,wandb", "'auto' and 'none' stand alone")):
        cfg.train.tracker = bad
        with pytest.raises(ConfigError, match=message):
            cfg.validate()


def _tracking_flags_wired() -> bool:
    from resnet_scale.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    return all(f in train._option_string_actions for f in ("--tracker", "--run-group", "--tags", "--target-accuracy"))


@pytest.mark.multiprocess
@pytest.mark.skipif(not _tracking_flags_wired(), reason="resnet-scale train has no --tracker/--run-group yet")
def test_two_rank_run_creates_one_offline_wandb_run_and_none_creates_none(tmp_path):
    """torchrun's agent (tests/workers/fork_launch.py), 2 CPU ranks over gloo: exactly one W&B run (the main process's), holding the full
    config; --tracker none creates none; both write the local files."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_distributed import ranks
    from test_train_e2e import run_cli

    base = ["--data", "synthetic", "--layers", "1,1,1", "--image-size", "16", "--synthetic-train-samples", "96",
            "--synthetic-test-samples", "40", "--epochs", "1", "--batch-size", "32", "--log-every", "1", "--device", "cpu",
            "--output-dir", tmp_path / "runs"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_CONFIG_DIR=str(tmp_path / "home"), WANDB_CACHE_DIR=str(tmp_path / "home"),
               WANDB_DATA_DIR=str(tmp_path / "home"), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    wandb_flags = ["--tracker", "wandb", "--run-group", "g2", "--tags", "x,y", "--target-accuracy", "0.01"]
    for name, flags in (("wb", wandb_flags), ("none", ["--tracker", "none"])):
        out = run_cli(*base, "--run-name", name, *flags, env=env, cwd=tmp_path, launcher=ranks(2), timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        for local in ("config.json", "metrics.jsonl", "summary.json"):
            assert (tmp_path / "runs" / name / local).is_file()
    assert [p.parent.parent.name for p in tmp_path.rglob("offline-run-*")] == ["wb"]  # one run, main rank only
    (run,) = find_offline_runs(tmp_path / "runs" / "wb")
    stored = read_offline_run(run)
    saved = json.loads((tmp_path / "runs" / "wb" / "config.json").read_text())
    for section, values in saved["config"].items():
        assert stored["config"][section] == values, section
    assert stored["config"]["environment"] == saved["environment"] and stored["config"]["world_size"] == 2
    assert stored["group"] == "g2" and stored["tags"] == ["x", "y"]
    summary = json.loads((tmp_path / "runs" / "wb" / "summary.json").read_text())
    assert stored["summary"]["final_accuracy"] == summary["final_accuracy"]
    assert (summary["time_to_target_s"] is not None) == (summary["best_accuracy"] >= 0.01)
    assert any("train/loss" in row for row in stored["history"])
