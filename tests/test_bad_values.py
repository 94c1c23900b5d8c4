"""Bad flag values, refused by ``resnet-scale train`` in one line with exit status 2, before any file is
written: nan/inf/-inf, beyond a float's range and negative values for EVERY float flag (read from the
schema, so a new one is covered too), ints beyond 64 bits for EVERY int flag, zero or negative counts
where they make no sense, and sizes checked against the data and the free memory before anything is
allocated (a batch larger than the data set, 10^11 synthetic images, 100,000-pixel images).

Most cases are refused while the flags are parsed or validated, so they run in this process
(``resnet_scale.cli.main``); two go through the real CLI as their own process (test_bad_input's
``_refused``, next to an earlier run that must stay byte-identical).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _fixtures_data as fx  # noqa: E402
from test_bad_input import _earlier_run, _refused, _tree  # noqa: E402
from test_train_e2e import run_cli  # noqa: E402

from resnet_scale.cli import main  # noqa: E402
from resnet_scale.config import Config, flag_name  # noqa: E402
from resnet_scale.config.values import field_type  # noqa: E402

TINY = ["--data", "synthetic", "--layers", "1,1,1", "--image-size", "8", "--synthetic-train-samples", "32",
        "--synthetic-test-samples", "16", "--batch-size", "4", "--max-steps", "1", "--tracker", "none",
        "--device", "cpu"]


def refused(capsys, tmp_path, argv, *words, base=TINY) -> str:
    """``resnet-scale train BASE ARGV`` in this process: exit status 2 (argparse's SystemExit or the
    returned status), one ``error:`` line, the last one, holding every one of ``words``, no traceback,
    nothing written."""
    out = tmp_path / "runs"
    try:
        status = main(["train", *base, *map(str, argv), "--output-dir", str(out)])
    except SystemExit as stop:
        status = stop.code
    err = capsys.readouterr().err
    assert status == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and err.rstrip("\n").splitlines()[-1] == lines[0], err[-3000:]  # nothing after it
    for word in words:
        assert word in lines[0], f"{word!r} not in: {lines[0]}"
    assert not out.exists(), "a refused run must not create its --output-dir"
    return lines[0]


def _fields(kind: type) -> list[tuple[str, bool]]:
    """(flag, optional) of every field of the config whose type is ``kind``."""
    found = []
    for section in dataclasses.fields(Config):
        sub = getattr(Config(), section.name)
        for f in dataclasses.fields(sub):
            tp, optional = field_type(type(sub), f.name)
            if tp is kind:
                found.append((flag_name(f), optional))
    return found


FLOAT_FLAGS = _fields(float)
INT_FLAGS = _fields(int)


# The schema still has the flags these tests are about (a renamed field would silently shrink them).
assert {flag for flag, _ in FLOAT_FLAGS} >= {
    "--lr", "--momentum", "--weight-decay", "--label-smoothing", "--max-grad-norm", "--warmup-epochs",
    "--in-memory-limit-gib", "--target-accuracy", "--checkpoint-every-minutes"}
assert len(INT_FLAGS) >= 15


# ----------------------------------------------------------------------------- every float flag

@pytest.mark.parametrize("argv", [["train", "--lr", "nan"], ["train", "--bach-size", "3"], ["plan", "--depth", "x"],
                                  ["trian"]])
def test_a_refused_flag_is_the_only_line_on_stderr(capsys, argv):
    """argparse prints its whole usage block before the error; here the error line is all there is
    (with the pointer to --help), so the line that matters is not buried under 50 lines."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    assert ": error: " in err and "--help" in err and "usage:" not in err


@pytest.mark.parametrize("flag, optional", FLOAT_FLAGS, ids=[f for f, _ in FLOAT_FLAGS])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400", "NaN"])
def test_every_float_flag_refuses_non_finite_values(capsys, tmp_path, flag, optional, value):
    line = refused(capsys, tmp_path, [f"{flag}={value}"], flag, repr(value), "not a usable number", "finite")
    assert ("leave it out (or give none) to turn it off" in line) == optional


@pytest.mark.parametrize("flag, optional", FLOAT_FLAGS, ids=[f for f, _ in FLOAT_FLAGS])
def test_every_float_flag_refuses_a_negative_value(capsys, tmp_path, flag, optional):
    refused(capsys, tmp_path, [f"{flag}=-1"], flag)


