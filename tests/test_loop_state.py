"""LoopState, every counter of the training loop in one dataclass: it round-trips through the
checkpoints of a real run holding exactly what the run had at each saved step, to_dict/from_dict
keep every field, and a loop_state.json with an unknown key or a value of the wrong type is refused
with one clear message before anything is loaded."""

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest

from resnet_scale.config import ConfigError
from resnet_scale.train.checkpoint import checkpoint_dirs
from resnet_scale.train.integrity import write_marker
from resnet_scale.train.state import LoopState

sys.path.insert(0, str(Path(__file__).parent))
from test_train_e2e import read_jsonl, run_cli  # noqa: E402

# 64 images in batches of 16: 4 steps per epoch, 8 in all. With --log-every 2 the train lines come at
# steps 2, 4, 6, 8; --checkpoint-every 3 saves after step 3 (its log interval half done), at the end of
# epoch 1 (step 4, after the test line) and after step 6.
ARGS = ("--data", "synthetic", "--depth", "8", "--image-size", "16", "--synthetic-train-samples", "64",
        "--synthetic-test-samples", "32", "--epochs", "2", "--batch-size", "16", "--deterministic",
        "--target-accuracy", "0.01", "--tracker", "none")
SAVING = ("--log-every", "2", "--checkpoint-every", "3", "--keep-checkpoints", "10")
#: step -> (epoch, epoch_step) a resumed run continues from
POSITIONS = {3: (0, 3), 4: (1, 0), 6: (1, 2)}
BATCH = 16

