"""The command line's conventions: help text a user can read (each default once, no reStructuredText,
metavars that say what to give), ``--version``, ``--print-config``, ``--activation-checkpointing``
(and its deprecated alias), ``--grad-accum-steps``, and ``plan`` without a budget. In-process, no
training: each test takes well under a second."""

from __future__ import annotations

import argparse
import json
import re

from pathlib import Path

import pytest
import yaml

import resnet_scale
from resnet_scale import __version__
from resnet_scale.cli import build_parser, main
from resnet_scale.cli.plan import MEMORY_SETTINGS
from resnet_scale.config import Config, ConfigError, config_from_args
from resnet_scale.config.compare import fields, overlay, parse_overrides
from resnet_scale.memory.settings import resolve_memory

#: reStructuredText that must not reach --help: ``literals``, :roles:`x`, `interpreted text`.
RST = re.compile(r"``|:(?:func|class|meth|mod|data|attr|obj|ref|doc):`|(?<![\w`])`[^`\s][^`]*`(?!`)")
#: What argparse shows when a metavar is left to it, or a bare type name.
LAZY_METAVARS = {"INT", "FLOAT", "STR"}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _all_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return {"resnet-scale": parser, **{f"resnet-scale {name}": p for name, p in _subparsers(parser).items()}}


