"""``train()`` any number of times in one process (a notebook), with different settings: each run
trains exactly as in a fresh process, and the process is left as it was (Accelerate's state, the
environment, torch's switches, random generators, logger level, signal handlers, process group)."""

import argparse
import json
import logging
import os
import random
import signal
import sys
from pathlib import Path

import numpy
import pytest
import torch

from resnet_scale.config import add_config_arguments, config_from_args
from resnet_scale.train.run_dir import load_weights

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import ranks  # noqa: E402
from test_train_e2e import read_jsonl, run_cli  # noqa: E402

FLAGS = ("--data", "synthetic", "--layers", "1,1,1", "--image-size", "8", "--synthetic-train-samples", "48",
         "--synthetic-test-samples", "16", "--batch-size", "16", "--epochs", "2", "--log-every", "1",
         "--tracker", "none", "--device", "cpu", "--lr", "0.05")
#: fp32 deterministic, then bf16: the second run would see the first's switches if they stayed.
SETTINGS = {"fp32": ("--deterministic",), "bf16": ("--precision", "bf16")}
WORKER = Path(__file__).parent / "workers" / "train_several.py"


def config(*argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args([str(a) for a in argv])).validate()


def metrics(run: Path) -> list:
    """metrics.jsonl without what depends on the clock."""
    return [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in read_jsonl(run / "metrics.jsonl")]


def assert_same_run(run: Path, reference: Path) -> None:
    assert metrics(run) == metrics(reference)
    weights, expected = load_weights(run / "model.safetensors"), load_weights(reference / "model.safetensors")
    assert weights.keys() == expected.keys()
    for key in expected:
        assert torch.equal(weights[key], expected[key]), key


def process_state() -> dict:
    """The process-global settings a run changes, as the test can see them."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    return {
        "environ": dict(os.environ),
        "accelerate": [dict(s._shared_state) for s in (AcceleratorState, PartialState, GradientState)],
        "deterministic": (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled()),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "default_dtype": torch.get_default_dtype(),
        "threads": torch.get_num_threads(),
        "log_level": logging.getLogger("resnet_scale").level,
        "handlers": [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)],
        "matmul_precision": torch.get_float32_matmul_precision(),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": torch.from_numpy(numpy.random.get_state()[1].copy()),
        "python_rng": random.getstate(),
    }


def assert_same_state(after: dict, before: dict) -> None:
    for key in before:
        if key.endswith("_rng") and key != "python_rng":
            assert torch.equal(after[key], before[key]), key
        else:
            assert after[key] == before[key], key


@pytest.fixture(scope="module")
def fresh_runs(tmp_path_factory):
    """Each setting trained by ``resnet-scale train`` in a process of its own."""
    out = tmp_path_factory.mktemp("fresh")
    for name, extra in SETTINGS.items():
        done = run_cli(*FLAGS, *extra, "--output-dir", out, "--run-name", name)
        assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_fp32_then_bf16_in_one_process_train_as_fresh_processes_and_leave_it_as_it_was(tmp_path, fresh_runs):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from resnet_scale.train import train

    AcceleratorState._reset_state(True)
    mine = Accelerator(cpu=True)  # the caller's own Accelerator, made before the runs
    torch.manual_seed(123)
    logging.getLogger("resnet_scale").setLevel(logging.ERROR)
    before = process_state()
    for name, extra in SETTINGS.items():
        summary = train(config(*FLAGS, *extra, "--output-dir", tmp_path, "--run-name", name))
        assert summary["memory"]["precision"] == name
        assert_same_state(process_state(), before)
        assert_same_run(tmp_path / name, fresh_runs / name)
    assert mine.state.mixed_precision == "no" and mine.device.type == "cpu"  # the caller's state is back
    AcceleratorState._reset_state(True)


def test_a_failed_run_leaves_the_process_as_it_was(tmp_path):
    """A run that stops in its setup (here: the run folder already holds a run) after the Accelerator
    and the switches were set still puts everything back."""
    from resnet_scale.config import ConfigError
    from resnet_scale.train import train

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    before = process_state()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config(*FLAGS, "--deterministic", "--precision", "bf16", "--output-dir", tmp_path, "--run-name", "taken"))
    assert_same_state(process_state(), before)


def _launch(tmp_path: Path, nproc: int, mode: str, out_dir: Path, *extra: str) -> list[dict]:
    out = tmp_path / f"{mode}.json"
    done = run_cli(out, mode, *FLAGS, *extra, "--output-dir", out_dir, launcher=ranks(nproc, WORKER), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(nproc)]


@pytest.mark.multiprocess
def test_several_runs_in_one_launch(tmp_path):
    """Two processes under one launcher: a second train() after one that started and ended the
    process group is refused in one line (it hung before: a new group on the launcher's store); with
    a group the caller started, fp32, ZeRO-2 and fp32 again all train, the last exactly as the first
    run of the refused launch, and the group stays open. One process under no group: ZeRO-2 twice,
    then fp32, each ZeRO run on a group of its own."""
    ended = _launch(tmp_path, 2, "ended", tmp_path / "ended")
    for rank in ended:
        assert rank["runs"] == ["fresh"]
        assert "train() already ran in this process of a 2-process launch" in rank["second"]
        assert "init_process_group()" in rank["second"]
    assert not (tmp_path / "ended" / "again").exists()

    own = _launch(tmp_path, 2, "own-group", tmp_path / "own")
    for rank in own:
        assert rank["runs"] == ["a", "zero", "b"] and rank["group_open"] == [True, True, True]
        assert rank["accelerate_env"]["ACCELERATE_USE_DEEPSPEED"] is None
    assert_same_run(tmp_path / "own" / "a", tmp_path / "ended" / "fresh")
    assert_same_run(tmp_path / "own" / "b", tmp_path / "ended" / "fresh")


def test_one_process_zero_twice_then_ddp(tmp_path, fresh_runs):
    """One process, ZeRO-2 with no process group to start from: each ZeRO run starts a world of one
    and ends it (DeepSpeed's cached groups forgotten: the second failed with "Group ... is not
    registered"), ACCELERATE_USE_DEEPSPEED goes with it, and a DDP run after them trains exactly as in
    a fresh process."""
    (rank,) = _launch(tmp_path, 1, "alone", tmp_path / "alone", *SETTINGS["fp32"])
    assert rank["runs"] == ["zero1", "zero2", "a"] and rank["group_open"] == [False, False, False]
    assert rank["accelerate_env"]["ACCELERATE_USE_DEEPSPEED"] is None
    assert_same_run(tmp_path / "alone" / "zero2", tmp_path / "alone" / "zero1")
    assert_same_run(tmp_path / "alone" / "a", fresh_runs / "fp32")
