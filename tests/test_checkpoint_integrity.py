"""Checkpoint integrity: the COMPLETE marker records the size and sha256 of every file of a
checkpoint; a resume checks them before anything loads. A flipped byte in tensor data (which every
loader takes without complaint) makes ``--resume auto`` fall back to the newest intact checkpoint,
or refuse when there is none, and ``--resume PATH`` refuse. A refused pickle says what it asked for."""

import hashlib
import json
import logging
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from resnet_scale.config import ConfigError
from resnet_scale.train.checkpoint import checkpoint_dirs, resolve_resume, save_checkpoint, verify_checkpoint_files
from resnet_scale.train.run_dir import load_weights
from resnet_scale.train.state import LoopState

sys.path.insert(0, str(Path(__file__).parent))
from test_bad_input import _refused as _error_line  # noqa: E402
from test_bad_input import _tree  # noqa: E402
from test_resume import _metrics  # noqa: E402
from test_train_e2e import REPO, run_cli  # noqa: E402

ARGS = ("--data", "synthetic", "--depth", "8", "--image-size", "16", "--synthetic-train-samples", "32",
        "--synthetic-test-samples", "16", "--batch-size", "8", "--max-steps", "6", "--log-every", "1",
        "--checkpoint-every", "2", "--keep-checkpoints", "3", "--deterministic", "--tracker", "none")


def _step(n: int) -> str:
    return f"step-{n:09d}"


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """``r``: a 6-step run with checkpoints at steps 2 and 4, left as a kill after step 5 leaves it;
    ``straight``: the final weights and metrics of the same run uninterrupted."""
    out = tmp_path_factory.mktemp("integrity")
    done = run_cli(*ARGS, "--output-dir", out, "--run-name", "r")
    assert done.returncode == 0, done.stderr[-3000:]
    run, straight = out / "r", out / "straight"
    straight.mkdir()
    shutil.move(run / "model.safetensors", straight / "model.safetensors")
    shutil.copy(run / "metrics.jsonl", straight / "metrics.jsonl")
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / _step(6))
    assert [p.name for p in checkpoint_dirs(run)] == [_step(2), _step(4)]
    return out


def _copy(stopped: Path, tmp_path: Path) -> Path:
    shutil.copytree(stopped / "r", tmp_path / "r")
    return tmp_path / "r"


