"""Bad input through the real CLI (``python -m resnet_scale train``): a truncated data file, images of the
wrong shape, labels out of range, an empty data set, an unwritable --output-dir, unknown or conflicting
flags. Each one exits with status 2 and ONE message that says what was wrong and what to do, with no
traceback, and every file saved before (an earlier run in the same --output-dir) stays byte-identical.

(Corrupt and truncated checkpoints are proven in test_reliability.py / test_resume.py.)
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _fixtures_data as fx  # noqa: E402
from test_train_e2e import run_cli  # noqa: E402

# Tiny settings: every case here is refused before the first step.
TINY = ("--layers", "1,1,1", "--image-size", "16", "--max-steps", "1", "--batch-size", "4",
        "--tracker", "none", "--no-download")


def _tree(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every file and folder under ``root``: (bytes, or None for a folder; mtime in ns)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def _earlier_run(out: Path) -> Path:
    """``out/earlier``: the files a finished run leaves (its contents do not matter, only that they stay)."""
    run = out / "earlier"
    (run / "checkpoints" / "step-4").mkdir(parents=True)
    (run / "config.json").write_text('{"config": {"model": {"block": "basic"}}}\n')
    (run / "metrics.jsonl").write_text('{"step": 4, "split": "test", "accuracy": 0.5}\n')
    (run / "summary.json").write_text('{"final_accuracy": 0.5}\n')
    (run / "model.safetensors").write_bytes(os.urandom(512))
    (run / "checkpoints" / "step-4" / "loop_state.json").write_text('{"step": 4}\n')
    return out


def _refused(out: subprocess.CompletedProcess, *words: str) -> str:
    """Assert exit status 2, no traceback, and one error line holding every one of ``words``."""
    assert out.returncode == 2, f"exit {out.returncode}\n{out.stderr[-3000:]}"
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, out.stderr[-3000:]
    for word in words:
        assert word in errors[0], f"{word!r} not in: {errors[0]}"
    return errors[0]


def _rewrite(path: Path, **changes) -> None:
    """Change entries of one of our own fixture pickles (written by _fixtures_data, so trusted)."""
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    d.update({k.encode(): v for k, v in changes.items()})
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


def _train_refused(tmp_path: Path, data: str, data_dir: Path, *words: str, extra=()) -> str:
    """Train on bad data next to an earlier run: refused, nothing of the earlier run (or a new run) written."""
    out = _earlier_run(tmp_path / "runs")
    before = _tree(out)
    message = _refused(run_cli("--data", data, "--data-dir", data_dir, *TINY, *extra, "--output-dir", out,
                               "--run-name", "new", timeout=120), *words)
    assert _tree(out) == before
    return message


PIXELS = fx.random_cifar(20, 8)  # 4 train images per data_batch_N


# ----------------------------------------------------------------------------- 1. truncated data file

def test_truncated_cifar_pickle(tmp_path):
    folder = fx.write_cifar10_pickles(tmp_path / "data", *PIXELS)
    batch = folder / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[: batch.stat().st_size // 2])
    _train_refused(tmp_path, "cifar10", tmp_path / "data", "data_batch_2", "truncated", "re-download")


def test_truncated_parquet_file(tmp_path):
    pytest.importorskip("pyarrow")
    folder = fx.write_cifar10_parquet(tmp_path / "data", *PIXELS)
    part = folder / "train-00000-of-00001.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    _train_refused(tmp_path, "cifar10", tmp_path / "data", "train-00000-of-00001.parquet", "truncated",
                   "download it again")


def test_truncated_test_image_refused_before_training_when_streaming(tmp_path):
    """Streamed, the test split is first read after an epoch of training; it is decoded once when the
    folder is indexed instead, so a damaged test image is refused before the first step: one line naming
    the file, and no run folder left behind (the output folder stays byte-identical)."""
    fx.write_image_folder(tmp_path / "data", classes=("a", "b"), counts={"train": 4, "test": 2})
    bad = tmp_path / "data" / "test" / "b" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])
    out = _earlier_run(tmp_path / "runs")
    before = _tree(out)
    result = run_cli("--data", "imagefolder", "--data-dir", tmp_path / "data", *TINY, "--in-memory", "no",
                     "--num-workers", "1", "--output-dir", out, "--run-name", "new", timeout=120)
    _refused(result, str(bad), "cannot read this image", "delete or replace the file")
    assert "DataLoader worker" not in result.stderr and "step 1/" not in result.stdout + result.stderr
    assert _tree(out) == before


# ----------------------------------------------------------------------------- 2. images of the wrong shape
# An image folder takes any size and mode (resized by the shorter side, center-cropped, made RGB), so the
# wrong shape is a CIFAR file's: pickle rows that are not 32 x 32 x 3 bytes, parquet images not 32 x 32.

def test_cifar_pickle_rows_of_the_wrong_size(tmp_path):
    folder = fx.write_cifar10_pickles(tmp_path / "data", *PIXELS)
    _rewrite(folder / "data_batch_4", data=np.zeros((4, 28 * 28 * 3), np.uint8))
    _train_refused(tmp_path, "cifar10", tmp_path / "data", "data_batch_4", "shape (4, 2352)", "expected N x 3072",
                   "re-download")


def test_parquet_images_of_the_wrong_size(tmp_path):
    pytest.importorskip("pyarrow")
    small = (PIXELS[0][:, :, :28, :28].copy(), *PIXELS[1:])
    fx.write_cifar10_parquet(tmp_path / "data", *small)
    _train_refused(tmp_path, "cifar10", tmp_path / "data", "train-00000-of-00001.parquet", "row 0",
                   "image is 28x28", "images are 32x32", "download the data again")


# ----------------------------------------------------------------------------- 3. labels out of range

@pytest.mark.parametrize("source, label", [("cifar10", 10), ("cifar100", 100)])
def test_label_out_of_range_names_value_file_position_and_range(tmp_path, source, label):
    if source == "cifar10":
        folder = fx.write_cifar10_pickles(tmp_path / "data", *PIXELS)
        bad, key, classes = folder / "data_batch_3", "labels", 10
    else:
        folder = fx.write_cifar100_pickles(tmp_path / "data", *fx.random_cifar(8, 4, num_classes=100))
        bad, key, classes = folder / "train", "fine_labels", 100
    rows = 4 if source == "cifar10" else 8
    _rewrite(bad, **{key: [0, 1, label] + [0] * (rows - 3)})
    _train_refused(tmp_path, source, tmp_path / "data", bad.name, f"label {label} at position 2",
                   f"outside [0, {classes})", "re-download")


def test_parquet_label_out_of_range_names_the_row(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    labels = np.arange(20) % 10
    labels[13] = -1
    fx.write_cifar10_parquet(tmp_path / "data", PIXELS[0], labels, *PIXELS[2:])
    _train_refused(tmp_path, "cifar10", tmp_path / "data", "train-00000-of-00001.parquet",
                   "label -1 at position 13", "outside [0, 10)", "download the data again")
    # The row is counted over the whole file, not within the batch of rows decoded at a time.
    from resnet_scale.data import DataError, build_datasets, cifar

    monkeypatch.setattr(cifar, "_ROWS_PER_BATCH", 8)
    with pytest.raises(DataError, match=r"label -1 at position 13 "):
        build_datasets("cifar10", data_dir=str(tmp_path / "data"), download=False)


# ----------------------------------------------------------------------------- 4. an empty data set

def test_empty_image_folder(tmp_path):
    fx.write_image_folder(tmp_path / "data", classes=("cat", "dog"), counts={"train": 0, "test": 0})
    _train_refused(tmp_path, "imagefolder", tmp_path / "data", str(Path("train") / "cat"),
                   "class folder holds no images", "add images")


def test_cifar_pickles_with_no_rows(tmp_path):
    fx.write_cifar10_pickles(tmp_path / "data", *fx.random_cifar(0, 0))
    _train_refused(tmp_path, "cifar10", tmp_path / "data", "cifar-10-batches-py", "the train split is empty",
                   "re-download")


def test_empty_data_dir(tmp_path):
    (tmp_path / "data").mkdir()
    _train_refused(tmp_path, "cifar10", tmp_path / "data", "holds no cifar10 data", "downloading is disabled",
                   "cifar-10-batches-py", "parquet")


# ----------------------------------------------------------------------------- 5. an unwritable --output-dir
# Refused before any data is read: the data given here does not exist, and it is not what the message is about.

NO_DATA = ("--data", "cifar10", "--data-dir", "missing-data", *TINY)


def test_output_dir_below_a_file(tmp_path):
    """Fails for root too: no folder can be made inside a regular file."""
    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    message = _refused(run_cli(*NO_DATA, "--output-dir", afile / "out", timeout=120),
                       f"--output-dir {afile / 'out'}", f"{afile} is a file", "Choose another --output-dir")
    assert "--data-dir" not in message and afile.read_text() == "keep me\n"


def _drop_root_override(probe: Path) -> list[str]:
    """The launcher prefix under which ``probe`` (chmod 0o500) is really not writable: none for a normal
    user; for root, setpriv without CAP_DAC_OVERRIDE (root otherwise writes anywhere); else skip."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    if shutil.which("setpriv"):
        check = subprocess.run([*prefix, sys.executable, "-c", f"import os; print(os.access({str(probe)!r}, os.W_OK))"],
                               capture_output=True, text=True)
        if check.returncode == 0 and check.stdout.strip() == "False":
            return prefix
    pytest.skip("running as root, where chmod does not stop writes, and setpriv cannot drop CAP_DAC_OVERRIDE")


