"""What a signal does to a training process.

* Before the loop (imports, data, model, run folder) Ctrl-C (SIGINT) stops at once: the CLI says
  "interrupted" in one line and exits 130. Nothing the run needs is half-written then: the data
  is only read, and the run folder comes last.
* In the loop (:class:`StopFlag`, installed by ``LoopControl``) SIGTERM, SIGUSR1 and a first
  Ctrl-C ask for a stop: the current optimizer step finishes, a checkpoint is saved, exit 75.
  SIGTERM and SIGUSR1 may come more than once (SLURM signals every process of a step, and torchrun
  passes its own on as well); they only ask again.
* A second Ctrl-C (or a SIGTERM after a Ctrl-C) exits at once with 130, without waiting for the
  step or the checkpoint in progress. A checkpoint being written lives in a hidden temporary
  folder that no resume picks, and no complete checkpoint is touched: only while the main process
  gives a finished checkpoint its name and removes the oldest (:func:`uninterrupted`) does the
  exit wait until that is done. ``train()`` called from Python gets a KeyboardInterrupt instead.

Under torchrun the training processes run in sessions of their own, so a Ctrl-C in the terminal
reaches torchrun only, which passes one SIGINT to every process: each of them stops after the
step with a checkpoint and exits 75. A second Ctrl-C interrupts torchrun's own shutdown, which
then sends SIGTERM to every process: after a Ctrl-C that too stops at once. torchrun itself
exits 1 either way (it reports its own SignalException).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

#: Exit status after Ctrl-C: 128 + SIGINT, what a shell reports for a program Ctrl-C stopped.
EXIT_INTERRUPTED = 130


class _State:
    interrupts = 0  # SIGINTs this process received
    stop = False  # the loop was asked to save and stop
    graceful = 0  # StopFlags installed: a first Ctrl-C asks for a stop instead of raising
    looped = False  # the loop has started in this process
    holding = 0  # depth of uninterrupted() sections
    exit_pending = False  # a second Ctrl-C came inside one
    cli = False  # ``resnet-scale train``: a second Ctrl-C ends the process (train() from Python: KeyboardInterrupt)


_state = _State()


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _say(text: str) -> None:
    """One line on stderr from the main process (a signal handler may interrupt a print: raw write)."""
    if _is_main():
        try:
            os.write(2, f"{text}\n".encode())
        except OSError:
            pass


def _exit_at_once() -> None:
    _state.exit_pending = False
    if not _state.cli:  # train() called from Python (a notebook): its caller decides
        raise KeyboardInterrupt
    _say("resnet-scale train: interrupted again (Ctrl-C): stopped at once; every complete checkpoint is "
         "intact (a half-written one is never resumed from): continue with --resume auto.")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(EXIT_INTERRUPTED)


def _handle(signum: int, frame: Any) -> None:
    if signum == signal.SIGINT:
        _state.interrupts += 1
    # A second Ctrl-C; torchrun passes a second one on as SIGTERM.
    if _state.interrupts > 1 or (_state.interrupts and signum == signal.SIGTERM):
        if _state.holding:
            _state.exit_pending = True
            return
        _exit_at_once()
    if signum == signal.SIGINT:
        if not _state.graceful:
            raise KeyboardInterrupt
        _say("resnet-scale: Ctrl-C: finishing this step and saving a checkpoint "
             "(Ctrl-C again stops at once, without this checkpoint)")
    _state.stop = True


def catch_interrupts(held: int = 0) -> None:
    """Ctrl-C before the loop: KeyboardInterrupt (the CLI turns it into one line and exit 130); a
    second one exits at once. Called first thing by ``resnet-scale train`` (main thread only);
    ``held``: the Ctrl-Cs that came while it imported this module, acted on now."""
    _state.interrupts, _state.looped, _state.cli = held, False, True
    signal.signal(signal.SIGINT, _handle)
    if held:
        raise KeyboardInterrupt


def release_interrupts() -> None:
    """The CLI is done (its caller may be a test in the same process): a second Ctrl-C no longer ends it."""
    _state.cli = False


def interrupted() -> bool:
    """Whether this process got a Ctrl-C: then any error that follows is the interruption's echo
    (e.g. a collective whose peer stopped), not a failure to report."""
    return _state.interrupts > 0


def interrupted_line() -> str:
    """What the CLI says when a Ctrl-C ended the run without a checkpoint of its own."""
    if not _state.looped:
        return "interrupted (Ctrl-C) before training started; nothing was trained."
    return ("interrupted (Ctrl-C); every complete checkpoint is intact (a half-written one is never resumed "
            "from): continue with --resume auto.")


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """A second Ctrl-C that comes inside waits until the block is done, then exits at once."""
    _state.holding += 1
    try:
        yield
    finally:
        _state.holding -= 1
        if not _state.holding and _state.exit_pending:
            _exit_at_once()


class StopFlag:
    """Set by SIGTERM, SIGUSR1 or a first Ctrl-C; the loop checks it after each optimizer step (with
    several processes: at the next read point of ``control.LoopControl``, where the ranks agree)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return _state.stop

    def install(self) -> "StopFlag":
        _state.stop, _state.interrupts = False, 0  # a Ctrl-C before this one ended the setup (KeyboardInterrupt)
        _state.graceful += 1
        _state.looped = True
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, _handle)
        return self

    def restore(self) -> None:
        if not self._previous:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        _state.graceful -= 1
