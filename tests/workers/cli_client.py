"""``python cli_client.py ARGS``: what ``python -m resnet_scale ARGS`` does (``python cli_client.py
--script PATH ARGS``: what ``python PATH ARGS`` does), run by the tests' CLI server
(tests/_cli_server.py, found through RESNET_SCALE_TEST_SOCKET) in a child forked after the imports.

For programs the tests start that start the CLI themselves (the experiment recipes' TRAIN_CMD and
REPORT_CMD): this client imports nothing heavy, hands the server its arguments, environment,
working folder and its own stdin, stdout and stderr, forwards SIGINT/SIGTERM to the child, and
exits as the child did.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys


def main() -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(os.environ["RESNET_SCALE_TEST_SOCKET"])
        argv, script = sys.argv[1:], None
        if argv[:1] == ["--script"]:
            script, argv = argv[1], argv[2:]
        request = {"argv": argv, "script": script, "env": dict(os.environ), "cwd": os.getcwd()}
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
        answers = conn.makefile("r")
        pid = json.loads(answers.readline())["pid"]
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda number, _frame: os.kill(pid, number))
        status = json.loads(answers.readline())["status"]
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # killed by a signal: end the same way
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main())
