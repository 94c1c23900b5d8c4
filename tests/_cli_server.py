"""A pre-forked ``python -m resnet_scale``: the tests' ``run_cli`` sends each command here instead of
starting a new interpreter, and this process forks one child per command.

Why: most of a tiny CLI run is the interpreter importing torch, accelerate and the package
(seconds of one core each time). This server imports them once; each forked child is then what a
fresh ``python -m resnet_scale ARGS`` would be after its imports: its own process (own pid, exit
status, signal handlers, atexit handlers, Accelerate state), its own environment, working folder,
stdout and stderr files. Nothing here has run a torch operation before forking, so no thread pool
is copied half-alive into the children.

Protocol (one JSON object a line): the request ``{"argv", "env", "cwd", "stdout", "stderr"}`` on
stdin; the answer ``{"pid": N}`` at once, then ``{"status": S}`` (``os.waitpid``'s status) when the
child is done.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import runpy
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _child(request: dict) -> None:
    """Become ``python -m resnet_scale ARGV``: raises SystemExit with its exit status."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    import torch

    if request["env"].get("OMP_NUM_THREADS"):  # what a new interpreter reads at import
        torch.set_num_threads(int(request["env"]["OMP_NUM_THREADS"]))
    sys.path[0] = os.getcwd()  # as ``python -m`` has it
    sys.argv = ["-m", *request["argv"]]  # runpy puts the module's path in argv[0], as -m does
    try:
        runpy.run_module("resnet_scale", run_name="__main__", alter_sys=True)
    except SystemExit:
        raise
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        raise SystemExit(1) from None
    raise SystemExit(0)


def serve() -> None:
    sys.path[0] = str(REPO)  # not this file's folder: the package as ``python -m`` from the repository finds it
    # The imports every command pays for, done once (nothing that starts a thread: no wandb).
    import accelerate  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    import resnet_scale.cli  # noqa: F401
    import resnet_scale.train  # noqa: F401

    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            sys.stdin = open(os.devnull)  # the server's request pipe is not the child's
            _child(request)  # never returns: SystemExit unwinds and the interpreter exits
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": status}), flush=True)


# -- the client side, used by the tests ---------------------------------------------------------


class CliServer:
    """One server process per test process, started at the first command."""

    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-u", __file__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
        self.answers: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        atexit.register(self.close)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.answers.put(json.loads(line))
        self.answers.put(None)  # the server is gone

    def _answer(self, timeout: float | None) -> dict:
        answer = self.answers.get(timeout=timeout)
        if answer is None:
            raise RuntimeError(f"the test CLI server exited with status {self.proc.wait()}")
        return answer

    def run(self, argv: list[str], *, env: dict[str, str], cwd: Path, timeout: float,
            watch=None) -> subprocess.CompletedProcess:
        """``subprocess.run([python, -m, resnet_scale, *argv], capture_output=True, text=True, ...)``;
        ``watch(pid, stderr_path)``, when given, is called once the child runs (e.g. to signal it)."""
        cmd = [sys.executable, "-m", "resnet_scale", *argv]
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            request = {"argv": argv, "env": env, "cwd": str(cwd), "stdout": str(out),
                       "stderr": str(err)}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            pid = self._answer(timeout=60)["pid"]
            if watch is not None:
                watch(pid, err)
            try:
                status = self._answer(timeout=timeout)["status"]
            except queue.Empty:
                os.kill(pid, 9)
                self._answer(timeout=60)
                raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(), err.read_text()) from None
            return subprocess.CompletedProcess(cmd, os.waitstatus_to_exitcode(status), out.read_text(),
                                               err.read_text())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


_server: CliServer | None = None


def run_module(argv: list[str], *, env: dict[str, str], cwd: Path, timeout: float,
               watch=None) -> subprocess.CompletedProcess:
    """Run ``python -m resnet_scale ARGV`` in a child forked from the (shared) server."""
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = CliServer(env)
    return _server.run(argv, env=env, cwd=cwd, timeout=timeout, watch=watch)


if __name__ == "__main__":
    serve()
