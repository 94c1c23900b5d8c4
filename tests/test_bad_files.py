"""Bad files: config files (unknown sections, a flat layout, keys in the wrong section, values that
overflow or have the wrong type, files that are not text), an image folder with one class, a damaged
test image when streaming, damaged ``summary.json`` / ``metrics.jsonl`` given to ``resnet-scale
report``, and files that cannot be written (every errno, safetensors' and torch.save's own errors).

Input errors exit 2 with one line naming the file (and line) and what to do; a run's files that
cannot be written exit 1 with one line naming the errno. Never a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _fixtures_data as fx  # noqa: E402
from test_bad_input import _earlier_run, _tree  # noqa: E402
from test_bad_values import TINY, refused  # noqa: E402
from test_train_e2e import REPO, run_cli  # noqa: E402

from resnet_scale.cli import main  # noqa: E402

# ----------------------------------------------------------------------------- config files

BIG = "1" + "0" * 400
CONFIG_CASES = [
    ("flat.yaml", "lr: 0.05\nbatch_size: 32\n", ["config key 'lr' stands at the top level", "'optim:'",
                                                   "the top level holds only model, data, optim"]),
    ("flat.json", '{"batch-size": 32}', ["config key 'batch-size' stands at the top level", "'train:'"]),
    ("section.yaml", "optimizer:\n  lr: 0.05\n", ["unknown config section 'optimizer'", "the sections are model"]),
    ("wrapped.json", '{"config": {"training": {}}}', ["unknown config section 'training'"]),
    ("wrong.yaml", "optim:\n  batch_size: 32\n", ["'optim.batch_size' belongs to section 'train'",
                                                  "'train.batch_size'"]),
    ("key.yaml", "model:\n  blok: basic\n", ["unknown config key 'model.blok'", "valid keys of 'model': block"]),
    ("nan.json", '{"optim": {"lr": NaN}}', ["optim.lr: nan is not a usable number"]),
    ("inf.yaml", "optim:\n  weight_decay: .inf\n", ["optim.weight_decay: inf is not a usable number"]),
    ("bigfloat.json", '{"optim": {"lr": ' + BIG + "}}", ["optim.lr: 1000", "(401 characters) is not a usable"]),
    ("bigint.json", '{"train": {"batch_size": ' + str(10**30) + "}}", ["train.batch_size", "out of range"]),
    ("infint.yaml", "train:\n  epochs: .inf\n", ["train.epochs: inf is not a usable number"]),
    ("float.yaml", "train:\n  epochs: 2.5\n", ["train.epochs: expected an integer, got 2.5"]),
    ("bool.yaml", "train:\n  seed: true\n", ["train.seed: expected an integer, got True"]),
    ("list.yaml", "optim:\n  lr: [0.1]\n", ["optim.lr: expected a number, got [0.1]"]),
    ("layers.yaml", "model:\n  layers: 5\n", ["model.layers: expected comma-separated ints"]),
    ("nested.yaml", "model:\n  layers: [1, [2], 1]\n", ["model.layers: expected comma-separated ints"]),
    ("name.yaml", "train:\n  run_name: [a, b]\n", ["train.run_name: expected a string, got ['a', 'b']"]),
    ("off.yaml", "memory:\n  checkpointing: off\n", ["memory.checkpointing: expected a string, got False",
                                                     "quote the value"]),
    ("scalar.yaml", "train: 5\n", ["config section 'train' must be a mapping"]),
    ("wrapnot.json", '{"config": [1]}', ["'config' must be a mapping of sections"]),
    ("list.json", "[1, 2]", ["must hold a mapping of sections"]),
    ("tab.yaml", "model:\n\tblock: basic\n", ["is not valid YAML", "line 2"]),
    ("bad.json", '{"optim": {"lr": 0.1,}}', ["is not valid JSON", "line 1"]),
    ("binary.json", b"\xff\xfe\x00{", ["cannot read it (not UTF-8 text)"]),
    ("missing.yaml", None, ["no such file"]),
]


@pytest.mark.parametrize("name, text, words", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_file(capsys, tmp_path, name, text, words):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    refused(capsys, tmp_path, ["--config", path], f"--config {path}", *words)


def test_a_runs_own_config_json_is_still_accepted(tmp_path):
    from resnet_scale.config import Config, load_config_file

    cfg = Config()
    cfg.optim.lr = 0.05
    payload = {"config": cfg.to_dict(), "environment": {"torch": "x"}, "memory": {"precision": "fp32"},
               "world_size": 1}
    (tmp_path / "config.json").write_text(json.dumps(payload))
    assert load_config_file(tmp_path / "config.json") == cfg


# ----------------------------------------------------------------------------- image folders

def test_an_image_folder_with_one_class(capsys, tmp_path):
    fx.write_image_folder(tmp_path / "data", classes=("cat",), size=(8, 8))
    for mode in ("yes", "no"):
        refused(capsys, tmp_path, ["--in-memory", mode], f"{tmp_path / 'data' / 'train'}: one class folder (cat) only",
                "at least 2 classes", "add a folder of images per class",
                base=["--data", "imagefolder", "--data-dir", str(tmp_path / "data"), "--image-size", "8",
                      "--layers", "1,1,1", "--batch-size", "2", "--tracker", "none", "--device", "cpu"])


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_streaming_index_decodes_the_test_split(tmp_path, suffix):
    """The test images are decoded when the folder is indexed (before any step), a JPEG cut in half
    as well as a PNG: the first damaged one is named."""
    from PIL import Image

    from resnet_scale.data import DataError, index_imagefolder

    fx.write_image_folder(tmp_path / "data", classes=("a", "b"), counts={"train": 2, "test": 2})
    for png in sorted((tmp_path / "data").rglob("*.png")):  # re-encode every image in the format under test
        with Image.open(png) as img:
            img.convert("RGB").save(png.with_suffix(suffix))
        if suffix != ".png":
            png.unlink()
    _, test = index_imagefolder(str(tmp_path / "data"), 8)
    assert len(test) == 4
    bad = tmp_path / "data" / "test" / "b" / f"1{suffix}"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(DataError, match=re.escape(f"{bad}: cannot read this image") + ".*delete or replace the file"):
        index_imagefolder(str(tmp_path / "data"), 8)


# ----------------------------------------------------------------------------- damaged run files for report

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report-runs")
    result = run_cli(*TINY, "--output-dir", out, "--run-name", "good", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "good"


def _damage(path: Path, how: str) -> str:
    """Damage one file of a run copy; returns where the message must point."""
    if how == "cut-last-metrics-line":
        text = path.read_text()
        path.write_text(text[: len(text) - 20])
        return f"{path} line {len(text.splitlines())} is not JSON"
    raise AssertionError(how)


REPORT_CASES = [
    ("summary.json", "[]", ["summary.json holds [], not a JSON object"]),
    ("summary.json", "null", ["summary.json holds null, not a JSON object"]),
    ("summary.json", '{"final_accuracy": "high"}', ["summary.json: 'final_accuracy' is \"high\", not a number"]),
    ("summary.json", '{"wall_time_s": true}', ["summary.json: 'wall_time_s' is true, not a number"]),
    ("summary.json", '{"final_accuracy": 0.5', ["summary.json: cannot read it as JSON", "line 1 column"]),
    ("summary.json", b"\xff\xfe", ["summary.json: not UTF-8 text"]),
    ("metrics.jsonl", '{"step": 1, "split": "test"}\n5\n', ["metrics.jsonl line 2 holds 5, not a JSON object"]),
    ("metrics.jsonl", '{"step": 1}\n"x"\n{"step": 2}\n', ['metrics.jsonl line 2 holds "x", not a JSON object']),
    ("metrics.jsonl", '{"split": "test", "accuracy": "high"}\n', ["metrics.jsonl line 1: 'accuracy' is \"high\""]),
    ("metrics.jsonl", '{"split": 3, "step": 1}\n', ["metrics.jsonl line 1: 'split' is 3, not a string"]),
    ("metrics.jsonl", '{"step": [1]}\n', ["metrics.jsonl line 1: 'step' is [1], not a number"]),
    ("metrics.jsonl", '{"step": 1}\n{"step": 2, \n{"step": 3}\n', ["metrics.jsonl line 2 is not JSON"]),
    ("metrics.jsonl", b'{"step": 1}\n\xff\n', ["metrics.jsonl: not UTF-8 text"]),
    ("metrics.jsonl", "cut-last-metrics-line", ["the last line is cut"]),
]


@pytest.mark.parametrize("name, content, words", REPORT_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(REPORT_CASES)])
def test_report_refuses_a_damaged_run_file(capsys, tmp_path, finished_run, name, content, words):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    path = run / name
    where = [str(path)]
    if content == "cut-last-metrics-line":
        where.append(_damage(path, content))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    status = main(["report", str(run), "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    for word in (*where, *words, "leave its folder out of the report"):
        assert word in lines[0], f"{word!r} not in: {lines[0]}"
    assert not (tmp_path / "report").exists()


def test_report_of_the_undamaged_run_succeeds(capsys, tmp_path, finished_run):
    assert main(["report", str(finished_run), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.md").is_file()


# ----------------------------------------------------------------------------- files that cannot be written

def test_every_errno_is_one_line_naming_it():
    """Every errno this system knows, written under the run's folder (exit 1) or elsewhere (exit 2)."""
    from resnet_scale.cli.train import file_error

    inside, outside = "/runs/x/summary.json", "/data/train/a/1.png"
    for code, name in sorted(errno.errorcode.items()):
        message, status = file_error(OSError(code, os.strerror(code), inside), ["/runs"])
        assert status == 1 and "\n" not in message and f"[{name}]" in message and inside in message, message
        assert "the run's files could not be written" in message and "--resume auto" in message
        message, status = file_error(OSError(code, os.strerror(code), outside), ["/runs"])
        assert status == 2 and "\n" not in message and f"cannot read or write {outside}" in message
    assert len(errno.errorcode) > 100
    assert file_error(ValueError("not a file error"), ["/runs"]) is None
    assert file_error(RuntimeError("not from torch.save"), ["/runs"]) is None