def _option_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help of one option as --help prints it (%-expanded), on one line."""
    formatter = parser._get_formatter()
    return " ".join(formatter._expand_help(action).split()) if action.help else ""


def help_problems(parser: argparse.ArgumentParser) -> list[str]:
    """Every break of the help rules in ``parser --help``."""
    problems = []
    text = parser.format_help()
    for match in RST.finditer(text):
        context = text[max(0, match.start() - 40):match.end() + 20]
        problems.append(f"reStructuredText {match.group(0)!r} in: ...{context!r}")
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings:
            continue
        name = action.option_strings[-1]
        shown = _option_help(parser, action)
        if len(re.findall(r"\bdefault\b", shown, re.IGNORECASE)) > 1:
            problems.append(f"{name}: the default is said more than once: {shown!r}")
        if action.nargs != 0 and not isinstance(action, argparse.BooleanOptionalAction):
            metavar = action.metavar if isinstance(action.metavar, str) else None
            if metavar is None and action.choices is None:
                problems.append(f"{name}: no metavar (argparse shows {action.dest.upper()!r})")
            elif metavar in LAZY_METAVARS or metavar in (action.dest.upper(), action.dest.split(".")[-1].upper()):
                problems.append(f"{name}: metavar {metavar!r} says nothing about the value")
    return problems


@pytest.mark.parametrize("prog", sorted(_all_parsers()))
def test_every_help_follows_the_rules(prog):
    assert help_problems(_all_parsers()[prog]) == []


def test_the_help_check_sees_each_kind_of_break():
    parser = argparse.ArgumentParser(prog="x", description="Uses ``resnet_scale.models`` and :func:`build`.")
    parser.add_argument("--depth", type=int, help="Depth (default: 18). (default: 18)")
    parser.add_argument("--size", type=int, metavar="INT", help="Size.")
    parser.add_argument("--lr", type=float, help="Rate.")
    found = "\n".join(help_problems(parser))
    assert "'``'" in found and "':func:`'" in found
    assert "--depth: the default is said more than once" in found and "--depth: no metavar" in found
    assert "--size: metavar 'INT'" in found and "--lr: no metavar" in found


def test_plan_help_lists_only_what_affects_memory_and_plan_accepts_every_train_flag(capsys):
    plan_help = _subparsers(build_parser())["plan"].format_help()
    listed = {f for f in re.findall(r"^\s+(--[a-z][a-z-]*)", plan_help, re.MULTILINE)}
    train_flags = {s for a in _subparsers(build_parser())["train"]._actions for s in a.option_strings}
    for name in ("--lr", "--epochs", "--output-dir", "--tracker", "--seed", "--checkpoint-every", "--augment"):
        assert name in train_flags and name not in listed, name
    for name in ("--batch-size", "--precision", "--activation-checkpointing", "--grad-accum-steps", "--zero-stage",
                 "--image-size", "--max-memory", "--world-size", "--json"):
        assert name in listed, name
    assert MEMORY_SETTINGS <= set(fields())
    # A train command is planned as it is: the flags that do not change memory are accepted.
    assert main(["plan", "--data", "synthetic", "--layers", "1,1,1", "--image-size", "8", "--batch-size", "16",
                 "--lr", "0.3", "--epochs", "3", "--tracker", "none", "--device", "cpu"]) == 0
    assert "settings as given" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    package = Path(resnet_scale.__file__).resolve().parent  # which copy answers: a checkout or a wheel
    assert done.value.code == 0 and capsys.readouterr().out.startswith(f"resnet-scale {__version__} from {package} ")


def test_print_config_is_the_resolved_config_as_yaml_and_reads_back(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--data", "synthetic", "--layers", "1,1,1", "--lr", "0.05", "--grad-accum-steps", "2",
            "--activation-checkpointing", "block", "--tags", "a,b", "--output-dir", str(tmp_path / "runs")]
    assert main([*argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    expected = config_from_args(build_parser().parse_args(argv)).to_dict()
    assert yaml.safe_load(printed) == expected
    assert list(tmp_path.iterdir()) == []  # nothing trained, no folder made
    (tmp_path / "cfg.yaml").write_text(printed)
    assert main(["train", "--config", str(tmp_path / "cfg.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed
    # Settings that cannot work are refused in one line, as training would refuse them.
    assert main([*argv, "--micro-batch-size", "4", "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--micro-batch-size 4 and --grad-accum-steps 2 both set the micro-batch" in err[0]


def test_activation_checkpointing_and_its_deprecated_alias(capsys):
    def cfg(*argv):
        return config_from_args(build_parser().parse_args(["train", *argv]))

    assert cfg("--activation-checkpointing", "stage").memory.checkpointing == "stage"
    assert capsys.readouterr().err == ""
    # The old flag still works, says so once however often it is given, and the last value wins.
    assert cfg("--checkpointing", "block", "--checkpointing", "sqrt").memory.checkpointing == "sqrt"
    notes = capsys.readouterr().err.strip().splitlines()
    assert notes == ["resnet-scale train: note: --checkpointing is deprecated and will be removed in the next "
                     "release; use --activation-checkpointing (same values)."]
    help_text = " ".join(_subparsers(build_parser())["train"].format_help().split())
    assert "--checkpointing POLICY Deprecated alias of --activation-checkpointing" in help_text
    # Config files and saved config.json keep the key: a run of an older version loads and compares.
    old = Config.from_dict({"memory": {"checkpointing": "block"}})
    assert old.memory.checkpointing == "block" and old.to_dict()["memory"]["checkpointing"] == "block"
    assert parse_overrides("activation-checkpointing") == parse_overrides("checkpointing") == {"memory.checkpointing"}


def test_grad_accum_steps_sets_the_micro_batch_and_refuses_what_does_not_divide(tmp_path):
    def parse(*argv):
        return config_from_args(build_parser().parse_args(["train", *argv]))

    settings = resolve_memory(parse("--batch-size", "64", "--grad-accum-steps", "4"), world_size=2, device_type="cpu")
    assert (settings.per_device_batch, settings.micro_batch_size, settings.accumulation_steps) == (32, 8, 4)
    with pytest.raises(ConfigError, match=r"--grad-accum-steps 5 must divide the per-device batch 32 \(--batch-size "
                                          r"64 / 2 processes\) into equal micro-batches; divisors up to 64: 1, 2, 4, 8"):
        resolve_memory(parse("--batch-size", "64", "--grad-accum-steps", "5"), world_size=2, device_type="cpu")
    with pytest.raises(ConfigError, match="--micro-batch-size 8 and --grad-accum-steps 4 both set the micro-batch"):
        parse("--micro-batch-size", "8", "--grad-accum-steps", "4").validate()
    with pytest.raises(ConfigError, match="--grad-accum-steps 0 must be at least 1"):
        parse("--grad-accum-steps", "0").validate()
    # A flag given wins over its alternative from a config file, and over a resumed run's.
    (tmp_path / "c.yaml").write_text("memory:\n  grad_accum_steps: 4\n")
    cfg = parse("--config", str(tmp_path / "c.yaml"), "--micro-batch-size", "8").validate()
    assert (cfg.memory.micro_batch_size, cfg.memory.grad_accum_steps) == (8, None)
    assert parse("--config", str(tmp_path / "c.yaml")).memory.grad_accum_steps == 4
    run = Config.from_dict({"memory": {"grad_accum_steps": 4}})
    merged = overlay(run, parse("--micro-batch-size", "8"), {"memory.micro_batch_size"})
    assert (merged.memory.micro_batch_size, merged.memory.grad_accum_steps) == (8, None)


def test_plan_without_a_budget_prints_the_estimate_of_the_flags_as_given(capsys):
    from resnet_scale.planner import estimate_memory

    argv = ["--data", "synthetic", "--layers", "1,1,1", "--image-size", "8", "--batch-size", "16",
            "--grad-accum-steps", "2"]
    assert main(["plan", *argv]) == 0
    out = capsys.readouterr().out
    assert "settings as given: fp32, micro-batch 8 x 2 = 16/device" in out and "predicted peak" in out
    assert "fastest plan" not in out and "budget" not in out.splitlines()[0]
    assert main(["plan", *argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = estimate_memory(config_from_args(build_parser().parse_args(["plan", *argv])), device_type="cuda")
    assert result["predicted_peak_bytes"] == expected.total and result["breakdown"] == expected.breakdown()
    assert (result["fits"], result["plan"], result["flags"]) == (None, None, [])
    # A plan with smaller micro-batches says them as the command does: as accumulation steps (the
    # smallest plan, for a budget nothing fits, has the smallest micro-batch).
    assert main(["plan", *argv, "--json", "--max-memory", "1MiB"]) == 3
    result = json.loads(capsys.readouterr().out)
    steps = result["plan"]["settings"]["accumulation_steps"]
    assert steps > 2 and "--micro-batch-size" not in result["flags"]
    assert result["flags"][result["flags"].index("--grad-accum-steps") + 1] == str(steps)
