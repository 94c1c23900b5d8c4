"""The launch files (launch/accelerate/*.yaml, launch/torchrun.sh, launch/slurm/train.sbatch) and
the commands of docs/distributed.md: valid for the installed Accelerate, consistent with
train.py's flags, and naming files that exist. Fast: nothing here starts a training process
(the multi-process tests do that); the shell scripts run against stand-ins for torchrun and SLURM.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_DIR = ROOT / "launch" / "accelerate"
TORCHRUN_SH = ROOT / "launch" / "torchrun.sh"
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
DOC = ROOT / "docs" / "distributed.md"
README = ROOT / "README.md"

#: file -> (distributed_type, num_machines, num_processes)
YAMLS = {
    "single_gpu.yaml": ("NO", 1, 1),
    "multi_gpu.yaml": ("MULTI_GPU", 1, 8),
    "deepspeed_zero1.yaml": ("DEEPSPEED", 1, 8),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 1, 8),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 1, 8),
    "deepspeed_zero3_offload.yaml": ("DEEPSPEED", 1, 8),
    "multi_node.yaml": ("MULTI_GPU", 2, 16),
}

#: In a DEEPSPEED config these make Accelerate refuse the DeepSpeed config the trainer builds
#: ("When using `deepspeed_config_file`, the following accelerate config variables will be
#: ignored", accelerate 1.15 DeepSpeedPlugin._deepspeed_config_checks; seen with mixed_precision
#: 'no' and zero_stage 2), or they would contradict the flags, which are the single source of truth.
FLAG_OWNED_DS_KEYS = {
    "zero_stage", "offload_optimizer_device", "offload_param_device", "offload_optimizer_nvme_path",
    "offload_param_nvme_path", "gradient_accumulation_steps", "gradient_clipping",
    "zero3_save_16bit_model", "deepspeed_config_file", "mixed_precision",
}

#: Where a command is a placeholder for "0 or 1", tests substitute 0.
PLACEHOLDERS = {"R": "0"}


# -- helpers ---------------------------------------------------------------------------------------

def _accelerate_parser():
    from accelerate.commands.launch import launch_command_parser

    return launch_command_parser()


def _check_train_args(args: list[str], where: str) -> None:
    """train.py's own parser accepts ``args`` and the resulting config validates."""
    from resnet_scale.cli import build_parser
    from resnet_scale.config import config_from_args

    try:
        ns = build_parser().parse_args(["train", *args])
    except SystemExit:
        pytest.fail(f"{where}: train.py rejects {args}")
    config_from_args(ns).validate()


def _check_accelerate_command(tokens: list[str], where: str, need_config: bool = True) -> argparse.Namespace:
    assert tokens[:2] == ["accelerate", "launch"], where
    tokens = [PLACEHOLDERS.get(t, t) for t in tokens[2:]]
    try:
        ns = _accelerate_parser().parse_args(tokens)
    except SystemExit:
        pytest.fail(f"{where}: accelerate launch rejects {tokens}")
    assert ns.config_file or not need_config, f"{where}: no --config_file"
    assert not ns.config_file or (ROOT / ns.config_file).is_file(), f"{where}: {ns.config_file} does not exist"
    _check_script(ns.module, ns.training_script, ns.training_script_args, where)
    return ns


def _check_script(module: bool, script: str, args: list[str], where: str) -> None:
    """A launcher's script part: ``launch/train.py FLAGS`` or the package's ``-m resnet_scale train FLAGS``."""
    if module:
        assert script == "resnet_scale" and args[:1] == ["train"], f"{where}: -m {script} {args[:1]}"
        args = args[1:]
    else:
        assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
    _check_train_args(args, where)