@pytest.mark.parametrize("argv, words", [
    (["--lr", "0"], ["--lr 0.0 must be positive"]),
    (["--max-grad-norm", "0"], ["--max-grad-norm 0 would clip every gradient to zero",
                                "to train without clipping leave --max-grad-norm out", "--max-grad-norm none"]),
    (["--max-grad-norm", "-1"], ["--max-grad-norm -1.0 must be positive", "gradient ascent", "no clipping"]),
    (["--max-grad-norm", "-0.5"], ["--max-grad-norm -0.5 must be positive"]),
    (["--target-accuracy", "0"], ["--target-accuracy 0.0 must be in (0, 1]"]),
    (["--checkpoint-every-minutes", "0"], ["--checkpoint-every-minutes 0.0 must be positive"]),
    (["--in-memory-limit-gib", "0"], ["--in-memory-limit-gib 0.0 must be positive"]),
    (["--momentum", "1"], ["--momentum 1.0 must be in [0, 1)"]),
    (["--label-smoothing", "1"], ["--label-smoothing 1.0 must be in [0, 1)"]),
    (["--lr", "true"], ["argument --lr", "expected a number, got 'true'"]),
])
def test_float_values_that_make_no_sense(capsys, tmp_path, argv, words):
    refused(capsys, tmp_path, argv, *words)


def test_max_grad_norm_off_is_spelled_none_and_0_is_refused(capsys, tmp_path):
    from test_config import parse

    assert parse("--max-grad-norm", "none").validate().optim.max_grad_norm is None
    assert parse("--max-grad-norm", "0.5").validate().optim.max_grad_norm == 0.5
    refused(capsys, tmp_path, ["--max-grad-norm", "0"], "--max-grad-norm none")


# ----------------------------------------------------------------------------- every int flag

@pytest.mark.parametrize("flag, optional", INT_FLAGS, ids=[f for f, _ in INT_FLAGS])
def test_every_int_flag_refuses_a_value_beyond_64_bits(capsys, tmp_path, flag, optional):
    refused(capsys, tmp_path, [flag, 10**30], f"argument {flag}", "out of range", "64 bits")


@pytest.mark.parametrize("flag, optional", INT_FLAGS, ids=[f for f, _ in INT_FLAGS])
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_every_int_flag_says_inf_and_nan_are_not_numbers(capsys, tmp_path, flag, optional, value):
    refused(capsys, tmp_path, [f"{flag}={value}"], f"argument {flag}", repr(value), "not a usable number")


@pytest.mark.parametrize("argv, words", [
    (["--seed", "-1"], ["--seed -1 must be in [0, 4294967295]"]),
    (["--seed", 2**32], ["--seed 4294967296 must be in [0, 4294967295]"]),
    (["--batch-size", "0"], ["--batch-size 0 must be at least 1"]),
    (["--epochs", "-3"], ["--epochs -3 must be at least 1"]),
    (["--max-steps", "0"], ["--max-steps 0 must be at least 1"]),
    (["--synthetic-train-samples", "0"], ["--synthetic-train-samples 0 must be at least 1"]),
    (["--synthetic-classes", "1"], ["--synthetic-classes 1 must be at least 2"]),
    (["--synthetic-classes", 10**6], ["--synthetic-classes 1000000 is more than any image data set has"]),
    (["--num-workers", "-1"], ["--num-workers -1 must be at least 0"]),
    (["--num-workers", 10**6], ["--num-workers 1000000 would start that many processes", "at most 1024"]),
    (["--layers=1,-1,1"], ["--layers 1,-1,1 is not a valid layout"]),
    (["--layers", "5000,1,1"], ["--layers 5000,1,1 puts 5,000 blocks in one stage", "at most 1,000"]),
    (["--layers", f"1,{10**30},1"], ["argument --layers", "out of range"]),
    (["--layers", "1,x,1"], ["argument --layers", "expected comma-separated ints"]),
    (["--block", "basic", "--depth", 6 * 5000 + 2, "--layers", "none"], ["--depth 30002 puts 5,000 blocks"]),
    (["--image-size", "4"], ["--image-size 4 is too small"]),
    (["--crop-padding", "-1"], ["--crop-padding -1 must be in [0, 8)"]),
    (["--zero-stage", "7"], ["--zero-stage 7 does not exist"]),
    (["--keep-checkpoints", "0"], ["--keep-checkpoints 0 must be at least 1"]),
    (["--max-bad-steps", "0"], ["--max-bad-steps 0 must be at least 1"]),
    (["--checkpoint-every", "0"], ["--checkpoint-every 0 must be at least 1 step"]),
    (["--log-every", "0"], ["--log-every 0 must be at least 1"]),
    (["--eval-every", "0"], ["--eval-every 0 must be at least 1"]),
    (["--micro-batch-size", "0"], ["--micro-batch-size 0 must divide the per-device batch 4"]),
    (["--max-memory", "1" + "0" * 400 + "GiB"], ["--max-memory", "larger than any memory"]),
])
def test_int_values_that_make_no_sense(capsys, tmp_path, argv, words):
    refused(capsys, tmp_path, argv, *words)


