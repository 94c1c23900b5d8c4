"""Signals and refusals with several processes: Ctrl-C (SIGINT) stops like SIGTERM (the step
finishes, a checkpoint is saved, exit 75); a second Ctrl-C stops at once (exit 130) and leaves
every complete checkpoint as it was; a Ctrl-C before training is one line and exit 130. Under
torchrun, a refusal that only the main process sees ends every process with one line, and a
Ctrl-C gives one checkpoint and one "preempted" line."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from resnet_scale.train.checkpoint import EXIT_PREEMPTED, checkpoint_dirs, latest_checkpoint, verify_checkpoint_files

sys.path.insert(0, str(Path(__file__).parent))
from test_train_e2e import FORK, REPO, run_cli  # noqa: E402

# 64 images, batch 8: 8 steps in one epoch; a checkpoint every 2 steps.
ARGS = ("--data", "synthetic", "--layers", "1,1,1", "--image-size", "8", "--synthetic-train-samples", "64",
        "--synthetic-test-samples", "16", "--batch-size", "8", "--epochs", "1", "--log-every", "1",
        "--checkpoint-every", "2", "--deterministic", "--tracker", "none")
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a program Ctrl-C stopped
OUR_FRAMES = f'File "{REPO / "resnet_scale"}'  # a traceback through the package's own code


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _wait_for(pid: int, stderr: Path, text: str, timeout: float = 300) -> bool:
    """Until ``text`` is in the process's stderr (True) or it has ended (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stderr.exists() and text in stderr.read_text():
            return True
        if not _alive(pid):
            return text in stderr.read_text() if stderr.exists() else False
        time.sleep(0.01)
    return False


def _train_watched(argv, watch, *, fresh: bool = False) -> subprocess.CompletedProcess:
    """``python -m resnet_scale train ARGV`` (a child of the tests' CLI server unless ``fresh``: a new
    interpreter); ``watch(pid, stderr_path)`` runs meanwhile and may signal the process."""
    argv = [str(a) for a in argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    if FORK and not fresh:
        from _cli_server import run_module

        return run_module(["train", *argv], env=env, cwd=REPO, timeout=300, watch=watch)
    with tempfile.TemporaryDirectory() as tmp:
        err = Path(tmp, "stderr")
        with open(err, "w") as sink:
            proc = subprocess.Popen([sys.executable, "-m", "resnet_scale", "train", *argv], stdout=subprocess.DEVNULL,
                                    stderr=sink, cwd=REPO, env=env, start_new_session=True)
            try:
                watch(proc.pid, err)
                proc.wait(timeout=300)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return subprocess.CompletedProcess(proc.args, proc.returncode, "", err.read_text())


def _lines(text: str, start: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(start)]


def _let_handlers_run():
    for _ in range(100):  # Python runs a signal's handler between bytecodes of the main thread
        time.sleep(0.001)


def test_a_second_ctrl_c_waits_while_a_checkpoint_is_renamed():
    """In this process: the first Ctrl-C only asks the loop to stop; a second one inside
    uninterrupted() (where save_checkpoint names the finished checkpoint and prunes old ones) takes
    effect when the block is done, not halfway. train() called from Python (not the CLI) gets a
    KeyboardInterrupt then, instead of the process ending."""
    from resnet_scale.train.signals import StopFlag, uninterrupted

    flag = StopFlag().install()
    done = []
    try:
        os.kill(os.getpid(), signal.SIGINT)
        _let_handlers_run()
        assert flag.requested
        with pytest.raises(KeyboardInterrupt):
            with uninterrupted():
                os.kill(os.getpid(), signal.SIGINT)
                _let_handlers_run()
                done.append("renamed")
        assert done == ["renamed"]
    finally:
        flag.restore()


def test_ctrl_c_finishes_the_step_saves_a_checkpoint_and_exits_75(tmp_path):
    sent = []

    def ctrl_c_at_step_3(pid, stderr):
        if _wait_for(pid, stderr, "step 3/8") and _alive(pid):
            os.kill(pid, signal.SIGINT)
            sent.append(pid)

    out = _train_watched([*ARGS, "--output-dir", tmp_path, "--run-name", "r"], ctrl_c_at_step_3)
    assert sent, out.stderr[-3000:]
    assert out.returncode == EXIT_PREEMPTED, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "KeyboardInterrupt" not in out.stderr
    assert len(_lines(out.stderr, "resnet-scale: Ctrl-C: finishing this step and saving a checkpoint")) == 1
    [preempted] = _lines(out.stderr, "resnet-scale train: preempted: saved")
    run = tmp_path / "r"
    newest = latest_checkpoint(run)
    assert newest is not None and newest.name >= "step-000000003" and str(newest) in preempted
    assert not (run / "summary.json").exists()
    resumed = run_cli(*ARGS, "--output-dir", tmp_path, "--run-name", "r", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "summary.json").exists()


def test_a_second_ctrl_c_during_a_save_stops_at_once_and_keeps_every_complete_checkpoint(tmp_path):
    """The first Ctrl-C lands at step 3 (step 2's checkpoint is complete), the second while the
    checkpoint of the stop is being written: exit 130 at once; step 2's files are byte-identical,
    the half-written folder is never taken for a checkpoint."""
    run = tmp_path / "r"
    half = run / "checkpoints" / ".tmp-step-000000004"
    before: dict[str, bytes] = {}
    sent = []

    def ctrl_c_twice(pid, stderr):
        if not _wait_for(pid, stderr, "step 3/8"):
            return
        step2 = run / "checkpoints" / "step-000000002"
        before.update({str(p.relative_to(step2)): p.read_bytes() for p in step2.rglob("*") if p.is_file()})
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 120
        while not half.exists() and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.0005)
        if half.exists() and _alive(pid):
            os.kill(pid, signal.SIGINT)
            sent.append(pid)

    out = _train_watched([*ARGS, "--output-dir", tmp_path, "--run-name", "r"], ctrl_c_twice)
    assert sent, f"the second Ctrl-C did not land during the save: {out.stderr[-3000:]}"
    assert out.returncode == EXIT_INTERRUPTED, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert len(_lines(out.stderr, "resnet-scale train: interrupted again (Ctrl-C): stopped at once")) == 1
    assert not _lines(out.stderr, "resnet-scale train: preempted")
    step2 = run / "checkpoints" / "step-000000002"
    assert before and {str(p.relative_to(step2)): p.read_bytes() for p in step2.rglob("*") if p.is_file()} == before
    done = checkpoint_dirs(run)
    assert done and all(p.name.startswith("step-") for p in done)  # the half-written folder is not one
    assert latest_checkpoint(run) in (step2, run / "checkpoints" / "step-000000004")
    for ckpt in done:  # whatever is complete loads
        verify_checkpoint_files(ckpt)