def _flip_tensor_byte(path: Path) -> None:
    """Flip the lowest bit of a byte in the middle of a file's tensor data: its structure (header,
    zip records) stays valid, so safetensors and torch.load read it without complaint."""
    data = bytearray(path.read_bytes())
    if path.suffix == ".safetensors":  # 8-byte header length, JSON header, then the tensors
        start, end = 8 + int.from_bytes(data[:8], "little"), len(data)
    else:  # torch's zip format stores each tensor uncompressed in a record of its own; take the largest
        with zipfile.ZipFile(path) as z:
            info = max(z.infolist(), key=lambda i: i.file_size)
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
        start = info.header_offset + 30 + name_len + extra_len
        end = start + info.file_size
    data[(start + end) // 2] ^= 1
    path.write_bytes(bytes(data))
    if path.suffix == ".safetensors":  # the damage is silent to the loaders
        load_weights(path)
    else:
        verify_checkpoint_files(path.parent)


def test_every_file_of_a_checkpoint_is_recorded_in_its_marker(stopped):
    for checkpoint in checkpoint_dirs(stopped / "r"):
        record = json.loads((checkpoint / "COMPLETE").read_text())
        files = sorted(p.name for p in checkpoint.iterdir() if p.name != "COMPLETE")
        assert "loop_state.json" in files and "optimizer.bin" in files and "model.safetensors" in files
        assert record["step"] == int(checkpoint.name.split("-")[1]) and record["algorithm"] == "sha256"
        assert sorted(record["files"]) == files
        for name in files:
            data = (checkpoint / name).read_bytes()
            assert record["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_flipped_byte_in_the_newest_checkpoint_resumes_from_the_one_before(stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    _flip_tensor_byte(run / "checkpoints" / _step(4) / "model.safetensors")
    out = run_cli(*ARGS, "--output-dir", tmp_path, "--run-name", "r", "--resume", "auto")
    assert out.returncode == 0, out.stderr[-3000:]
    said = [line for line in out.stderr.splitlines() if "damaged" in line]
    assert len(said) == 1, out.stderr[-3000:]
    assert f"checkpoint {_step(4)} is damaged (model.safetensors differs" in said[0]
    assert f"resuming from {_step(2)}, the newest intact one" in said[0]
    # It trained from step 2: the same metrics and weights as the run that was never stopped.
    assert _metrics(run) == _metrics(stopped / "straight")
    a, b = load_weights(run / "model.safetensors"), load_weights(stopped / "straight" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in checkpoint_dirs(run)] == [_step(2), _step(4), _step(6)]  # step 4 saved again, intact
    assert resolve_resume("auto", run) == run / "checkpoints" / _step(6)


def test_a_flipped_byte_in_optimizer_state_is_found_and_skipped(stopped, tmp_path, caplog):
    run = _copy(stopped, tmp_path)
    _flip_tensor_byte(run / "checkpoints" / _step(4) / "optimizer.bin")
    with caplog.at_level(logging.WARNING, logger="resnet_scale"):
        assert resolve_resume("auto", run) == run / "checkpoints" / _step(2)
    said = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(said) == 1 and "optimizer.bin differs from the file saved" in said[0], said


def test_resume_auto_refuses_when_no_checkpoint_is_intact_and_changes_nothing(stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    _flip_tensor_byte(run / "checkpoints" / _step(4) / "model.safetensors")
    _flip_tensor_byte(run / "checkpoints" / _step(2) / "optimizer.bin")
    before = _tree(tmp_path)
    out = run_cli(*ARGS, "--output-dir", tmp_path, "--run-name", "r", "--resume", "auto")
    _error_line(out, "no intact checkpoint", f"{_step(4)} (model.safetensors differs",
                f"{_step(2)} (optimizer.bin differs", "Nothing was changed")
    assert _tree(tmp_path) == before


def test_resume_path_of_a_damaged_checkpoint_is_refused(stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    damaged = run / "checkpoints" / _step(4)
    _flip_tensor_byte(damaged / "optimizer.bin")
    before = _tree(tmp_path)
    out = run_cli(*ARGS, "--output-dir", tmp_path, "--run-name", "r", "--resume", damaged)
    _error_line(out, f"--resume {damaged}: the checkpoint is damaged (optimizer.bin differs", "Nothing was loaded")
    assert _tree(tmp_path) == before


def test_checkpoints_without_checksums_are_accepted_with_a_warning(stopped, tmp_path, caplog):
    run = _copy(stopped, tmp_path)
    for checkpoint in checkpoint_dirs(run):  # the marker older versions wrote
        (checkpoint / "COMPLETE").write_text(f"step {int(checkpoint.name.split('-')[1])}\n")
    newest = run / "checkpoints" / _step(4)
    with caplog.at_level(logging.WARNING, logger="resnet_scale"):
        assert resolve_resume("auto", run) == newest
        assert resolve_resume(str(newest), run) == newest
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"checkpoint {newest} has no checksums (saved by an older resnet-scale), not verified"] * 2
    # Unverified, they still get the structural check of every file before anything loads.
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ConfigError, match="model.safetensors is refused: it is truncated or corrupt"):
        verify_checkpoint_files(newest)


def test_missing_extra_resized_and_altered_files_are_each_named(stopped, tmp_path):
    from resnet_scale.train.integrity import Damaged, check_files, write_marker

    original = stopped / "r" / "checkpoints" / _step(4)
    checkpoint = tmp_path / _step(4)
    shutil.copytree(original, checkpoint)
    assert check_files(checkpoint) is True
    cases = [
        (lambda: (checkpoint / "random_states_0.pkl").unlink(), "random_states_0.pkl is missing"),
        (lambda: (checkpoint / "random_states_1.pkl").write_bytes(b"x"), "random_states_1.pkl was not there"),
        (lambda: (checkpoint / "loop_state.json").write_text("{}"), "loop_state.json is 2 bytes"),
        (lambda: (checkpoint / "COMPLETE").write_text("done\n"), "COMPLETE marker is not one resnet-scale writes"),
        (lambda: (checkpoint / "COMPLETE").write_text(json.dumps(
            {"step": 4, "algorithm": "sha256", "files": {"../../x": {"bytes": 1, "sha256": "0"}}})),
         "names a file outside the checkpoint"),
    ]
    for spoil, message in cases:
        shutil.rmtree(checkpoint)
        shutil.copytree(original, checkpoint)
        spoil()
        with pytest.raises(Damaged, match=message):
            check_files(checkpoint)
    # Files in subfolders (DeepSpeed writes pytorch_model/...) count like the others.
    folder = tmp_path / "nested"
    (folder / "pytorch_model").mkdir(parents=True)
    (folder / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(os.urandom(1000))
    (folder / "latest").write_text("pytorch_model")
    write_marker(folder, 7)
    assert sorted(json.loads((folder / "COMPLETE").read_text())["files"]) == [
        "latest", "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert check_files(folder) is True
    part = folder / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(part.read_bytes())
    data[500] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(Damaged, match="pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt differs"):
        check_files(folder)


def test_a_save_after_resuming_from_an_older_checkpoint_keeps_itself(stopped, tmp_path):
    """--keep-checkpoints 1 while a newer (damaged, skipped) checkpoint is still there: the one
    just saved is never the one pruned."""
    from accelerate import Accelerator

    run = _copy(stopped, tmp_path)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    model, _ = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    saved = save_checkpoint(accelerator, run, 3, LoopState(step=3), keep=1)
    assert saved == run / "checkpoints" / _step(3) and checkpoint_dirs(run) == [saved]
    from resnet_scale.train.integrity import check_files

    assert check_files(saved) is True


class _Calls:
    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("payload, named", [
    (lambda marker: torch.save({"state": _Calls(os.system, f"touch {marker}")}, marker.parent / "c" / "opt.bin"),
     "it asks to load posix.system, which only a full unpickle could build and which could run code"),
    (lambda marker: torch.save({"state": _Calls(eval, "1")}, marker.parent / "c" / "opt.bin"),
     "it asks to load eval, which"),
    (lambda marker: (marker.parent / "c" / "opt.bin").write_bytes(
        pickle.dumps(_Calls(os.system, f"touch {marker}"), protocol=4)),
     "it holds pickle opcode 149 that the safe unpickler does not run"),
], ids=["os.system", "eval", "raw-pickle"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_refused_pickle_says_what_it_asked_for_in_one_line(tmp_path, payload, named):
    (tmp_path / "c").mkdir()
    marker = tmp_path / "pwned"
    payload(marker)
    with pytest.raises(ConfigError) as err:
        verify_checkpoint_files(tmp_path / "c")
    message = str(err.value)
    assert message.startswith(f"checkpoint file {tmp_path / 'c' / 'opt.bin'} is refused: {named}"), message
    assert "\n" not in message and "\x1b" not in message and len(message) < 500
    for advice in ("weights_only", "will likely succeed", "add_safe_globals", "allowlist"):
        assert advice not in message, message
    assert not marker.exists()


@pytest.mark.multiprocess
def test_every_rank_resumes_from_the_same_checkpoint_or_refuses_alike(stopped, tmp_path):
    """Two ranks over gloo: the main process checks the files and tells the other one what it
    decided (one warning, not one per rank); a refusal reaches every rank, none waits forever."""
    from test_distributed import free_port

    one = _copy(stopped, tmp_path / "one")
    _flip_tensor_byte(one / "checkpoints" / _step(4) / "model.safetensors")
    none = _copy(stopped, tmp_path / "none")
    _flip_tensor_byte(none / "checkpoints" / _step(4) / "model.safetensors")
    _flip_tensor_byte(none / "checkpoints" / _step(2) / "random_states_0.pkl")
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "workers" / "resume_choice.py"),
                          str(free_port()), "auto", str(one), str(none)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1",  # the package of this checkout
                              "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    assert out.returncode == 0, out.stderr[-3000:]
    said = out.stdout.splitlines()
    refused = f"refused: no intact checkpoint in {none / 'checkpoints'}: checkpoints {_step(4)} (model.safetensors"
    by_rank = {r: [line.split(": ", 1)[1] for line in said if line.startswith(f"rank {r}: ")] for r in (0, 1)}
    assert by_rank[0] == by_rank[1], said
    assert by_rank[0][0] == str(one / "checkpoints" / _step(2)) and by_rank[0][1].startswith(refused), said
    assert len([line for line in out.stderr.splitlines() if "is damaged" in line]) == 1, out.stderr[-3000:]