def _header_command(path: Path) -> list[str]:
    """The first `accelerate launch ...` command in the file's leading comment."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("accelerate launch") or re.match(r"node \d+: accelerate launch", text):
            return shlex.split(text.split(": ", 1)[1] if text.startswith("node") else text)
    pytest.fail(f"{path.name}: its leading comment gives no `accelerate launch` command")


def _sbatch_directives() -> tuple[list[str], list[str]]:
    """(#SBATCH lines sbatch reads, ##SBATCH lines switched off) up to the first command line."""
    active, disabled = [], []
    for line in SBATCH.read_text().splitlines()[1:]:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break  # sbatch stops reading directives at the first command
        if stripped.startswith("#SBATCH"):
            active.append(stripped[len("#SBATCH"):].strip())
        elif stripped.startswith("##SBATCH"):
            disabled.append(stripped[len("##SBATCH"):].strip())
    return active, disabled


def _bash(script: Path | str, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT):
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=30)


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without launcher or SLURM variables of the machine running the tests."""
    drop = ("SLURM_", "MASTER_", "NNODES", "NODE_RANK", "NPROC", "RDZV_ID", "PET_", "CUDA_VISIBLE_DEVICES",
            "TORCHRUN", "REPO_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


@pytest.fixture
def fake_torchrun(tmp_path: Path) -> Path:
    """A `torchrun` that prints its arguments, one per line, and NODE_RANK."""
    path = tmp_path / "fake_torchrun"
    path.write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        echo "FAKE_TORCHRUN node=${SLURM_NODEID:-none}"
        printf 'ARG %s\\n' "$@"
    """))
    path.chmod(0o755)
    return path


def _args_of(stdout: str) -> list[list[str]]:
    """The argument lists of each fake torchrun call in ``stdout``."""
    calls: list[list[str]] = []
    for line in stdout.splitlines():
        if line.startswith("FAKE_TORCHRUN"):
            calls.append([])
        elif line.startswith("ARG ") and calls:
            calls[-1].append(line[4:])
    return calls


# -- Accelerate configs ----------------------------------------------------------------------------

def test_every_yaml_is_listed():
    assert sorted(p.name for p in ACCELERATE_DIR.glob("*.yaml")) == sorted(YAMLS)


@pytest.mark.parametrize("name", sorted(YAMLS))
def test_yaml_loads_through_accelerate(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    path = ACCELERATE_DIR / name
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict)
    # Accelerate's own loader: it refuses unknown top-level keys.
    config = ClusterConfig.from_yaml_file(str(path))
    assert isinstance(load_config_from_file(str(path)), ClusterConfig)
    distributed_type, machines, processes = YAMLS[name]
    assert config.distributed_type == DistributedType(distributed_type)
    assert (config.num_machines, config.num_processes) == (machines, processes)
    # Precision is --precision's; a top-level mixed_precision also breaks DeepSpeed (see above).
    assert "mixed_precision" not in raw, f"{name}: precision comes from --precision"
    # deepspeed_config sub-keys become `accelerate launch` options: each must be one.
    options = {a.dest for a in _accelerate_parser()._actions}
    unknown = set(config.deepspeed_config) - options
    assert not unknown, f"{name}: deepspeed_config keys unknown to accelerate launch: {unknown}"
    if distributed_type == "DEEPSPEED":
        owned = set(config.deepspeed_config) & FLAG_OWNED_DS_KEYS
        assert not owned, f"{name}: {owned} belong to train.py's flags (--zero-stage, --offload, ...)"
    else:
        assert not config.deepspeed_config


@pytest.mark.parametrize("name", sorted(YAMLS))
def test_yaml_starts_with_its_command(name):
    path = ACCELERATE_DIR / name
    assert path.read_text().startswith("#"), f"{name} must start with a comment giving its command"
    ns = _check_accelerate_command(_header_command(path), name)
    assert Path(ns.config_file) == Path("launch/accelerate") / name
    train_args = ns.training_script_args
    if name.startswith("deepspeed_zero"):
        stage = re.match(r"deepspeed_zero(\d)", name).group(1)
        assert train_args[train_args.index("--distributed") + 1] == "deepspeed"
        assert train_args[train_args.index("--zero-stage") + 1] == stage
    if name == "deepspeed_zero3_offload.yaml":
        assert "--offload" in train_args


def test_multi_node_yaml_names_the_main_process():
    raw = yaml.safe_load((ACCELERATE_DIR / "multi_node.yaml").read_text())
    assert raw["main_process_ip"] and isinstance(raw["main_process_port"], int)
    assert raw["machine_rank"] == 0  # overridden with --machine_rank on the other machines
    assert "--machine_rank" in (ACCELERATE_DIR / "multi_node.yaml").read_text().split("distributed_type")[0]


