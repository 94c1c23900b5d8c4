"""The typed config, the flags derived from it, and refusals of impossible settings."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resnet_scale.cli import build_parser, main
from resnet_scale.config import Config, ConfigError, load_config_file
from resnet_scale.config import add_config_arguments, config_from_args, config_to_argv, flag_name


def parse(*argv: str) -> Config:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_every_field_has_a_flag_with_help_and_default():
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(getattr(Config(), section.name)):
            assert f.metadata.get("help"), f"{section.name}.{f.name} has no help"
            assert flag_name(f) in help_text
    assert "(default: basic)" in help_text


def test_flags_override_defaults_and_types_are_parsed():
    cfg = parse("--block", "bottleneck", "--layers", "3,4,6,3", "--no-nesterov", "--max-steps", "5",
                "--data", "synthetic", "--lr", "0.05")
    assert cfg.model.block == "bottleneck" and cfg.model.layers == (3, 4, 6, 3)
    assert cfg.optim.nesterov is False and cfg.optim.lr == 0.05
    assert cfg.train.max_steps == 5 and cfg.data.source == "synthetic"
    assert parse().to_dict() == Config().to_dict()


def test_config_round_trips_through_argv_and_json(tmp_path):
    cfg = parse("--block", "plain", "--depth", "20", "--data", "synthetic", "--image-size", "16",
                "--epochs", "3", "--seed", "7", "--no-download")
    assert parse(*config_to_argv(cfg)) == cfg
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"config": cfg.to_dict(), "environment": {"torch": "x"}}))
    assert load_config_file(path) == cfg


def test_config_file_then_flags_win(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  block: bottleneck\n  depth: 50\ntrain:\n  epochs: 4\n  batch_size: 64\n")
    cfg = parse("--config", str(path), "--epochs", "2")
    assert (cfg.model.block, cfg.model.depth, cfg.train.batch_size, cfg.train.epochs) == ("bottleneck", 50, 64, 2)


@pytest.mark.parametrize(
    "text, message",
    [
        ("model:\n  blok: basic\n", "valid keys of 'model': block, depth"),
        ("model:\n  block: resnet\n", "valid values: plain, basic, bottleneck"),
        ("train:\n  epochs: many\n", "expected an integer"),
        ("- a\n- b\n", "must hold a mapping"),
    ],
)
def test_bad_config_file_is_refused_with_the_valid_values(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config_file(path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--block", "basic", "--depth", "19"], "18, 34, 50, 101, 152"),
        (["--block", "bottleneck", "--depth", "20", "--layers", "3,4"], "--layers"),
        (["--block", "plain", "--zero-init-residual"], "plain blocks"),
        (["--data", "imagefolder"], "--data-dir"),
        (["--stem", "imagenet"], "--image-size"),
        (["--nesterov", "--momentum", "0"], "--momentum"),
        (["--run-name", "../escape"], "--run-name"),
        (["--epochs", "0"], "--epochs 0 must be at least 1"),
        (["--data", "synthetic", "--image-size", "32", "--crop-padding", "40"], "--crop-padding"),
    ],
)
def test_impossible_settings_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        parse(*argv).validate()


def test_defaults_validate():
    cfg = Config().validate()
    assert cfg.stem() == "cifar" and cfg.image_size() == 16  # digits at 16 px


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--block", "resnet"], "valid values: plain, basic, bottleneck"),
        (["--data", "mnist"], "valid values: cifar10, cifar100, digits, synthetic, imagefolder"),
        (["--depth", "deep"], "expected an integer"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--depth", "19"], "18, 34, 50, 101, 152"),
    ],
)
def test_cli_bad_flags_exit_nonzero_with_a_message(argv, expected, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        code = main(["train", "--output-dir", str(tmp_path), *argv])
        raise SystemExit(code)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "a refused run must not create files"


def test_console_script_and_launch_script_share_flags():
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train_e2e import python_script

    cmd, env = python_script(Path(__file__).resolve().parents[1] / "launch" / "train.py", "--help")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **env})
    for flag in ("--block", "--depth", "--layers", "--data-dir", "--max-steps", "--run-name", "--config"):
        assert flag in out.stdout
