"""A pre-forked ``python -m resnet_scale``: the tests' ``run_cli`` sends each command here instead of
starting a new interpreter, and this process forks one child per command.

Why: most of a tiny CLI run is the interpreter importing torch, accelerate and the package
(seconds of one core each time). This server imports them once; each forked child is then what a
fresh ``python -m resnet_scale ARGS`` would be after its imports: its own process (own pid, exit
status, signal handlers, atexit handlers, Accelerate state), its own environment, working folder,
stdout and stderr files, and its own session (``start_new_session=True``). Nothing here has run a
torch operation before forking, so no thread pool is copied half-alive into the children. A child
ends as the interpreter would (threads joined, atexit handlers run) but skips the teardown of
every module (``_exit``). A ``launch`` request runs tests/workers/fork_launch.py instead.

Protocol (one JSON object a line): the request ``{"argv", "env", "cwd", "stdout", "stderr"}`` on
stdin; the answer ``{"pid": N}`` at once, then ``{"status": S}`` (``os.waitpid``'s status) when the
child is done.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import queue
import runpy
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _child(request: dict, fds: list[int]) -> None:
    """Become ``python -m resnet_scale ARGV`` (or, with ``launch``, ``python fork_launch.py NPROC
    [--script PATH] ARGV``), the leader of a new session as ``start_new_session=True`` makes it (so
    a test can signal its process group, as a terminal does): raises SystemExit with its exit status."""
    os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if fds:  # a client's own stdin, stdout and stderr (tests/workers/cli_client.py)
        for fd, given in enumerate(fds):
            os.dup2(given, fd)
            os.close(given)
    else:
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
    sys.stdin = open(0, closefd=False)
    import torch

    if request["env"].get("OMP_NUM_THREADS"):  # what a new interpreter reads at import
        torch.set_num_threads(int(request["env"]["OMP_NUM_THREADS"]))
    if request.get("launch"):
        import fork_launch

        nproc, script = request["launch"]
        sys.argv = [fork_launch.__file__, *request["argv"]]
        try:
            code = fork_launch.launch(nproc, request["argv"], script)
        except BaseException:  # e.g. the agent's SignalException on SIGTERM, uncaught as in ``python fork_launch.py``
            traceback.print_exc()
            raise SystemExit(1) from None
        raise SystemExit(code)
    if request.get("script"):  # ``python SCRIPT ARGV``
        script = os.path.abspath(request["script"])
        sys.argv = [request["script"], *request["argv"]]
        sys.path[0] = os.path.dirname(script)  # as ``python SCRIPT`` has it
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit:
            raise
        except BaseException:
            traceback.print_exc()
            raise SystemExit(1) from None
        raise SystemExit(0)
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


def _exit(code) -> None:
    """The interpreter's exit, less its last step: wait for non-daemon threads, run the atexit
    handlers, collect the child's own garbage, flush, and end with ``code`` as ``SystemExit(code)``
    would. The interpreter's teardown of every module would touch every object the server imported
    and copy each page of it (seconds per child)."""
    import atexit

    threading._shutdown()
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    try:
        atexit._run_exitfuncs()
        gc.collect()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status & 0xFF)


def preload_lazy_imports(deepspeed: bool = True) -> None:
    """What a run imports lazily, seconds of one core per process, none of it starting a thread:
    ``torch.use_deterministic_algorithms`` (every ``--deterministic`` run) imports
    ``torch._inductor.config``, which imports ``torch._dynamo``; Accelerate imports DeepSpeed
    whenever it is installed, and a ZeRO run's optimizer check imports DeepSpeed's Muon module,
    which imports the compiler."""
    import importlib.util

    import torch._inductor.config  # noqa: F401

    if deepspeed and importlib.util.find_spec("deepspeed") is not None:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what build_accelerator sets on a CPU, before DeepSpeed reads it
        import deepspeed  # noqa: F401
        import deepspeed.runtime.zero.muon.original_muon  # noqa: F401
        import transformers  # noqa: F401


def serve(socket_path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)  # first: a client may connect at once; it waits for the imports below
    listener.listen()
    sys.path[0] = str(REPO)  # not this file's folder: the package as ``python -m`` from the repository finds it
    # The imports every command pays for, done once (nothing that starts a thread: no wandb).
    import accelerate  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    import resnet_scale.cli  # noqa: F401
    import resnet_scale.train  # noqa: F401

    preload_lazy_imports()
    sys.path.insert(1, str(REPO / "tests" / "workers"))
    import fork_launch  # noqa: F401
    import torch.distributed.launcher.api  # noqa: F401

    requests = selectors.DefaultSelector()
    requests.register(sys.stdin, selectors.EVENT_READ)
    requests.register(listener, selectors.EVENT_READ)
    while True:
        for key, _ in requests.select():
            if key.fileobj is sys.stdin:  # the test process: one request, then its answers, at a time
                line = sys.stdin.readline()
                if not line:
                    listener.close()
                    return
                _fork(json.loads(line), [], lambda answer: print(json.dumps(answer), flush=True), [listener])
            else:  # a cli_client.py: its request and its stdin/stdout/stderr
                conn, _ = listener.accept()
                with conn:
                    data, fds = b"", []
                    while not data.endswith(b"\n"):
                        chunk, more, _, _ = socket.recv_fds(conn, 1 << 16, 3)
                        if not chunk:
                            break
                        data, fds = data + chunk, fds + list(more)
                    if data.endswith(b"\n") and len(fds) == 3:
                        _fork(json.loads(data), fds, lambda answer: conn.sendall(json.dumps(answer).encode() + b"\n"),
                              [listener, conn])
                    for fd in fds:
                        os.close(fd)


def _fork(request: dict, fds: list[int], answer, channels: list[socket.socket]) -> None:
    """Fork the child that runs ``request``; ``answer`` its pid, then its wait status. ``channels``: the
    server's sockets, closed in the child."""
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()  # what the server holds: the children's collections never walk (and copy) it
    pid = os.fork()
    if pid == 0:
        for channel in channels:  # the server's request channels are not the child's
            channel.close()
        try:
            _child(request, fds)  # never returns
        except SystemExit as stop:
            _exit(stop.code)
    answer({"pid": pid})
    _, status = os.waitpid(pid, 0)
    answer({"status": status})


