"""A user's path from a wheel: build it from a clean clone of this repository's HEAD, install it into a
fresh virtual environment outside the repository, and run the commands there, in a folder outside
the repository: ``resnet-scale --version``, ``resnet-scale plan --zero-stage 2``, a 2-rank
``torchrun -m resnet_scale train --zero-stage 2`` on gloo and ``accelerate launch -m resnet_scale
train`` with the Accelerate config the wheel ships.

No network: the wheel is built with the build tools already installed (``--no-build-isolation``)
and installed without its dependencies, which the virtual environment reads from the site-packages
of the Python running the tests (a ``.pth`` line). A directory added that way does not run the
``.pth`` files in it, so an editable install of this repository there (``pip install -e .``) cannot
shadow the wheel; every command proves where its package came from (``--version`` names the folder,
each run's ``config.json`` records it).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data", "synthetic", "--layers", "1,1,1", "--image-size", "8", "--batch-size", "8", "--max-steps", "2",
        "--tracker", "none", "--output-dir", "runs"]
#: What a venv holds when torch and accelerate are installed in it: their commands, run by its Python.
LAUNCHERS = {"torchrun": "torch", "accelerate": "accelerate"}


def _run(args, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(map(str, args))} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


class _Started:
    """A command running in the background, its output in files (no pipe to fill while it runs)."""

    def __init__(self, args, cwd: Path, env: dict[str, str], log: Path):
        self.args, self.log = [str(a) for a in args], log
        with open(log, "w") as f:
            self.proc = subprocess.Popen(self.args, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True,
                                         start_new_session=True)

    def wait(self) -> str:
        code = self.proc.wait(timeout=600)
        output = self.log.read_text()
        assert code == 0, f"{' '.join(self.args)} exited {code}:\n{output[-6000:]}"
        return output

    def stop(self) -> None:
        """After a failure elsewhere: end the command and the processes it started."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _clean_clone(tmp: Path) -> Path:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the repository is not a git checkout: nothing to clone")
    src = tmp / "src"
    _run(["git", "clone", "--quiet", "--shared", "--no-checkout", ROOT, src], tmp)
    _run(["git", "-c", "advice.detachedHead=false", "checkout", "--quiet", head.stdout.strip()], src)
    return src


def _site_dirs() -> list[str]:
    """The site-packages folders of the Python running the tests (torch, accelerate, deepspeed, ...)."""
    return [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]


def _venv(project: Path) -> tuple[Path, Path]:
    """``project/.venv``, a virtual environment without the system site-packages; they are appended
    by a .pth line, which adds the folders without running the .pth files inside them (an editable
    install's)."""
    venv = project / ".venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], project)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], project).stdout.strip())
    (site / "_outer_site_packages.pth").write_text("".join(f"{d}\n" for d in _site_dirs()))
    for command, dist in LAUNCHERS.items():  # the console scripts pip would have written into the venv
        (entry,) = [e for e in importlib.metadata.distribution(dist).entry_points
                    if e.group == "console_scripts" and e.name == command]
        script = venv / "bin" / command
        script.write_text(f"#!{python}\nimport sys\nfrom {entry.module} import {entry.attr}\nsys.exit({entry.attr}())\n")
        script.chmod(0o755)
    return venv, site


def _files_under(top: Path) -> dict[str, bytes]:
    """Every file under ``top`` and its bytes (not the bytecode pip compiles at install)."""
    return {str(p.relative_to(top)): p.read_bytes() for p in sorted(top.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.multiprocess
@pytest.mark.e2e
def test_wheel_installed_outside_the_repository_runs_every_command(tmp_path):
    assert not tmp_path.is_relative_to(ROOT)
    src = _clean_clone(tmp_path)

    # Build from the clone with the installed build tools (no network), then look inside.
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", dist, src],
         tmp_path, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    (wheel,) = dist.glob("resnet_scale-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert any(n.startswith("resnet_scale-") and n.endswith("/LICENSE") for n in names), sorted(names)
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Apache" in metadata and "Project-URL" in metadata

    # A user's own project, a git repository, with the virtual environment inside it.
    work = tmp_path / "project"
    work.mkdir()
    _run(["git", "init", "--quiet", work], tmp_path)
    _run(["git", "-c", "user.name=u", "-c", "user.email=u@example.com", "commit", "--quiet", "--allow-empty", "-m", "start"],
         work)
    venv, site = _venv(work)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index", wheel],
         tmp_path, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    package = (site / "resnet_scale").resolve()

    # The package data are the repository's own files, byte for byte: DeepSpeed templates and launch files.
    for folder in ("ds_configs", "launch"):
        assert _files_under(package / folder) == _files_under(src / folder), folder

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               HF_HOME=str(tmp_path / "hf"))  # no Accelerate default config of this machine's user

    out = _run(["resnet-scale", "--version"], work, env)
    assert out.stdout.startswith(f"resnet-scale {wheel.name.split('-')[1]} from {package} ("), out.stdout

    # The three commands side by side: each is mostly one process importing torch, so together they
    # take the time of the longest one wherever a core is free.
    zero2 = _Started(["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "resnet_scale", "train",
                      "--zero-stage", "2", *TINY, "--run-name", "zero2"], work, env, tmp_path / "torchrun.log")
    yaml = package / "launch" / "accelerate" / "single_gpu.yaml"
    accelerate = _Started(["accelerate", "launch", "--config_file", yaml, "--cpu", "-m", "resnet_scale", "train",
                           *TINY, "--run-name", "accelerate"], work, env, tmp_path / "accelerate.log")
    try:
        out = _run(["resnet-scale", "plan", "--zero-stage", "2", "--data", "synthetic", "--layers", "1,1,1",
                    "--image-size", "8", "--batch-size", "8", "--max-memory", "1GiB"], work, env)
        assert "ZeRO-2" in out.stdout, out.stdout
        zero2.wait()
        accelerate.wait()
    finally:
        zero2.stop(), accelerate.stop()

    config = json.loads((work / "runs" / "zero2" / "config.json").read_text())
    assert config["world_size"] == 2 and config["config"]["distributed"]["zero_stage"] == 2
    assert (work / "runs" / "zero2" / "model.safetensors").is_file()
    assert (work / "runs" / "accelerate" / "summary.json").is_file()
    for run in ("zero2", "accelerate"):
        environment = json.loads((work / "runs" / run / "config.json").read_text())["environment"]
        assert Path(environment["package_dir"]) == package, run
        assert environment["git_commit"] is None, run  # an installed copy: not the project's commit