def test_output_dir_under_a_read_only_folder(tmp_path):
    out = _earlier_run(tmp_path / "runs")
    before = _tree(out)
    out.chmod(0o500)
    try:
        prefix = _drop_root_override(out)
        result = run_cli(*NO_DATA, "--output-dir", out / "new", timeout=120,
                         launcher=[*prefix, sys.executable, "-m", "resnet_scale", "train"])
    finally:
        out.chmod(0o700)
    message = _refused(result, f"--output-dir {out / 'new'} cannot be created", f"{out} is not writable",
                       "Choose another --output-dir", "chmod")
    assert "--data-dir" not in message and _tree(out) == before


# ----------------------------------------------------------------------------- 6. unknown or conflicting flags

@pytest.mark.parametrize("argv, words", [
    (["--bach-size", "4"], ["unrecognized arguments: --bach-size 4", "did you mean --batch-size?", "--help"]),
    (["--resume", "auto"], ["--resume auto continues the run named by --run-name", "give --run-name NAME"]),
    (["--micro-batch-size", "3"], ["--micro-batch-size 3 must divide the per-device batch 4", "divisors", "1, 2, 4"]),
    (["--distributed", "ddp", "--zero-stage", "2"], ["--distributed ddp cannot use --zero-stage",
                                                     "use --distributed deepspeed"]),
    (["--activation-compression", "int8", "--compile"],
     ["--activation-compression int8 does not work with --compile", "give one of them"]),
    (["--activation-compression", "int4", "--offload-activations"],
     ["--activation-compression int4 and --offload-activations", "give one of them"]),
])
def test_unknown_or_conflicting_flags_write_nothing(tmp_path, argv, words):
    out = _earlier_run(tmp_path / "runs")
    before = _tree(out)
    _refused(run_cli("--data", "synthetic", *TINY, *argv, "--output-dir", out, timeout=120), *words)
    assert _tree(out) == before