def test_ctrl_c_before_training_is_one_line_and_exit_130(tmp_path):
    """Ctrl-C while Python still imports torch (a new interpreter; libtorch is being mapped in):
    one line, exit 130, no traceback, no run folder."""
    def ctrl_c_while_importing(pid, stderr):
        deadline = time.monotonic() + 120
        while _alive(pid) and time.monotonic() < deadline:
            try:
                maps = Path(f"/proc/{pid}/maps").read_text()
            except OSError:  # it has ended
                return
            if "libtorch" in maps:
                os.kill(pid, signal.SIGINT)
                return
            time.sleep(0.002)

    out = _train_watched([*ARGS, "--output-dir", tmp_path / "out", "--run-name", "r"], ctrl_c_while_importing,
                         fresh=True)
    assert out.returncode == EXIT_INTERRUPTED, out.stderr[-3000:]
    assert out.stderr.splitlines() == ["resnet-scale train: interrupted (Ctrl-C) before training started; "
                                       "nothing was trained."]
    assert not (tmp_path / "out" / "r").exists()


# -- several processes ------------------------------------------------------------------------------

def _torchrun(*options):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *options,
            str(REPO / "launch" / "train.py")]


@pytest.mark.multiprocess
def test_a_name_collision_seen_by_the_main_process_only_stops_every_rank_with_one_line(tmp_path):
    """Only the main process creates the run folder, so only it sees that the folder holds a run;
    the other rank used to wait in a barrier and die with gloo's "Connection closed by peer". torchrun
    looks at its workers every 2 s here (not 0.1 s), so both end on their own before it stops the
    other one, and its report shows how each ended."""
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "config.json").write_text("{}\n")
    out = run_cli(*ARGS, "--max-steps", "2", "--output-dir", tmp_path, "--run-name", "taken",
                  launcher=_torchrun("--monitor-interval", "2"))
    assert out.returncode != 0
    [error] = _lines(out.stderr, "resnet-scale train: error:")  # said once, by the main process
    assert f"run folder {taken} already holds a run" in error
    assert out.stderr.count("exitcode  : 2 ") == 2, out.stderr[-3000:]  # both ranks refused, with status 2
    assert "Connection closed by peer" not in out.stderr and "gloo" not in out.stderr.lower()
    assert OUR_FRAMES not in out.stderr and "[rank" not in out.stderr  # no worker traceback
    assert "terminate called" not in out.stderr  # no rank aborted on its way out
    assert [p.name for p in taken.iterdir()] == ["config.json"] and (taken / "config.json").read_text() == "{}\n"


@pytest.mark.multiprocess
def test_ctrl_c_under_torchrun_saves_one_checkpoint_and_says_preempted_once(tmp_path):
    """Ctrl-C in a terminal reaches torchrun only (its workers run in sessions of their own); torchrun
    passes SIGINT to each worker, which finish the step, save together and exit 75. torchrun itself
    exits 1 (it re-raises its SignalException whatever the workers did)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [*_torchrun(), *map(str, ARGS), "--output-dir", str(tmp_path), "--run-name", "r"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env, start_new_session=True)
    log, sent = [], False
    for line in proc.stderr:
        log.append(line)
        if not sent and "step 3/8" in line:
            os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: torchrun's process group
            sent = True
    code = proc.wait(timeout=300)
    text = "".join(log)
    assert sent, text[-3000:]
    assert code == 1, text[-3000:]  # torchrun's own status (docs/reliability.md)
    assert len(_lines(text, "resnet-scale: Ctrl-C: finishing this step")) == 1
    [preempted] = _lines(text, "resnet-scale train: preempted: saved")
    assert OUR_FRAMES not in text and "[rank" not in text and "KeyboardInterrupt" not in text
    assert "terminate called" not in text
    newest = latest_checkpoint(tmp_path / "r")
    assert newest is not None and newest.name >= "step-000000003" and str(newest) in preempted
    verify_checkpoint_files(newest)