def _under_file_size_limit(write) -> BaseException:
    """The error ``write()`` raises while this process's soft RLIMIT_FSIZE is 4 KiB (Python ignores
    SIGXFSZ, so a bigger write fails with EFBIG). The limit is back before anything else is written
    (pytest's own output may go to a file bigger than that)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        write()
    except Exception as err:  # noqa: BLE001 -- each library raises its own type
        return err
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    raise AssertionError("the write did not fail under a 4 KiB file-size limit")


def test_torch_save_and_safetensors_write_errors_are_mapped(tmp_path):
    """Real EFBIG errors, raised by each library's own writer as its own exception type."""
    from safetensors.torch import save_file

    from resnet_scale.cli.train import file_error

    torch_error = _under_file_size_limit(lambda: torch.save({"a": torch.zeros(4096)}, tmp_path / "optimizer.bin"))
    st_error = _under_file_size_limit(lambda: save_file({"a": torch.zeros(4096)}, str(tmp_path / "model.safetensors")))
    assert type(torch_error) is RuntimeError and type(st_error).__name__ == "SafetensorError"
    message, status = file_error(torch_error, [str(tmp_path)])
    assert status == 1 and message.startswith("the run's files could not be written (torch.save: ")
    assert "the disk may be full or a file-size limit (ulimit -f) reached" in message
    message, status = file_error(st_error, [str(tmp_path)])
    assert status == 1 and "File too large" in message and "[EFBIG]" in message and "ulimit -f" in message


