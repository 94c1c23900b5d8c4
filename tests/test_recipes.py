"""The comparison recipes (launch/experiments/*.sh): the commands each one runs (a dry run, with and
without CIFAR-10 present) and each one end to end on digits, shrunk to seconds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_train_e2e import FORK, REPO  # noqa: E402


def _recipe(name, tmp_path, **env):
    full = {**os.environ, "RUNS_DIR": str(tmp_path / "runs"), "REPORTS_DIR": str(tmp_path / "reports"), **env}
    return subprocess.run(["bash", str(REPO / "launch" / "experiments" / name)], capture_output=True, text=True,
                          env=full, timeout=600, cwd=tmp_path)


@pytest.mark.parametrize("recipe, group, blocks, depth, arm_flag, group_by, digits_epochs", [
    ("plain_vs_basic_r18.sh", "r18-plain-vs-basic", ("plain", "basic"), "18", "--block", "block", "5"),
    ("basic_vs_bottleneck_r50.sh", "r50-basic-vs-bottleneck", ("basic", "bottleneck"), "50", "--block", "block", "5"),
    ("activation_compression.sh", "r20-activation-compression", ("none", "int8", "int4", "int2"), "20",
     "--activation-compression", "activation_compression", "15"),
])
def test_recipes_train_each_arm_and_seed_alike_then_report(recipe, group, blocks, depth, arm_flag, group_by,
                                                           digits_epochs, tmp_path):
    (tmp_path / "data" / "cifar-10-batches-py").mkdir(parents=True)  # CIFAR-10 is there: the default
    (tmp_path / "empty").mkdir()
    out = _recipe(recipe, tmp_path, DRY_RUN="1", SEEDS="0 1", DATA_DIR=str(tmp_path / "data"))
    assert out.returncode == 0, out.stderr
    commands = [line[2:].split() for line in out.stdout.splitlines() if line.startswith("+ ")]
    train, report = commands[:-1], commands[-1]
    assert [(c[c.index(arm_flag) + 1], c[c.index("--seed") + 1]) for c in train] == \
        [(b, s) for s in ("0", "1") for b in blocks]
    assert len({c[c.index("--block") + 1] for c in train}) == (1 if arm_flag != "--block" else len(blocks))
    for c in train:  # CIFAR-10, 100 epochs, equal batch size and learning rate for every run
        for flag, value in (("--data", "cifar10"), ("--data-dir", str(tmp_path / "data")), ("--depth", depth),
                            ("--batch-size", "128"), ("--lr", "0.1"), ("--epochs", "100"), ("--tracker", "wandb"),
                            ("--output-dir", str(tmp_path / "runs"))):
            assert c[c.index(flag) + 1] == value, (flag, c)
        assert c[c.index("--run-group") + 1] == group
    # no CIFAR-10 in DATA_DIR nor the Hugging Face cache: digits (offline), the recipe's digits epochs
    offline = _recipe(recipe, tmp_path, DRY_RUN="1", SEEDS="0", DATA_DIR=str(tmp_path / "empty"),
                      HF_DATASETS_CACHE=str(tmp_path / "empty"))
    assert offline.returncode == 0 and "digits instead" in offline.stdout, offline.stderr
    for c in [line[2:].split() for line in offline.stdout.splitlines() if line.startswith("+ ")][:-1]:
        assert c[c.index("--data") + 1] == "digits" and c[c.index("--epochs") + 1] == digits_epochs and "--data-dir" not in c
    assert report[:3] == ["resnet-scale", "report", str(tmp_path / "runs")]
    assert report[report.index("--group-by") + 1] == group_by and report[report.index("--baseline") + 1] == blocks[0]

    bad = _recipe(recipe, tmp_path, DRY_RUN="1", EPOCHS="zero")
    assert bad.returncode == 2 and "EPOCHS must be a positive integer" in bad.stderr


def _tracking_flags_wired() -> bool:
    from resnet_scale.cli import build_parser

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    return all(f in train._option_string_actions for f in ("--tracker", "--run-group", "--tags"))


@pytest.mark.e2e
@pytest.mark.skipif(not _tracking_flags_wired(), reason="resnet-scale train has no --tracker/--run-group yet")
@pytest.mark.parametrize("recipe, groups", [("plain_vs_basic_r18.sh", ["plain", "basic"]),
                                            ("basic_vs_bottleneck_r50.sh", ["basic", "bottleneck"]),
                                            ("activation_compression.sh", ["none", "int8", "int4", "int2"])])
def test_digits_recipe_runs_end_to_end_offline(recipe, groups, tmp_path):
    """The digits form of each recipe, shrunk (one seed, one epoch, 3-block model at 8 px): ~25 s."""
    # ``python -m resnet_scale`` through tests/workers/cli_client.py: a child of the tests' CLI server
    # (unless RESNET_SCALE_TESTS_NO_FORK=1), instead of two seconds of imports per command.
    python, server = [sys.executable, "-m", "resnet_scale"], {}
    if FORK:
        from _cli_server import client_command

        python, server = client_command({**os.environ, "PYTHONUNBUFFERED": "1"})
    out = _recipe(recipe, tmp_path, DATA="digits", EPOCHS="1", SEEDS="0", TRACKER="none", OMP_NUM_THREADS="1",
                  EXTRA="--layers 1,1,1 --image-size 8 --batch-size 128 --device cpu",
                  REPORT_CMD=" ".join([*python, "report"]), TRAIN_CMD=" ".join([*python, "train"]),
                  PYTHONPATH=str(REPO), **server)
    assert out.returncode == 0, out.stderr[-3000:]
    short = {"activation_compression.sh": "r20"}.get(recipe) or recipe.split("_")[-1].removesuffix(".sh")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(f"{short}-{g}-s0" for g in groups)
    assert (tmp_path / "reports" / "report.html").is_file()
    result = json.loads((tmp_path / "reports" / "report.json").read_text())
    found = [g["group"] for g in result["groups"]]
    assert found[0] == groups[0] and sorted(found) == sorted(groups)  # the recipe's baseline first