# -- torchrun.sh -----------------------------------------------------------------------------------

@pytest.mark.parametrize("script", [TORCHRUN_SH, SBATCH], ids=["torchrun.sh", "train.sbatch"])
def test_shell_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_torchrun_sh_help():
    for flag in ("-h", "--help"):
        result = _bash(TORCHRUN_SH, flag, env=_clean_env())
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage:")
        for var in ("NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID"):
            assert var in result.stdout


def test_torchrun_sh_single_node_forwards_every_argument(fake_torchrun, tmp_path):
    args = ["--data", "digits", "--output-dir", str(tmp_path / "with space"), "--batch-size", "32"]
    result = _bash(TORCHRUN_SH, *args, env=_clean_env(TORCHRUN=str(fake_torchrun), NPROC="2"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (call,) = _args_of(result.stdout)
    assert call == ["--standalone", "--nnodes", "1", "--nproc-per-node", "2", str(ROOT / "launch" / "train.py"), *args]


def test_torchrun_sh_counts_visible_gpus(fake_torchrun):
    env = _clean_env(TORCHRUN=str(fake_torchrun), CUDA_VISIBLE_DEVICES="0,1,2")
    (call,) = _args_of(_bash(TORCHRUN_SH, env=env).stdout)
    assert call[call.index("--nproc-per-node") + 1] == "3"


def test_torchrun_sh_multi_node_uses_c10d(fake_torchrun):
    env = _clean_env(TORCHRUN=str(fake_torchrun), NPROC="1", NNODES="2", NODE_RANK="1",
                     MASTER_ADDR="10.1.2.3", MASTER_PORT="29555", RDZV_ID="job7")
    result = _bash(TORCHRUN_SH, "--data", "digits", env=env)
    assert result.returncode == 0, result.stderr
    (call,) = _args_of(result.stdout)
    assert call[:12] == ["--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                         "--rdzv-endpoint", "10.1.2.3:29555", "--rdzv-id", "job7"]
    assert call[12:] == [str(ROOT / "launch" / "train.py"), "--data", "digits"]


@pytest.mark.parametrize("env, message", [
    ({"NNODES": "2", "NODE_RANK": "0"}, "MASTER_ADDR"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "127.0.0.1"}, "NODE_RANK must be 0..1"),
    ({"NPROC": "two"}, "NPROC must be a positive integer"),
])
def test_torchrun_sh_refuses_bad_settings(fake_torchrun, env, message):
    result = _bash(TORCHRUN_SH, env=_clean_env(TORCHRUN=str(fake_torchrun), **env))
    assert result.returncode == 2
    assert message in result.stderr
    assert "FAKE_TORCHRUN" not in result.stdout


# -- SLURM -----------------------------------------------------------------------------------------

def test_sbatch_directives():
    active, disabled = _sbatch_directives()
    assert "--nodes=2" in active
    assert "--ntasks-per-node=1" in active
    assert "--gpus-per-node=8" in active
    assert any(d.startswith("--cpus-per-task=") for d in active)
    # Prepared but off until the trainer checkpoints on a signal (see docs/distributed.md).
    assert "--signal=B:USR1@120" in disabled
    assert "--requeue" in disabled


def test_sbatch_runs_torchrun_sh_once_per_node(fake_torchrun, tmp_path):
    """The sbatch script against stand-ins for scontrol, srun and torchrun."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        [[ "$1 $2" == "show hostnames" ]] && printf 'gpu-node-a\\ngpu-node-b\\n'
    """))
    # srun: skip its options, run the command once per node with that node's SLURM_NODEID.
    (bin_dir / "srun").write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        nodes=1
        while [[ "${1:-}" == --* ]]; do [[ "$1" == --nodes=* ]] && nodes="${1#--nodes=}"; shift; done
        for ((i = 0; i < nodes; i++)); do SLURM_NODEID=$i "$@" || exit $?; done
    """))
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = _clean_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}", TORCHRUN=str(fake_torchrun), CUDA_VISIBLE_DEVICES="0,1,2,3",
        SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu-node-[a-b]",
        SLURM_SUBMIT_DIR=str(ROOT),
    )
    args = ["--data", "digits", "--output-dir", str(tmp_path / "a b")]
    result = _bash(SBATCH, *args, env=env, cwd=tmp_path)  # submitted elsewhere: the script finds ROOT
    assert result.returncode == 0, result.stderr
    calls = _args_of(result.stdout)
    assert len(calls) == 2
    for node, call in enumerate(calls):
        assert call[:12] == ["--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "4",
                             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"gpu-node-a:{20000 + 4242}",
                             "--rdzv-id", "4242"]
        assert call[12:] == [str(ROOT / "launch" / "train.py"), *args]


# -- docs/distributed.md ---------------------------------------------------------------------------

_COMMAND_WORDS = {"accelerate", "bash", "sbatch", "python", "torchrun"}
_REPO_PATH = re.compile(r"(?<![\w/.-])((?:launch|ds_configs|docs|benchmarks|tests|resnet_scale)/[\w./-]*\w)")


def _doc_commands(doc: Path = DOC) -> list[str]:
    """Shell commands quoted in ``doc``: lines of fenced blocks and inline code spans."""
    text = doc.read_text()
    commands, prose = [], []
    in_fence = False
    pending = ""
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence:
            line = pending + line.strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            if line and not line.startswith("#"):
                commands.append(line.rstrip("&").strip())
        else:
            prose.append(line)
    commands += re.findall(r"`([^`]+)`", "\n".join(prose).replace("\n", " "))
    result = []
    for command in commands:
        words = command.split()
        while words and re.match(r"^[A-Z_]+=", words[0]):  # leading VAR=value assignments
            words.pop(0)
        if words and words[0] in _COMMAND_WORDS:
            result.append(command)
    return result


def test_doc_commands_name_files_that_exist():
    commands = _doc_commands()
    assert len(commands) >= 15
    for command in commands:
        paths = _REPO_PATH.findall(command)
        if not paths and " -m resnet_scale train" in command:
            continue  # the package's own entry point: no file of the repository needed
        assert paths, f"docs/distributed.md: `{command}` names no file of the repository"
        for path in paths:
            assert (ROOT / path).exists(), f"docs/distributed.md: `{command}` names {path}, which does not exist"


@pytest.mark.parametrize("doc", [DOC, README], ids=["distributed.md", "README.md"])
def test_doc_commands_parse(doc):
    """accelerate launch accepts each `accelerate launch` command, train.py accepts its flags."""
    for command in _doc_commands(doc):
        tokens = [t for t in shlex.split(command, comments=True) if t != "..."]
        while tokens and re.match(r"^[A-Z_]+=", tokens[0]):
            tokens.pop(0)
        if tokens[:2] == ["accelerate", "launch"]:  # the guide gives every one its config file
            _check_accelerate_command(tokens, f"docs: `{command}`", need_config=doc == DOC)
        elif tokens[0] == "torchrun" and ("-m" in tokens or any(t.endswith(".py") for t in tokens)):
            from torch.distributed.run import get_args_parser

            ns = get_args_parser().parse_args(tokens[1:])
            _check_script(ns.module, ns.training_script, ns.training_script_args, f"docs: `{command}`")
        elif tokens[0] in ("bash", "sbatch"):
            rest = list(tokens[1:])
            while rest and rest[0].startswith("-") and not rest[0].endswith((".sh", ".sbatch")):
                rest.pop(0)  # sbatch's own options
            script, args = rest[0], rest[1:]
            assert (ROOT / script).is_file(), command
            if args not in ([], ["-h"]):
                _check_train_args(args, f"docs: `{command}`")


def test_doc_covers_every_launch_file():
    commands = " ".join(_doc_commands())
    for path in [*(f"launch/accelerate/{n}" for n in YAMLS), "launch/torchrun.sh", "launch/slurm/train.sbatch"]:
        assert path in commands, f"docs/distributed.md gives no command for {path}"
