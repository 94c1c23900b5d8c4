"""Refusals every process takes together.

With several processes a check that reads the filesystem, or that only the main process makes
(the run folder already holds a run), can fail on some processes only. The others would go on
into the next collective and wait for a peer that has left, until gloo or NCCL gives up with a
traceback ("Connection closed by peer") or the job's time runs out. Inside ``with agreed(acc):``
every process notes how its part ended; on leaving the block they exchange that (one small
all-gather, which is also a barrier), and when any of them was refused, every one raises the
same error with the same message: the one of the lowest rank that was refused. The CLI prints an
agreed error on the main process only (``err.agreed``), so the user reads it once.

An unexpected exception (a bug) keeps its traceback on the process where it happened; the others
raise :class:`PeerFailed`, which the CLI ends quietly with exit status 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from accelerate import Accelerator

from resnet_scale.config import ConfigError
from resnet_scale.data import DataError
from resnet_scale.tracking import TrackingError

#: Refusals of the user's input (exit status 2), raised on every process with the same message.
REFUSALS = (ConfigError, DataError, TrackingError)


class PeerFailed(RuntimeError):
    """Another process failed inside an agreed block; it reports the failure, this one stops quietly."""


def _outcome(err: BaseException | None) -> tuple | None:
    if err is None:
        return None
    if isinstance(err, REFUSALS):
        return ("refused", type(err).__name__, str(err))
    if isinstance(err, OSError):
        return ("os", err.errno, err.strerror or str(err), err.filename)
    return ("failed", f"{type(err).__name__}: {err}")


def _rebuild(outcome: tuple, rank: int) -> Exception:
    kind = outcome[0]
    if kind == "refused":
        err: Exception = {cls.__name__: cls for cls in REFUSALS}[outcome[1]](outcome[2])
    elif kind == "os":
        err = OSError(outcome[1], outcome[2], outcome[3]) if outcome[1] is not None else OSError(outcome[2])
    else:
        return PeerFailed(f"process {rank} failed ({outcome[1]})")
    err.agreed = True  # type: ignore[attr-defined]
    return err


@contextlib.contextmanager
def agreed(accelerator: Accelerator) -> Iterator[None]:
    """Run the block on every process (a block may do nothing on some); if it raised anywhere,
    raise on every process. Every process must enter it, and nothing inside may be a collective
    that a refused process would skip."""
    if accelerator.num_processes == 1:
        yield
        return
    from accelerate.utils import gather_object

    error: BaseException | None = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - every kind is told to the others before it is raised
        error = err
    found = gather_object([_outcome(error)])
    first = next(((rank, o) for rank, o in enumerate(found) if o is not None), None)
    if first is None:
        return
    # Leave together (as finish.py does after gather_object): a process that exits straight after a
    # collective can abort while gloo's threads still hold its buffers.
    accelerator.wait_for_everyone()
    rank, outcome = first
    if rank == accelerator.process_index:  # this process's own error, with its traceback
        if outcome[0] != "failed":
            error.agreed = True  # type: ignore[union-attr]
        raise error
    raise _rebuild(outcome, rank) from None