# ----------------------------------------------------------------------------- sizes against data and memory

def test_batch_larger_than_the_data_set_names_its_size(capsys, tmp_path):
    refused(capsys, tmp_path, ["--batch-size", "64"], "--batch-size 64 is larger than the training split",
            "32 synthetic images", "--batch-size 32 or less")


def test_batch_larger_than_an_image_folder(capsys, tmp_path):
    fx.write_image_folder(tmp_path / "data", classes=("a", "b"), size=(8, 8))  # 3 + 3 train images
    base = ["--data", "imagefolder", "--data-dir", str(tmp_path / "data"), "--image-size", "8", "--layers",
            "1,1,1", "--tracker", "none", "--max-steps", "1", "--device", "cpu"]
    for mode in ("yes", "no"):
        refused(capsys, tmp_path, ["--batch-size", "7", "--in-memory", mode], "--batch-size 7 is larger than the "
                "training split (6 imagefolder images)", base=base)


def test_10e11_synthetic_images_are_refused_with_bytes_needed_and_available(capsys, tmp_path):
    refused(capsys, tmp_path, ["--synthetic-train-samples", 10**11], "the synthetic data",
            "100,000,000,000 train", f"({(10**11 + 16) * 3 * 8 * 8:,} bytes)", "available",
            "lower --synthetic-train-samples")


def test_100000_pixel_images_are_refused_before_allocating(capsys, tmp_path):
    line = refused(capsys, tmp_path, ["--image-size", "100000", "--synthetic-train-samples", "1024"],
                   "3 x 100000 x 100000 bytes", "available", "--image-size")
    assert "TiB of memory" in line


def test_huge_cifar_images_are_refused_before_resizing(capsys, tmp_path):
    fx.write_cifar10_pickles(tmp_path / "data", *fx.random_cifar(20, 8))
    refused(capsys, tmp_path, ["--image-size", 10**6], "20 images resized to 1000000x1000000 px",
            "available", "use a smaller --image-size",
            base=["--data", "cifar10", "--data-dir", str(tmp_path / "data"), "--no-download", "--batch-size", "4",
                  "--layers", "1,1,1,1", "--tracker", "none", "--device", "cpu"])


def test_huge_streamed_images_are_refused_before_decoding(capsys, tmp_path):
    fx.write_image_folder(tmp_path / "data", classes=("a", "b"), size=(8, 8))
    refused(capsys, tmp_path, ["--image-size", 10**6], "one image decoded at 1000000x1000000 px", "available",
            base=["--data", "imagefolder", "--data-dir", str(tmp_path / "data"), "--in-memory", "no",
                  "--batch-size", "2", "--layers", "1,1,1,1", "--tracker", "none", "--device", "cpu"])


def test_a_split_larger_than_the_free_gpu_memory_is_refused_before_copying(monkeypatch):
    """The decision alone (it runs without a GPU too): CUDA is made to report 1 MiB free, and a 1.5 MiB
    split is refused before anything is copied to the device."""
    import torch

    from resnet_scale.data import DataError, DeviceLoader, build_datasets

    train, _ = build_datasets("synthetic", synthetic_samples=(512, 4), image_size=32)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 2**30))
    with pytest.raises(DataError, match=r"the train split \(512 images\) would take 1.50 MiB on cuda, more than "
                                        r"its 1.00 MiB of free memory; use a smaller --image-size"):
        DeviceLoader(train, batch_size=4, device="cuda")


def test_the_memory_check_reads_a_plausible_amount():
    from resnet_scale.data.budget import available_memory_bytes

    available = available_memory_bytes()
    assert available is not None and 2**20 < available < 2**50


# ----------------------------------------------------------------------------- through the real CLI

def test_bad_values_through_the_cli_keep_an_earlier_run(tmp_path):
    """Two refusals as their own process: one at parse time, one after the data is built."""
    out = _earlier_run(tmp_path / "runs")
    before = _tree(out)
    for argv, words in ((["--weight-decay", "nan"], ["argument --weight-decay", "not a usable number"]),
                        (["--batch-size", "64"], ["--batch-size 64 is larger than the training split"])):
        _refused(run_cli(*TINY, *argv, "--output-dir", out, "--run-name", "new", timeout=120), *words)
    assert _tree(out) == before
