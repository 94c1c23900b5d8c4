"""Best weights and ``resnet-scale eval``: ``model_best.safetensors`` is written at each new best test
accuracy and survives a resume, which continues from the restored best; ``eval`` reproduces the
run's final and best test accuracy exactly from the saved weights, writes its own file and changes
nothing the run wrote; every refusal is one line.

One tiny run (module fixture, through the CLI) serves every test; resumes work on copies of it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from resnet_scale.cli import main
from resnet_scale.train.checkpoint import checkpoint_dirs
from resnet_scale.train.run_dir import load_weights, weights_metadata

sys.path.insert(0, str(Path(__file__).parent))
from test_train_e2e import read_jsonl, run_cli  # noqa: E402

# 32 images in batches of 16: 2 steps per epoch, 4 epochs, an evaluation and a checkpoint at every epoch
# end (steps 2, 4, 6, 8). Micro-batches of 8 through --grad-accum-steps (config.json records them).
ARGS = ("--data", "synthetic", "--layers", "1,1,1", "--image-size", "8", "--synthetic-train-samples", "32",
        "--synthetic-test-samples", "16", "--epochs", "4", "--batch-size", "16", "--grad-accum-steps", "2",
        "--log-every", "1", "--deterministic", "--checkpoint-every", "2", "--keep-checkpoints", "10",
        "--tracker", "none")
TRAINING_FILES = ("config.json", "metrics.jsonl", "summary.json", "model.safetensors", "model_best.safetensors")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval")
    done = run_cli(*ARGS, "--output-dir", out, "--run-name", "r")
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "r"


def _tests(run: Path) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "test"]


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _same_tensors(a: Path, b: Path) -> bool:
    wa, wb = load_weights(a), load_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _eval(capsys, *argv) -> tuple[int, str, str]:
    code = main(["eval", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / run.name)
    return tmp_path / run.name


def _stopped_after(run: Path, step: int) -> Path:
    """What a run killed after its checkpoint of ``step`` leaves: no summary or final weights, no later
    checkpoint, metrics.jsonl up to that checkpoint (model_best.safetensors as it was)."""
    (run / "summary.json").unlink()
    (run / "model.safetensors").unlink()
    for checkpoint in checkpoint_dirs(run):
        if int(checkpoint.name.split("-")[1]) > step:
            shutil.rmtree(checkpoint)
    keep = json.loads((run / "checkpoints" / f"step-{step:09d}" / "loop_state.json").read_text())["metrics_lines"]
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:keep]))
    return run


def test_best_weights_are_those_of_the_best_evaluation_and_eval_reproduces_both(finished, capsys):
    summary = json.loads((finished / "summary.json").read_text())
    tests = _tests(finished)
    best = max(tests, key=lambda r: r["accuracy"])  # the first evaluation that reached the best accuracy
    assert summary["best_accuracy"] == best["accuracy"] and summary["final_accuracy"] == tests[-1]["accuracy"]
    meta = weights_metadata(finished / "model_best.safetensors")
    assert (int(meta["step"]), int(meta["epoch"]), float(meta["test_accuracy"])) == (
        best["step"], best["epoch"], best["accuracy"])
    config = json.loads((finished / "config.json").read_text())
    assert config["config"]["memory"]["grad_accum_steps"] == 2  # as given; resolved:
    assert (config["memory"]["micro_batch_size"], config["memory"]["accumulation_steps"]) == (8, 2)
    before = _files(finished)

    code, out, err = _eval(capsys, finished)
    assert code == 0, err
    final = json.loads((finished / "eval-final.json").read_text())
    assert final["accuracy"] == summary["final_accuracy"] and final["loss"] == summary["final_test_loss"]
    assert f"accuracy {final['accuracy']:.2%} (16 images)" in out and str(finished / "eval-final.json") in out
    matrix = torch.tensor(final["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 16 == final["samples"]
    assert matrix.trace() / 16 == final["accuracy"]

    code, out, err = _eval(capsys, finished, "--weights", "best", "--device", "cpu")
    assert code == 0, err
    result = json.loads((finished / "eval-best.json").read_text())
    assert result["accuracy"] == summary["best_accuracy"] and result["loss"] == best["loss"]
    assert (result["step"], result["epoch"], result["weights_file"]) == (best["step"], best["epoch"],
                                                                         "model_best.safetensors")
    assert {k: v for k, v in _files(finished).items() if not k.startswith("eval-")} == before


def test_a_resume_keeps_the_best_weights_and_continues_from_the_restored_best(finished, tmp_path):
    best_step = int(weights_metadata(finished / "model_best.safetensors")["step"])
    later = [r for r in _tests(finished) if r["step"] > best_step]
    assert later, "the fixture's best must come before its last evaluation"
    # Stopped after the checkpoint of the best step: the file is this run's and must survive the resume,
    # and no later evaluation below the restored best may replace it.
    run = _stopped_after(_copy(finished, tmp_path), best_step)
    kept = (run / "model_best.safetensors").read_bytes()
    resumed = run_cli(*ARGS, "--output-dir", tmp_path, "--run-name", "r", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "model_best.safetensors").read_bytes() == kept
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_accuracy"] == json.loads((finished / "summary.json").read_text())["best_accuracy"]
    untimed = lambda rs: [{k: v for k, v in r.items() if "time" not in k} for r in rs]  # noqa: E731
    assert untimed(_tests(run)) == untimed(_tests(finished))  # the same evaluations as the uninterrupted run


def test_best_weights_saved_after_the_resumed_checkpoint_are_set_aside_and_made_again(finished, tmp_path):
    best_step = int(weights_metadata(finished / "model_best.safetensors")["step"])
    earlier = max(int(c.name.split("-")[1]) for c in checkpoint_dirs(finished) if int(c.name.split("-")[1]) < best_step)
    run = _stopped_after(_copy(finished, tmp_path), earlier)  # killed after it wrote a later best
    resumed = run_cli(*ARGS, "--output-dir", tmp_path, "--run-name", "r", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    aside = run / f"model_best.step-{best_step}.safetensors"
    assert f"kept as {aside.name}" in resumed.stderr
    assert _same_tensors(aside, finished / "model_best.safetensors")  # kept, not lost
    # The resumed run reached the same best again (same steps, same data) and wrote it anew.
    assert weights_metadata(run / "model_best.safetensors") == weights_metadata(finished / "model_best.safetensors")
    assert _same_tensors(run / "model_best.safetensors", finished / "model_best.safetensors")


def test_print_config_of_a_resume_is_the_runs_own_config(finished, capsys):
    import yaml

    code = main(["train", "--output-dir", str(finished.parent), "--run-name", "r", "--resume", "auto", "--log-every",
                 "5", "--print-config"])
    assert code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    saved = json.loads((finished / "config.json").read_text())["config"]
    assert printed["train"]["log_every"] == 5 and printed["model"] == saved["model"]
    assert printed["memory"]["grad_accum_steps"] == 2 and printed["train"]["epochs"] == 4


def test_eval_refusals_are_one_line_and_write_nothing(finished, tmp_path, capsys):
    no_best = _copy(finished, tmp_path / "a")
    (no_best / "model_best.safetensors").unlink()
    unfinished = _copy(finished, tmp_path / "b")
    (unfinished / "model.safetensors").unlink()
    cases = [
        ((tmp_path / "missing",), "no such run folder"),
        ((tmp_path,), "holds no run (no config.json)"),
        ((no_best, "--weights", "best"), "has no model_best.safetensors"),
        ((unfinished,), "has no model.safetensors: it has not finished"),
        ((finished, "--data", "digits"), "data source mismatch: --data digits, but the run was trained on synthetic"),
        ((finished, "--data", "imagefolder", "--data-dir", tmp_path / "nowhere"), None),  # the folder: DataError
    ]
    for argv, words in cases:
        before = _files(tmp_path) if argv[0] != finished else _files(finished)
        code, out, err = _eval(capsys, *argv)
        assert code == 2 and out == "", (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("resnet-scale eval: error: "), (argv, err)
        assert words is None or words in lines[0], (argv, lines[0])
        assert (_files(tmp_path) if argv[0] != finished else _files(finished)) == before
