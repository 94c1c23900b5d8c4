"""A resumed run is the run's own config, and a finished run is never damaged.

One finished run (module fixture) is copied for every scenario that changes files: re-running its
command, replaying its config.json, resuming it after a stop in its last step, with no flags, with
flags that would change what it trains, from a loop_state.json that does not fit, and after a kill
before its first checkpoint. The settings a resume may change freely are checked field by field.
"""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from resnet_scale.config import Config, ConfigError, add_config_arguments, config_from_args, given_fields
from resnet_scale.config.compare import FREE, differences, fields, get, parse_overrides
from resnet_scale.config.values import field_type
from resnet_scale.train.checkpoint import checkpoint_dirs, latest_checkpoint
from resnet_scale.train.control import EXIT_NONFINITE, resume_advice
from resnet_scale.train.integrity import write_marker
from resnet_scale.train.optim import lr_factor
from resnet_scale.train.resume import Resume, check_loop_state
from resnet_scale.train.run_dir import load_weights
from resnet_scale.train.state import LoopState

sys.path.insert(0, str(Path(__file__).parent))
from test_train_e2e import read_jsonl, run_cli  # noqa: E402

# 64 images in batches of 16: 4 steps per epoch; --max-steps 6 ends in the middle of epoch 2. Checkpoints
# after step 3 (mid-epoch), at the end of epoch 1 (step 4) and after step 6, the last (mid-epoch too).
ARGS = ("--data", "synthetic", "--depth", "8", "--image-size", "16", "--synthetic-train-samples", "64",
        "--synthetic-test-samples", "32", "--batch-size", "16", "--max-steps", "6", "--log-every", "1",
        "--deterministic", "--checkpoint-every", "3", "--keep-checkpoints", "10", "--tracker", "none")


