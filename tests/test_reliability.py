"""Reliability beyond exact resume: non-finite losses, safe and corrupt checkpoints, time-based
checkpoints, SLURM requeue, the W&B run a resumed run continues, and elastic torchrun restarts."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from resnet_scale.train.checkpoint import EXIT_PREEMPTED, checkpoint_dirs, latest_checkpoint, resolve_resume
from resnet_scale.train.control import EXIT_NONFINITE, NonFiniteError, check_finite_weights
from resnet_scale.train.integrity import write_marker
from resnet_scale.train.run_dir import load_weights

sys.path.insert(0, str(Path(__file__).parent))
from test_resume import ARGS, DDP, _assert_same_run, _stop_at_step  # noqa: E402
from test_signals import _alive, _train_watched  # noqa: E402
from test_train_e2e import REPO, run_cli  # noqa: E402

TRAIN = [sys.executable, "-m", "resnet_scale", "train"]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_nonfinite_loss_skips_updates_then_stops_and_saves_only_finite_weights(tmp_path):
    # --lr 1e20: step 1 is fine, from step 2 on every forward overflows to NaN.
    out = run_cli(*ARGS, "--lr", "1e20", "--checkpoint-every", "1", "--output-dir", tmp_path, "--run-name", "nan")
    assert out.returncode == EXIT_NONFINITE, out.stderr[-2000:]
    assert "3 steps in a row (--max-bad-steps 3)" in out.stderr and "Traceback" not in out.stderr
    assert "step 2: the loss or gradient is not finite" in out.stderr  # warned before stopping
    run = tmp_path / "nan"
    assert not (run / "model.safetensors").exists() and not (run / "summary.json").exists()
    saved = checkpoint_dirs(run)
    assert saved, "the finite checkpoints before the stop are kept"
    for ckpt in saved:  # each one: finite weights AND finite BatchNorm statistics (put back per bad step)
        weights = load_weights(ckpt / "model.safetensors")
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(v == v and abs(v) != float("inf") for v in losses)  # no NaN metric line either


def test_nonfinite_weights_are_never_written():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    check_finite_weights(model, acc, "x")  # finite: passes
    model[1].running_var[0] = float("nan")  # a poisoned BatchNorm statistic counts too
    with pytest.raises(NonFiniteError, match="was not saved"):
        check_finite_weights(model, acc, "the checkpoint of step 7")


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    """A finished 1-epoch run with checkpoints; tests copy it before spoiling it."""
    out_dir = tmp_path_factory.mktemp("ckpt")
    out = run_cli(*ARGS, "--epochs", "1", "--output-dir", out_dir, "--run-name", "r")
    assert out.returncode == 0, out.stderr[-2000:]
    return out_dir


def _spoiled_copy(checkpointed_run, tmp_path):
    import shutil

    shutil.copytree(checkpointed_run, tmp_path, dirs_exist_ok=True)
    run = tmp_path / "r"
    (run / "summary.json").unlink()  # a run stopped early: what --resume is for
    return run, latest_checkpoint(run)


class _RunsCode:
    """A pickle that runs code when unpickled (what a malicious 'checkpoint' would carry)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("victim", ["random_states_0.pkl", "optimizer.bin", "custom_checkpoint_0.pkl"])