@pytest.mark.parametrize("code, method", [(errno.ENOSPC, "write_config"), (errno.EIO, "log"),
                                          (errno.EROFS, "write_summary")])
def test_a_write_error_during_the_run_is_one_line_and_exit_1(capsys, tmp_path, monkeypatch, code, method):
    """ENOSPC cannot be made on demand: the run folder's writer raises it (and EIO, EROFS) here."""
    from resnet_scale.train.run_dir import RunDir

    target = tmp_path / "runs" / "x"

    def fail(self, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(target / "file"))

    monkeypatch.setattr(RunDir, method, fail)
    status = main(["train", *TINY, "--output-dir", str(tmp_path / "runs"), "--run-name", "x"])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and f"[{errno.errorcode[code]}]" in lines[0] and str(target) in lines[0], err


def test_file_size_limit_on_the_final_weights_end_to_end(tmp_path):
    """A real EFBIG through the CLI as its own process: safetensors fails to write model.safetensors
    under a 100 kB file-size limit. One line naming the errno, exit 1; the run's config.json is whole
    and an earlier run in the same --output-dir is untouched."""
    out = _earlier_run(tmp_path / "runs")
    before = _tree(out / "earlier")
    limit = 100_000

    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    result = subprocess.run([sys.executable, "-m", "resnet_scale", "train", *TINY, "--output-dir", str(out),
                             "--run-name", "big"], capture_output=True, text=True, cwd=REPO, timeout=300,
                            preexec_fn=set_limit, check=False, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, result.stderr[-3000:]
    for word in ("the run's files could not be written", "File too large", "[EFBIG]", "ulimit -f"):
        assert word in lines[0], lines[0]
    assert json.loads((out / "big" / "config.json").read_text())["config"]["train"]["run_name"] == "big"
    assert not (out / "big" / "model.safetensors").exists()
    assert _tree(out / "earlier") == before