def _args(**changed):
    """ARGS with some values changed: _args(batch_size=32)."""
    out = list(ARGS)
    for name, value in changed.items():
        flag = "--" + name.replace("_", "-")
        if flag in out:
            out[out.index(flag) + 1] = str(value)
        else:
            out += [flag, str(value)]
    return tuple(out)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k}
            for r in read_jsonl(run / "metrics.jsonl")]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_weights(a / "model.safetensors"), load_weights(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("resnet-scale train: error:")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run, started as a SLURM script would: --run-name fin --resume auto."""
    out = tmp_path_factory.mktemp("finished")
    done = run_cli(*ARGS, "--output-dir", out, "--run-name", "fin", "--resume", "auto")
    assert done.returncode == 0, done.stderr[-3000:]
    run = out / "fin"
    assert [p.name for p in checkpoint_dirs(run)] == ["step-000000003", "step-000000004", "step-000000006"]
    return run


def _copy(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path / "fin")
    return tmp_path / "fin"


def _stopped(run: Path, checkpoint_step: int, lines_after: int = 0) -> Path:
    """Make ``run`` what a run stopped after its checkpoint of ``checkpoint_step`` leaves: no summary or
    final weights, no later checkpoint, metrics.jsonl up to that checkpoint and ``lines_after`` more."""
    (run / "summary.json").unlink()
    (run / "model.safetensors").unlink()
    for checkpoint in checkpoint_dirs(run):
        if int(checkpoint.name.split("-")[1]) > checkpoint_step:
            shutil.rmtree(checkpoint)
    keep = json.loads((latest_checkpoint(run) / "loop_state.json").read_text())["metrics_lines"] + lines_after
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:keep]))
    return run


# ------------------------------------------------------------------ 1. a finished run is never damaged


def test_rerunning_a_finished_runs_command_changes_nothing(finished, tmp_path):
    run = _copy(finished, tmp_path)
    before = _files(run)
    for argv in [(*ARGS, "--run-name", "fin", "--resume", "auto"),  # the very command that made it
                 ("--run-name", "fin", "--resume", "auto")]:  # or just the name
        out = run_cli(*argv, "--output-dir", tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"run {run} is finished (6 steps" in out.stderr and "nothing to do" in out.stderr
        assert "step 7" not in out.stderr and _files(run) == before
    # --resume PATH into a finished run would overwrite its results: refused.
    out = run_cli("--resume", run / "checkpoints" / "step-000000003")
    assert out.returncode == 2 and "is finished" in out.stderr and "would overwrite them" in out.stderr
    assert len(_error_lines(out.stderr)) == 1 and _files(run) == before


def test_replaying_a_runs_config_json_starts_a_new_run(finished, tmp_path):
    run = _copy(finished, tmp_path)
    saved = json.loads((run / "config.json").read_text())["config"]["train"]
    assert (saved["resume"], saved["run_name"]) == ("auto", "fin")  # what the saved config carries
    before = _files(run)
    out = run_cli("--config", run / "config.json", "--output-dir", tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "not using its run_name 'fin', resume 'auto'" in out.stderr
    assert _files(run) == before
    (new,) = [p for p in tmp_path.iterdir() if p.name != "fin"]
    assert json.loads((new / "summary.json").read_text())["steps"] == 6
    assert _metrics(new) == _metrics(run) and _same_weights(new, run)  # the replay trains the same run again


def test_a_run_stopped_in_its_last_step_finishes_without_training_past_the_end(finished, tmp_path):
    """SIGTERM during step 6 of 6 saves the checkpoint of step 6 (mid-epoch) and exits before the final
    evaluation; the same command with --resume auto evaluates, writes the summary and weights, and
    trains nothing more."""
    run = _stopped(_copy(finished, tmp_path), 6)
    checkpoints = {k: v for k, v in _files(run).items() if k.startswith("checkpoints")}
    out = run_cli(*ARGS, "--output-dir", tmp_path, "--run-name", "fin", "--resume", "auto")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 7" not in out.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    assert _metrics(run) == _metrics(finished) and _same_weights(run, finished)
    assert {k: v for k, v in _files(run).items() if k.startswith("checkpoints")} == checkpoints


# ------------------------------------------------------------------ 2. the run's config is the resume's


def test_resume_auto_needs_only_the_run_name(finished, tmp_path):
    """Killed at step 5 after the checkpoint of step 3: the run's name is all a resume needs (flags
    that change no trained weight may differ), and it ends exactly as the run that was never stopped."""
    run = _stopped(_copy(finished, tmp_path), 3, lines_after=2)
    config = (run / "config.json").read_bytes()
    out = run_cli("--output-dir", tmp_path, "--run-name", "fin", "--resume", "auto",
                  "--keep-checkpoints", "3", "--max-bad-steps", "5", "--no-download", "--num-workers", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert _metrics(run) == _metrics(finished) and _same_weights(run, finished)
    assert (run / "config.json").read_bytes() == config  # nothing overridden: the run's config stays as it was


def test_a_flag_that_changes_the_run_is_refused_in_one_line_naming_each_difference(finished, tmp_path):
    run = _stopped(_copy(finished, tmp_path), 3)
    before = _files(run)
    out = run_cli(*_args(batch_size=32, seed=1), "--lr", "0.2", "--activation-compression", "int8", "--output-dir",
                  tmp_path, "--run-name", "fin", "--resume", "auto")
    assert out.returncode == 2, out.stderr[-3000:]
    (line,) = _error_lines(out.stderr)
    for part in ("--batch-size 32 differs from the run's 16", "--seed 1 differs from the run's 0",
                 "--lr 0.2 differs from the run's 0.1", "--activation-compression int8 differs from the run's none",
                 "--override lr,activation_compression,batch_size,seed"):
        assert part in line
    assert "Traceback" not in out.stderr and _files(run) == before
    # Another model: one line naming it, not the state_dict's keys (--override cannot change it either).
    out = run_cli(*_args(depth=14), "--output-dir", tmp_path, "--run-name", "fin", "--resume", "auto")
    assert out.returncode == 2, out.stderr[-3000:]
    (line,) = _error_lines(out.stderr)
    model = "checkpoint {} holds a basic depth-8 model (stages 1,1,1, cifar stem); --depth 14 differs from the run's 8"
    assert model.format(latest_checkpoint(run)) in line
    assert "Missing key" not in out.stderr and "state_dict" not in out.stderr and _files(run) == before
    resume = Resume(cfg=Config(), given=frozenset({"model.depth"}), overrides=parse_overrides("depth"), path=run,
                    checkpoint=latest_checkpoint(run), run_cfg=Config.from_dict(json.loads(
                        (run / "config.json").read_text())["config"]), saved={})
    with pytest.raises(ConfigError, match="loads only into the model it was saved from") as err:
        resume.check(Config.from_dict({**resume.run_cfg.to_dict(), "model": {"depth": 14}}), precision="fp32",
                     world_size=1)
    assert model.format(latest_checkpoint(run)) in str(err.value)


def test_override_lr_after_a_nonfinite_stop_takes_effect_and_is_recorded(tmp_path):
    args = (*_args(lr=2000, max_steps=8), "--checkpoint-every", "1", "--output-dir", tmp_path, "--run-name", "n")
    out = run_cli(*args)
    assert out.returncode == EXIT_NONFINITE, out.stderr[-3000:]
    run = tmp_path / "n"
    newest = latest_checkpoint(run)
    stop = out.stderr.split("resnet-scale train: stopped: ")[1]
    assert f"The newest checkpoint, {newest} (step {int(newest.name[5:])}), holds finite weights" in stop
    assert "a lower --lr than this run's 2000" in stop and "--max-grad-norm 1.0 (this run does not clip" in stop
    assert "--override lr" in stop and "--precision" not in stop  # fp32: no precision advice
    start = run / "checkpoints" / "step-000000002"
    out = run_cli("--resume", start, "--override", "lr", "--lr", "0.05")
    assert out.returncode == 0, out.stderr[-3000:]
    train = [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert train[0]["lr"] == pytest.approx(1000.0)  # the first part of the run, at its own rate
    for r in train[2:]:  # after the resumed step 2: the new peak rate on the same schedule
        assert r["lr"] == pytest.approx(0.05 * lr_factor(r["step"], total_steps=8, warmup_steps=4,
                                                         schedule="cosine"), rel=1e-12, abs=1e-15)
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["optim"]["lr"] == 0.05
    assert saved["overrides"] == [{"after_step": 2, "setting": "optim.lr", "flag": "--lr", "from": 2000.0, "to": 0.05}]


def _changed(cfg: Config, name: str) -> Config:
    """``cfg`` with setting ``name`` set to another valid value that also resolves to another one."""
    from typing import Literal, get_args, get_origin

    special = {"model.depth": 20, "model.layers": (1, 1, 1), "model.stem": "imagenet", "data.image_size": 24,
               "data.augment": "none", "data.crop_padding": 1, "distributed.distributed": "deepspeed",
               "distributed.offload": "optimizer", "train.tags": ("a",), "memory.activation_compression": "int8"}
    section, key = name.split(".")
    out = Config.from_dict(cfg.to_dict())
    old = get(cfg, name)
    tp, _ = field_type(type(getattr(cfg, section)), key)
    if name in special:
        new = special[name]
    elif get_origin(tp) is Literal:
        new = next(choice for choice in get_args(tp) if choice != old)
    elif tp is bool:
        new = not old
    elif tp is int:
        new = (old or 0) + 1
    elif tp is float:
        new = (old or 0.25) * 2
    else:
        new = "elsewhere"
    setattr(getattr(out, section), key, new)
    return out


def test_every_setting_is_either_free_or_changes_the_run():
    base = Config()
    base.data.source = "synthetic"  # its sizes count
    for name in fields():
        found = [d.name for d in differences(base, _changed(base, name))]
        if name == "data.data_dir":  # synthetic images are not read from a folder
            assert found == []
            cifar = Config.from_dict({"data": {"source": "cifar10"}})
            found = [d.name for d in differences(cifar, _changed(cifar, name))]
        assert found == ([] if name in FREE else [name]), name
    # the ones that do: model, data, optimizer and schedule, engine, length, batch, seed
    assert {"model.depth", "data.source", "optim.lr", "optim.schedule", "distributed.zero_stage", "train.max_steps",
            "train.batch_size", "train.seed"}.isdisjoint(FREE)
    # the ones that do not: where files go, what is logged, checkpoint cadence, memory spent on the same steps
    assert {"train.tracker", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
            "train.output_dir", "train.resume", "memory.micro_batch_size", "data.num_workers"} <= FREE
    # Two spellings of one setting are the same setting.
    same = Config.from_dict({"data": {"source": "synthetic", "augment": "crop+flip", "crop_padding": 4,
                                      "image_size": 32},
                             "model": {"stem": "cifar", "layers": [2, 2, 2, 2]}, "distributed": {"distributed": "ddp"}})
    assert differences(base, same) == []
    unset = Config.from_dict({"data": {"source": "synthetic"}, "memory": {"activation_compression": "none"}})
    assert base.memory.activation_compression is None and differences(base, unset) == []  # not given = none
    with_steps = Config.from_dict({"train": {"max_steps": 50}})
    assert differences(with_steps, Config.from_dict({"train": {"max_steps": 50, "epochs": 3}})) == []


def test_override_names_and_run_settings(tmp_path):
    assert parse_overrides("lr,--max-grad-norm,batch_size, world-size,optim.momentum,precision,data") == {
        "optim.lr", "optim.max_grad_norm", "train.batch_size", "world_size", "optim.momentum", "memory.precision",
        "data.source"}
    with pytest.raises(ConfigError, match="--override lrr: no such setting"):
        parse_overrides("lr,lrr")
    # The precision as --low-memory/--max-memory resolve it and the number of processes are the run's too.
    resume = Resume(cfg=Config(), given=frozenset(), overrides=frozenset(), path=tmp_path / "r", run_cfg=Config(),
                    saved={"world_size": 2, "memory": {"precision": "fp32"}})
    with pytest.raises(ConfigError) as err:
        resume.check(Config(), precision="bf16", world_size=1)
    assert "--precision bf16 (what --low-memory / --max-memory pick) differs from the run's fp32" in str(err.value)
    assert "the number of processes 1 differs from the run's 2" in str(err.value)
    assert "--override precision,world_size" in str(err.value)
    resume.overrides = parse_overrides("precision,world_size")
    resume.check(Config(), precision="bf16", world_size=1)
    assert [(r["setting"], r["from"], r["to"]) for r in resume.record(7)] == [("memory.precision", "fp32", "bf16"),
                                                                             ("world_size", 2, 1)]
    assert resume.recorded_config(Config()).memory.precision == "bf16"


def test_a_config_file_counts_as_asked_but_never_names_or_resumes_a_run(tmp_path):
    import argparse

    path = tmp_path / "partial.yaml"
    path.write_text("optim:\n  lr: 0.1\ntrain:\n  run_name: x\n  resume: auto\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    ns = parser.parse_args(["--config", str(path), "--seed", "3"])
    assert given_fields(ns) == {"optim.lr", "train.seed"}
    cfg = config_from_args(ns)
    assert (cfg.train.run_name, cfg.train.resume, cfg.optim.lr, cfg.train.seed) == (None, None, 0.1, 3)


# ------------------------------------------------------------------ non-finite stop: what to do


def test_the_nonfinite_advice_names_the_flags_as_set_and_a_checkpoint_that_helps(tmp_path):
    cfg = Config.from_dict({"optim": {"lr": 0.4, "max_grad_norm": 2.0}})
    ckpts = [tmp_path / "r" / "checkpoints" / f"step-{n:09d}" for n in (2, 5)]
    text = resume_advice(cfg, "fp16", ckpts, first_bad=6)  # steps 6.. went bad from the weights of step 5
    assert "a lower --max-grad-norm than this run's 2" in text and "--max-grad-norm 1.0" not in text
    assert "a lower --lr than this run's 0.4" in text and "--precision bf16 or fp32 instead of fp16" in text
    assert f"the one before them is {ckpts[0]} (step 2)" in text and f"--resume {ckpts[0]} --override lr" in text
    text = resume_advice(Config(), "fp32", ckpts, first_bad=None)  # the weights went non-finite in an update
    assert f"The newest checkpoint, {ckpts[1]} (step 5), holds finite weights" in text
    assert "--resume auto --override lr" in text and "--precision" not in text
    assert "--max-grad-norm 1.0 (this run does not clip gradients)" in text
    assert "start a new run" in resume_advice(Config(), "bf16", [], first_bad=3)


# ------------------------------------------------------------------ 4. loop_state.json is input


def _state(**changes) -> LoopState:
    base = dict(step=3, epoch=0, epoch_step=3, metrics_lines=3, last_logged_step=3, best=0.5,
                window={"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "elapsed": 0.1})
    return LoopState(**{**base, **changes})


@pytest.mark.parametrize("changes, message", [
    ({"step": 7, "epoch": 1, "epoch_step": 3}, "step 7 is not a step of this run, which has 6 steps"),
    ({"epoch_step": 2}, "step 3 is not epoch 0 x 4 steps per epoch + batch 2"),
    ({"epoch": 0, "epoch_step": 5, "step": 5}, "step 5 is not epoch 0 x 4 steps per epoch + batch 5"),
    ({"last_logged_step": 4}, "last_logged_step is 4, more than the 3 steps done"),
    ({"bad_steps": 9}, "bad_steps is 9"),
    ({"best": math.nan}, "best is nan"),
    ({"best": 1.5}, "best is 1.5, expected an accuracy"),
    ({"elapsed": -1.0}, "elapsed is -1.0"),
    ({"window": {"loss_sum": math.inf, "correct": 0.0, "count": 1.0, "elapsed": 0.1}}, "window.loss_sum is inf"),
], ids=["beyond-the-end", "position", "batch-beyond-epoch", "logged-later", "bad-steps", "nan", "accuracy",
        "negative-clock", "inf-window"])
def test_loop_state_values_must_fit_the_run(changes, message):
    _state().check(steps_per_epoch=4, total_steps=6)
    with pytest.raises(ConfigError) as err:
        _state(**changes).check(steps_per_epoch=4, total_steps=6)
    assert message in str(err.value)


@pytest.mark.parametrize("spoil, message", [
    (lambda s: {**s, "step": 4, "epoch_step": 4}, "loop_state.json says step 4, the folder is step-000000003"),
    (lambda s: {**s, "metrics_lines": 99}, "metrics_lines is 99, but metrics.jsonl has 5 lines"),
    (lambda s: {**s, "metrics_lines": 1}, "metrics.jsonl line 2 is of step 2, before the checkpoint's step 3"),
    (lambda s: {**s, "best": math.nan}, "best is nan"),
    (lambda s: {**s, "surprise": 1}, "loop_state.json has unknown key(s) 'surprise'"),
], ids=["folder-step", "more-lines-than-the-file", "cut-before-the-step", "nan", "unknown-key"])
def test_a_loop_state_is_checked_against_its_folder_and_metrics(finished, tmp_path, spoil, message):
    run = _stopped(_copy(finished, tmp_path), 3, lines_after=2)
    checkpoint = latest_checkpoint(run)
    assert check_loop_state(checkpoint, steps_per_epoch=4, total_steps=6, metrics_path=run / "metrics.jsonl").step == 3
    state_file = checkpoint / "loop_state.json"
    state_file.write_text(json.dumps(spoil(json.loads(state_file.read_text()))))
    with pytest.raises(ConfigError) as err:
        check_loop_state(checkpoint, steps_per_epoch=4, total_steps=6, metrics_path=run / "metrics.jsonl")
    assert f"checkpoint {checkpoint} cannot be loaded: {message}" in str(err.value)


def test_a_loop_state_that_does_not_fit_is_refused_before_anything_changes(finished, tmp_path):
    run = _stopped(_copy(finished, tmp_path), 3, lines_after=2)
    state_file = latest_checkpoint(run) / "loop_state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "metrics_lines": 99}))
    write_marker(state_file.parent, 3)  # checksums that fit the edit: the loop-state check is what refuses
    before = _files(run)
    out = run_cli(*ARGS, "--output-dir", tmp_path, "--run-name", "fin", "--resume", "auto")
    assert out.returncode == 2, out.stderr[-3000:]
    (line,) = _error_lines(out.stderr)
    assert f"checkpoint {latest_checkpoint(run)} cannot be loaded: metrics_lines is 99, but metrics.jsonl has 5 " \
           "lines" in line
    assert "Traceback" not in out.stderr and _files(run) == before  # metrics.jsonl not cut, nothing written


# ------------------------------------------------------------------ 5. killed before the first checkpoint


def test_a_run_killed_before_its_first_checkpoint_starts_over_with_resume_auto(finished, tmp_path):
    run = _copy(finished, tmp_path)
    for name in ("summary.json", "model.safetensors"):
        (run / name).unlink()
    shutil.rmtree(run / "checkpoints")
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:2]))  # killed during step 3
    spare = tmp_path / "spare"
    shutil.copytree(run, spare / "fin")
    out = run_cli(*ARGS, "--output-dir", tmp_path, "--run-name", "fin", "--resume", "auto")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "has no checkpoint yet: starting it over in the same folder" in out.stderr
    assert _metrics(run) == _metrics(finished) and _same_weights(run, finished)
    # Final weights without a summary and no checkpoint: starting over would overwrite them; refused.
    shutil.copy(finished / "model.safetensors", spare / "fin" / "model.safetensors")
    before = _files(spare / "fin")
    out = run_cli(*ARGS, "--output-dir", spare, "--run-name", "fin", "--resume", "auto")
    assert out.returncode == 2 and "has final weights (model.safetensors)" in out.stderr, out.stderr[-3000:]
    assert _files(spare / "fin") == before