def test_a_crafted_pickle_checkpoint_is_refused_without_running_it(checkpointed_run, tmp_path, victim):
    run, ckpt = _spoiled_copy(checkpointed_run, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"state": _RunsCode(marker)}, ckpt / victim)
    write_marker(ckpt, int(ckpt.name.split("-")[1]))  # checksums are no signature: the marker is rewritten too
    before = _files(run)
    out = run_cli(*ARGS, "--epochs", "1", "--output-dir", tmp_path, "--run-name", "r", "--resume", "auto")
    assert out.returncode == 2 and "is refused" in out.stderr and "could run code" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not marker.exists()  # the payload never ran
    assert _files(run) == before  # and nothing of the run changed


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.bin"])
def test_a_truncated_checkpoint_is_refused_and_the_run_is_kept(checkpointed_run, tmp_path, victim):
    run, ckpt = _spoiled_copy(checkpointed_run, tmp_path)
    data = (ckpt / victim).read_bytes()
    (ckpt / victim).write_bytes(data[: len(data) // 2])
    before = _files(run)
    out = run_cli(*ARGS, "--epochs", "1", "--output-dir", tmp_path, "--run-name", "r", "--resume", ckpt)
    assert out.returncode == 2 and "truncated or altered" in out.stderr and victim in out.stderr, out.stderr[-2000:]
    assert "--resume PATH" in out.stderr and "Traceback" not in out.stderr
    assert _files(run) == before


def test_checkpoint_every_minutes_saves_mid_epoch(tmp_path):
    i = ARGS.index("--checkpoint-every")
    args = ARGS[:i] + ARGS[i + 2:]
    out = run_cli(*args, "--epochs", "1", "--checkpoint-every-minutes", "0.00001", "--keep-checkpoints", "50",
                  "--output-dir", tmp_path, "--run-name", "t")
    assert out.returncode == 0, out.stderr[-2000:]
    steps = [int(p.name.split("-")[1]) for p in checkpoint_dirs(tmp_path / "t")]
    assert steps == list(range(1, 7))  # the clock was always due: one checkpoint after every step


def test_sigterm_with_requeue_asks_slurm_to_requeue_the_job(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # stands in for SLURM's command; records how it was called
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cmd = [*TRAIN, *ARGS, "--requeue", "--output-dir", str(tmp_path), "--run-name", "q"]
    code, sent = _stop_at_step(cmd, "step 3/12")
    assert sent and code == EXIT_PREEMPTED
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert latest_checkpoint(tmp_path / "q") is not None


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    """Stopped, then resumed with --tracker wandb,tensorboard (wandb alone without tensorboard): the
    W&B run id the checkpoint kept is continued, the finished part sends the weights artifact, and
    TensorBoard writes on into the run's one folder."""
    import importlib.util

    from resnet_scale.tracking.offline import find_offline_runs, read_offline_run

    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    trackers = "wandb,tensorboard" if importlib.util.find_spec("tensorboard") else "wandb"
    i = ARGS.index("--tracker")
    args = ARGS[:i] + ARGS[i + 2:]
    cmd = [*TRAIN, *args, "--tracker", trackers, "--output-dir", str(tmp_path), "--run-name", "w"]
    code, sent = _stop_at_step(cmd, "step 3/12")
    assert sent and code == EXIT_PREEMPTED
    first_id = json.loads((latest_checkpoint(tmp_path / "w") / "loop_state.json").read_text())["tracker_run_id"]
    assert first_id
    out = run_cli(*args, "--tracker", trackers, "--output-dir", tmp_path, "--run-name", "w", "--resume", "auto")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "w" / "summary.json").read_text())["tracker_run_id"] == first_id
    parts = find_offline_runs(tmp_path / "w")
    assert len(parts) == 2 and all(p.name.endswith(first_id) for p in parts)  # `wandb sync` joins them
    stored = [read_offline_run(p) for p in parts]
    assert [len(s["artifacts"]) for s in stored] == [0, 1]  # the weights, once the run has them
    assert "model.safetensors" in stored[1]["artifacts"][0]["files"]
    if trackers != "wandb":
        assert len(list((tmp_path / "w" / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per part


def test_api_keys_never_reach_the_run_files(tmp_path, monkeypatch):
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    out = run_cli(*ARGS, "--epochs", "1", "--output-dir", tmp_path, "--run-name", "k")
    assert out.returncode == 0 and secret not in out.stderr + out.stdout
    assert all(secret.encode() not in data for data in _files(tmp_path / "k").values())


def _workers(pid: int) -> list[int]:
    """The training processes torchrun (``pid``) started."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"train.py" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
    return found


@pytest.mark.multiprocess
def test_torchrun_max_restarts_resumes_a_killed_worker_from_the_newest_checkpoint(tmp_path, straight_ddp_run):
    """One of 2 workers is SIGKILLed mid-run (as the OOM killer or a dying host would); torchrun
    restarts the group, which continues from the newest checkpoint by itself and ends exactly as
    an uninterrupted run: same metrics, same weights, same number of optimizer steps."""
    def torchrun(restarts):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "--max-restarts", str(restarts), str(REPO / "launch" / "train.py")]

    args = (*ARGS, *DDP, "--output-dir", tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*torchrun(1), *map(str, args), "--run-name", "killed"], stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env=env)
    killed, log = None, []
    for line in proc.stderr:
        log.append(line)
        if killed is None and "step 3/12" in line:  # the checkpoint of step 2 is complete
            workers = _workers(proc.pid)
            assert len(workers) == 2, workers
            killed = workers[-1]
            os.kill(killed, signal.SIGKILL)
    assert proc.wait(timeout=300) == 0, "".join(log)[-3000:]
    assert killed is not None
    text = "".join(log)
    assert "torchrun restart 1: resuming from" in text
    _assert_same_run(straight_ddp_run, tmp_path / "killed")  # the same flags, never interrupted
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["steps"] == json.loads((straight_ddp_run / "summary.json").read_text())["steps"] == 12


def test_resume_path_of_another_run_is_refused(checkpointed_run, tmp_path):
    ckpt = latest_checkpoint(checkpointed_run / "r")
    before = _files(checkpointed_run)
    out = run_cli(*ARGS, "--output-dir", tmp_path, "--run-name", "other", "--resume", ckpt)
    assert out.returncode == 2 and "is a checkpoint of run 'r', not of --run-name 'other'" in out.stderr
    assert _files(checkpointed_run) == before and not (tmp_path / "other").exists()


def test_a_process_killed_while_saving_leaves_the_previous_checkpoint_as_newest(tmp_path):
    """SIGKILL lands while save_state writes the second checkpoint (a ResNet-50: ~190 MB of model
    and momentum to write, so the window is wide); --resume auto then takes the first one."""
    args = ["--data", "synthetic", "--block", "bottleneck", "--depth", "50", "--image-size", "16",
            "--synthetic-train-samples", "8", "--synthetic-test-samples", "4", "--batch-size", "2", "--epochs", "5",
            "--checkpoint-every", "1", "--tracker", "none", "--output-dir", str(tmp_path), "--run-name", "k"]
    half = tmp_path / "k" / "checkpoints" / ".tmp-step-000000002"

    def kill_during_the_save(pid, _stderr):
        deadline = time.monotonic() + 300
        while not half.exists() and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.002)
        os.killpg(pid, signal.SIGKILL)

    _train_watched(args, kill_during_the_save)
    assert half.exists(), "the kill did not land during the save"
    first = tmp_path / "k" / "checkpoints" / "step-000000001"
    assert latest_checkpoint(tmp_path / "k") == first and (first / "COMPLETE").is_file()
    assert resolve_resume("auto", tmp_path / "k") == first
