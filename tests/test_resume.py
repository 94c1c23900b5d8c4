"""Checkpoints and exact resume: a run stopped by SIGTERM mid-epoch and resumed with
--resume auto gives the same metrics for every step and the same final weights."""

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from resnet_scale.train.checkpoint import EXIT_PREEMPTED, checkpoint_dirs, latest_checkpoint
from resnet_scale.train.run_dir import load_weights

sys.path.insert(0, str(Path(__file__).parent))
from test_train_e2e import FORK, REPO, run_cli  # noqa: E402

ARGS = ("--data", "synthetic", "--depth", "8", "--image-size", "16", "--synthetic-train-samples", "96",
        "--synthetic-test-samples", "32", "--epochs", "2", "--batch-size", "16", "--log-every", "1",
        "--deterministic", "--checkpoint-every", "2", "--tracker", "none")


# 2-rank DDP, logging every 3 steps: the checkpoints of steps 2 and 4 hold a half-full metric window,
# which a resumed run must count once over the ranks (each rank's part, not rank 0's twice).
DDP = ("--distributed", "ddp", "--log-every", "3")


def _metrics(run):
    return [{k: v for k, v in json.loads(line).items() if "time" not in k and "per_s" not in k}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _stop_at_step(cmd, step_text):
    """Run ``cmd`` (``python -m resnet_scale train ...`` or a ``ranks(2)`` launch, from the tests' CLI
    server unless RESNET_SCALE_TESTS_NO_FORK=1) and SIGTERM its whole process group once it logs
    ``step_text``: (exit status, whether it was sent)."""
    from _cli_server import fork_launch_args, run_module
    from test_signals import _wait_for

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # as run_cli (the same threads: same float sums)
    sent = []

    def watch(pid, stderr):
        if _wait_for(pid, Path(stderr), step_text):
            os.killpg(pid, signal.SIGTERM)
            sent.append(True)

    cmd = [str(c) for c in cmd]
    launch = fork_launch_args(cmd)
    if FORK and (launch or cmd[1:3] == ["-m", "resnet_scale"]):
        out = run_module(cmd[3 + 2 * bool(launch and launch[1]):], env=env, cwd=REPO, timeout=300, watch=watch,
                         launch=launch)
        return out.returncode, bool(sent)
    with tempfile.TemporaryDirectory() as tmp:
        err = Path(tmp, "stderr")
        with open(err, "w") as sink:
            proc = subprocess.Popen(cmd, stderr=sink, cwd=REPO, env=env, start_new_session=True)
            watch(proc.pid, err)
            return proc.wait(timeout=300), bool(sent)


def _assert_same_run(a, b):
    assert _metrics(a) == _metrics(b)
    wa, wb = load_weights(a / "model.safetensors"), load_weights(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigterm_mid_epoch_then_resume_auto_is_exact(tmp_path):
    assert run_cli(*ARGS, "--output-dir", tmp_path, "--run-name", "straight").returncode == 0
    cmd = [sys.executable, "-m", "resnet_scale", "train", *ARGS, "--output-dir", str(tmp_path), "--run-name", "cut"]
    code, sent = _stop_at_step(cmd, "step 3/12")
    assert sent and code == EXIT_PREEMPTED
    assert latest_checkpoint(tmp_path / "cut").name >= "step-000000003"  # saved at the step it stopped
    assert not (tmp_path / "cut" / "summary.json").exists()
    resumed = run_cli(*ARGS, "--output-dir", tmp_path, "--run-name", "cut", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(tmp_path / "straight", tmp_path / "cut")
    assert len(checkpoint_dirs(tmp_path / "cut")) == 2  # --keep-checkpoints 2


@pytest.mark.multiprocess
@pytest.mark.parametrize("engine", [DDP, ("--zero-stage", "2"),
                                    ("--ds-config", str(REPO / "ds_configs" / "zero3_offload.json"))],
                         ids=["ddp", "zero2", "zero3-offload"])
def test_two_rank_sigterm_then_resume_is_exact(tmp_path, engine, request):
    from test_distributed import ranks

    torchrun = ranks(2)
    args = (*ARGS, *engine)
    if engine[0] == "--distributed":  # DDP: the session's uninterrupted run (tests/conftest.py)
        straight = request.getfixturevalue("straight_ddp_run")
    else:
        assert run_cli(*args, "--output-dir", tmp_path, "--run-name", "straight", launcher=torchrun).returncode == 0
        straight = tmp_path / "straight"
    code, sent = _stop_at_step([*torchrun, *args, "--output-dir", str(tmp_path), "--run-name", "cut"], "step 3/12")
    assert sent and code != 0 and latest_checkpoint(tmp_path / "cut") is not None
    resumed = run_cli(*args, "--output-dir", tmp_path, "--run-name", "cut", "--resume", "auto", launcher=torchrun)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(straight, tmp_path / "cut")


def test_an_interrupted_checkpoint_write_is_never_picked(tmp_path):
    run = tmp_path / "r"
    assert run_cli(*ARGS, "--output-dir", tmp_path, "--run-name", "r", "--epochs", "1").returncode == 0
    good = latest_checkpoint(run)
    half = run / "checkpoints" / ".tmp-step-000000099"  # what a kill during save_state leaves
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    unmarked = run / "checkpoints" / "step-000000098"  # renamed without its COMPLETE marker
    unmarked.mkdir()
    assert latest_checkpoint(run) == good


def test_resume_refusals_keep_what_was_saved(tmp_path):
    out = run_cli(*ARGS, "--output-dir", tmp_path, "--resume", "auto")
    assert out.returncode == 2 and "give --run-name" in out.stderr
    bogus = tmp_path / "nope"
    bogus.mkdir()
    out = run_cli(*ARGS, "--output-dir", tmp_path, "--resume", bogus)
    assert out.returncode == 2 and "not a complete checkpoint" in out.stderr
    # A finished run without checkpoints: --resume auto (its --max-steps taken from its config.json) has
    # nothing to do, says so and changes nothing; without --resume the name is refused.
    assert run_cli(*ARGS[:-4], "--tracker", "none", "--output-dir", tmp_path, "--run-name", "done",
                   "--max-steps", "2").returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "done").iterdir() if p.is_file()}
    out = run_cli(*ARGS[:-4], "--tracker", "none", "--output-dir", tmp_path, "--run-name", "done", "--resume", "auto")
    assert out.returncode == 0 and "is finished (2 steps" in out.stderr, out.stderr[-2000:]
    out = run_cli(*ARGS[:-4], "--tracker", "none", "--output-dir", tmp_path, "--run-name", "done")
    assert out.returncode == 2 and "already holds a run" in out.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "done").iterdir() if p.is_file()} == before