# -- the client side, used by the tests ---------------------------------------------------------


class CliServer:
    """One server process per test process, started at the first command."""

    def __init__(self, env: dict[str, str]):
        # A short folder: a unix socket's path has at most 107 bytes, whatever TMPDIR is.
        self.folder = tempfile.mkdtemp(prefix="cli-server-", dir="/tmp" if os.path.isdir("/tmp") else None)
        self.socket = os.path.join(self.folder, "socket")
        self.proc = subprocess.Popen([sys.executable, "-u", __file__, self.socket], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
        self.answers: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        atexit.register(self.close)
        deadline = time.monotonic() + 120
        while not os.path.exists(self.socket):  # bound before the imports: clients may connect from now on
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the test CLI server did not start (status {self.proc.poll()})")
            time.sleep(0.01)

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
            watch=None, launch: tuple[int, str | None] | None = None) -> subprocess.CompletedProcess:
        """``subprocess.run([python, -m, resnet_scale, *argv], capture_output=True, text=True, ...)``,
        or with ``launch=(nproc, script)`` ``[python, tests/workers/fork_launch.py, nproc, *argv]``;
        ``watch(pid, stderr_path)``, when given, is called once the child runs (e.g. to signal it)."""
        cmd = [sys.executable, "-m", "resnet_scale", *argv]
        if launch:
            cmd = [sys.executable, str(REPO / "tests" / "workers" / "fork_launch.py"), str(launch[0]),
                   *(["--script", launch[1]] if launch[1] else []), *argv]
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            request = {"argv": argv, "env": env, "cwd": str(cwd), "stdout": str(out),
                       "stderr": str(err), "launch": launch}
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
        shutil.rmtree(self.folder, ignore_errors=True)


_server: CliServer | None = None


def client_command(env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """``python -m resnet_scale`` for a program the tests start (a shell script's TRAIN_CMD, say): the
    command, and the environment variable that points it at this process's server."""
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = CliServer(env)
    return [sys.executable, str(REPO / "tests" / "workers" / "cli_client.py")], {"RESNET_SCALE_TEST_SOCKET": _server.socket}


def run_module(argv: list[str], *, env: dict[str, str], cwd: Path, timeout: float,
               watch=None, launch: tuple[int, str | None] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m resnet_scale ARGV`` (with ``launch=(nproc, script)``: tests/workers/fork_launch.py)
    in a child forked from the (shared) server."""
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = CliServer(env)
    return _server.run(argv, env=env, cwd=cwd, timeout=timeout, watch=watch, launch=launch)


def fork_launch_args(cmd: list[str]) -> tuple[int, str | None] | None:
    """``(nproc, script)`` when ``cmd`` is ``[python, .../fork_launch.py, NPROC, [--script PATH]]``."""
    cmd = [str(c) for c in cmd]
    if len(cmd) < 3 or Path(cmd[1]).name != "fork_launch.py":
        return None
    return int(cmd[2]), (cmd[4] if cmd[3:4] == ["--script"] else None)


if __name__ == "__main__":
    serve(sys.argv[1])