#: The keys of loop_state.json, in order. Checkpoints already written have them: do not change them.
KEYS = ["step", "epoch", "epoch_step", "best", "last_eval", "skipped", "time_to_target", "last_logged_step",
        "last_grad_norm", "train_time", "train_images", "elapsed", "window", "metrics_lines", "bad_steps",
        "tracker_run_id"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``saved``: the run with checkpoints; ``every``: the same run with a train line per step (the
    per-step values the checkpoints must hold between log lines)."""
    out = tmp_path_factory.mktemp("loop")
    saved = run_cli(*ARGS, *SAVING, "--output-dir", out, "--run-name", "saved")
    assert saved.returncode == 0, saved.stderr[-3000:]
    every = run_cli(*ARGS, "--log-every", "1", "--output-dir", out, "--run-name", "every")
    assert every.returncode == 0, every.stderr[-3000:]
    return out


def _expected(step: int, lines: list[dict], per_step: dict[int, dict], actual: LoopState) -> LoopState:
    """The state after ``step``, from the metrics lines written by then. The clocks are checked
    against the lines' times and then taken from ``actual``."""
    written = lines[:sum(1 for r in lines if r["step"] <= step)]  # the epoch-end save follows its test line
    train = [r for r in written if r["split"] == "train"]
    tests = [r for r in written if r["split"] == "test"]
    reached = [r["time_s"] for r in tests if r["accuracy"] >= 0.01]
    logged = train[-1]["step"]
    intervals = [b["step"] - a for a, b in zip([0] + [r["step"] for r in train], train)]
    assert actual.train_time == pytest.approx(sum(r["step_time_s"] * n for r, n in zip(train, intervals)), rel=1e-9)
    assert written[-1]["time_s"] < actual.elapsed
    assert all(actual.elapsed < r["time_s"] for r in lines[len(written):])
    if logged == step:  # the interval ended with a line: the window is empty
        window = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    else:  # one step into the next interval: that step's sums (its line in the ``every`` run)
        assert step - logged == 1
        one = per_step[step]
        assert actual.window["loss_sum"] == pytest.approx(one["loss"] * BATCH, rel=1e-12)
        window = {"loss_sum": actual.window["loss_sum"], "correct": one["accuracy"] * BATCH, "count": float(BATCH)}
    assert 0 <= actual.window["elapsed"] < actual.elapsed
    epoch, epoch_step = POSITIONS[step]
    return LoopState(
        step=step, epoch=epoch, epoch_step=epoch_step,
        best=max((r["accuracy"] for r in tests), default=0.0),
        last_eval={k: tests[-1][k] for k in ("loss", "accuracy", "samples")} if tests else None,
        skipped=0, time_to_target=reached[0] if reached else None, last_logged_step=logged,
        last_grad_norm=per_step[step]["grad_norm"],
        train_time=actual.train_time,
        train_images=sum(round(r["images_per_s"] * r["step_time_s"] * n) for r, n in zip(train, intervals)),
        elapsed=actual.elapsed, window={**window, "elapsed": actual.window["elapsed"]},
        metrics_lines=len(written), bad_steps=0, tracker_run_id=None,
    )


def test_every_checkpoint_holds_the_loop_state_the_run_had_at_its_step(runs):
    run = runs / "saved"
    lines = read_jsonl(run / "metrics.jsonl")
    per_step = {r["step"]: r for r in read_jsonl(runs / "every" / "metrics.jsonl") if r["split"] == "train"}
    for line in (r for r in lines if r["split"] == "train"):  # the two runs train identically
        assert line["grad_norm"] == per_step[line["step"]]["grad_norm"]
    checkpoints = checkpoint_dirs(run)
    assert [p.name for p in checkpoints] == ["step-000000003", "step-000000004", "step-000000006"]
    for checkpoint in checkpoints:
        saved = json.loads((checkpoint / "loop_state.json").read_text())
        assert list(saved) == KEYS
        state = LoopState.from_dict(saved)
        assert state.to_dict() == saved  # nothing lost or changed on the way in or out
        assert state == _expected(state.step, lines, per_step, state), checkpoint.name
    # The summary reports the state the run ended with.
    summary = json.loads((run / "summary.json").read_text())
    tests = [r for r in lines if r["split"] == "test"]
    reached = [r["time_s"] for r in tests if r["accuracy"] >= 0.01]
    assert summary["steps"] == 8 and summary["skipped_steps"] == 0 and summary["bad_steps"] == 0
    assert summary["final_accuracy"] == tests[-1]["accuracy"] and summary["final_test_loss"] == tests[-1]["loss"]
    assert summary["best_accuracy"] == max(r["accuracy"] for r in tests)
    assert summary["time_to_target_s"] == (reached[0] if reached else None)
    assert summary["tracker_run_id"] is None and summary["wall_time_s"] > lines[-1]["time_s"]


def _every_field_set() -> LoopState:
    return LoopState(step=17, epoch=3, epoch_step=5, best=0.75, last_eval={"loss": 0.9, "accuracy": 0.7, "samples": 360},
                     skipped=2, time_to_target=12.5, last_logged_step=15, last_grad_norm=1.25, train_time=30.5,
                     train_images=4096, elapsed=40.25,
                     window={"loss_sum": 3.5, "correct": 9.0, "count": 16.0, "elapsed": 0.5},
                     metrics_lines=9, bad_steps=1, tracker_run_id="abc123")


def test_to_dict_and_from_dict_keep_every_field():
    state = _every_field_set()
    for field in dataclasses.fields(LoopState):  # a field left at its default could be lost unseen
        assert getattr(state, field.name) != field.default, field.name
    assert list(state.to_dict()) == KEYS
    assert LoopState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    # Keys added over time may be missing from older checkpoints: they take their defaults.
    old = LoopState.from_dict({"step": 4, "epoch": 1, "epoch_step": 0, "metrics_lines": 3})
    assert (old.step, old.epoch, old.metrics_lines, old.bad_steps, old.tracker_run_id) == (4, 1, 3, 0, None)


@pytest.mark.parametrize("change, message", [
    ({"surprise": 1}, "unknown key(s) 'surprise'"),
    ({"step": "17"}, "step is '17', expected a count"),
    ({"skipped": True}, "skipped is True, expected a count"),
    ({"metrics_lines": -1}, "metrics_lines is -1, expected a count"),
    ({"best": None}, "best is None, expected a number"),
    ({"tracker_run_id": 5}, "tracker_run_id is 5, expected a string or null"),
    ({"last_eval": [0.9, 0.7]}, "last_eval is [0.9, 0.7], expected an object of numbers or null"),
    ({"window": {"loss_sum": 1.0}}, "window has the keys loss_sum, expected loss_sum, correct, count, elapsed"),
    ({"window": {"loss_sum": 1.0, "correct": 1.0, "count": "16", "elapsed": 0.1}}, "window is"),
    ({"window": None}, "without the window"),
], ids=["unknown-key", "text-count", "bool-count", "negative-count", "null-number", "number-id", "list-eval",
        "window-keys", "text-in-window", "no-window-mid-epoch"])
def test_from_dict_refuses_unknown_keys_and_wrong_types(change, message):
    saved = {**_every_field_set().to_dict(), **change}
    with pytest.raises(ConfigError, match="loop_state.json") as err:
        LoopState.from_dict(saved)
    assert message in str(err.value)
    missing = _every_field_set().to_dict()
    del missing["metrics_lines"]
    with pytest.raises(ConfigError, match="no metrics_lines"):
        LoopState.from_dict(missing)
    with pytest.raises(ConfigError, match="not an object"):
        LoopState.from_dict([1, 2])


def test_a_resume_from_a_bad_loop_state_is_refused_and_changes_nothing(runs, tmp_path):
    shutil.copytree(runs / "saved", tmp_path / "saved")
    (tmp_path / "saved" / "summary.json").unlink()  # a stopped run: a finished one is never resumed from PATH
    checkpoint = checkpoint_dirs(tmp_path / "saved")[0]
    saved = json.loads((checkpoint / "loop_state.json").read_text())
    (checkpoint / "loop_state.json").write_text(json.dumps({**saved, "surprise": 1}))
    write_marker(checkpoint, saved["step"])  # its checksums match: the loop state's own check refuses it
    before = {str(p): p.read_bytes() for p in sorted((tmp_path / "saved").rglob("*")) if p.is_file()}
    out = run_cli(*ARGS, *SAVING, "--resume", checkpoint)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert f"checkpoint {checkpoint} cannot be loaded" in out.stderr and "unknown key(s) 'surprise'" in out.stderr
    assert {str(p): p.read_bytes() for p in sorted((tmp_path / "saved").rglob("*")) if p.is_file()} == before
