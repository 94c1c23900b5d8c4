"""``resnet-scale train``: train a ResNet, in one process or in many under ``accelerate launch`` /
``torchrun -m resnet_scale train``.

Exit status: 0 done; 1 out of memory even at a micro-batch of one, or the run's files could not
be written (any errno, or a library's own write error: one line, no traceback); 2 bad input (one
line, before anything is changed); 4 stopped after too many non-finite steps; 75 pre-empted
(SIGTERM/SIGUSR1, or a first Ctrl-C): a checkpoint was saved, ``--resume auto`` continues; 130
interrupted (Ctrl-C before training started, or a second Ctrl-C).

With several processes an error they all agreed on (``train/agree.py``) and the pre-emption are
reported by the main process only; a process stopped by its peer's failure ends quietly.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import signal
import sys
from pathlib import Path

from resnet_scale.cli.parser import EXIT_BAD_INPUT, standalone
from resnet_scale.config import ConfigError, add_config_arguments, config_from_args, given_fields
from resnet_scale.config.compare import parse_overrides

NAME = "train"
HELP = "train a ResNet (one process, or many under accelerate launch / torchrun)"
DESCRIPTION = "Train a ResNet. --batch-size is the global batch over all processes."


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_config_arguments(parser)
    parser.add_argument(
        "--print-config", action="store_true",
        help="Print the resolved config (defaults, then --config FILE, then the flags; a --resume'd run's own "
             "config with the flags on top) as YAML, which --config reads back, and exit without training or "
             "writing anything.",
    )
    parser.add_argument(
        "--override", metavar="NAME[,NAME]", default=None,
        help="With --resume: let these settings differ from the run's config.json from the resumed step on "
             "(e.g. --override lr --lr 0.01); config.json records each change and its step. Without it a "
             "resumed run refuses flags that would change what it trains.",
    )
    return parser


def _say(line: str, *, everyone: bool = True) -> None:
    """One line on stderr: from every process that has it, or (``everyone=False``: a line every
    process has) from the main process only."""
    if everyone or os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)


def _hold(signum, frame) -> None:
    """SIGINT while Python imports torch and the trainer: held until the imports are done (a
    KeyboardInterrupt inside an import can leave a module half-made, and what fails next is not a
    KeyboardInterrupt); a second one exits at once."""
    _held.append(signum)
    if len(_held) > 1:
        if os.environ.get("RANK", "0") == "0":
            os.write(2, b"resnet-scale train: interrupted again (Ctrl-C) before training started; stopped at once.\n")
        os._exit(130)


_held: list[int] = []


def print_config(ns: argparse.Namespace) -> int:
    """``--print-config``: the config a run of these flags would train with, as YAML; reads only."""
    import yaml

    try:
        cfg = config_from_args(ns).validate()
        if cfg.train.resume is not None:  # a resumed run trains with its own config.json, the flags on top
            from resnet_scale.train.resume import open_resume

            cfg = open_resume(cfg, given_fields(ns), parse_overrides(ns.override)).cfg
    except ConfigError as err:
        print(f"resnet-scale train: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None), end="")
    return 0


def run(ns: argparse.Namespace) -> int:
    """Train; a Ctrl-C before (or after) the loop is one line and exit 130, whatever it cut short."""
    if getattr(ns, "print_config", False):
        return print_config(ns)
    _held.clear()
    previous = signal.signal(signal.SIGINT, _hold)
    try:
        from resnet_scale.train import signals

        try:
            try:
                signals.catch_interrupts(held=len(_held))
                return _run(ns)
            except Exception:
                if not signals.interrupted():  # (a pending Ctrl-C may raise here: the outer try takes it)
                    raise
                # After a Ctrl-C, e.g. a collective whose peer stopped at it: the interruption's echo.
        except KeyboardInterrupt:
            pass
        finally:
            signals.release_interrupts()
        _say(f"resnet-scale train: {signals.interrupted_line()}", everyone=False)
        return signals.EXIT_INTERRUPTED
    finally:  # a caller in the same process (a test) gets its own Ctrl-C handling back
        signal.signal(signal.SIGINT, previous)


def _run(ns: argparse.Namespace) -> int:
    """Validate the flags, train, and map every known way a run ends to its exit status."""
    from resnet_scale.data import DataError
    from resnet_scale.tracking import TrackingError
    from resnet_scale.train import train

    # apply_* transforms and the planner say what they did through this logger (main process only).
    logging.basicConfig(format="resnet-scale: %(message)s", level=logging.WARNING)
    logging.getLogger("resnet_scale").setLevel(logging.INFO)
    from resnet_scale.train.agree import PeerFailed
    from resnet_scale.train.checkpoint import EXIT_PREEMPTED, Preempted
    from resnet_scale.train.control import EXIT_NONFINITE, NonFiniteError
    from resnet_scale.train.oom import OutOfMemoryUnrecoverable

    cfg = None
    try:
        cfg = config_from_args(ns).validate()
        train(cfg, given=given_fields(ns), overrides=parse_overrides(ns.override))
    except (ConfigError, DataError, TrackingError) as err:
        _say(f"resnet-scale train: error: {err}", everyone=not getattr(err, "agreed", False))
        return EXIT_BAD_INPUT
    except Preempted as stop:  # every process saved its part of the checkpoint and stops
        _say(f"resnet-scale train: {stop}", everyone=False)
        return EXIT_PREEMPTED
    except PeerFailed:  # another process failed and says why
        return 1
    except NonFiniteError as err:
        print(f"resnet-scale train: stopped: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except OutOfMemoryUnrecoverable as err:
        print(f"resnet-scale train: stopped: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        failure = file_error(err, _run_roots(cfg))
        if failure is None:
            if getattr(err, "agreed", False) and os.environ.get("RANK", "0") != "0":
                return 1  # the main process's error: it reports it
            raise
        message, status = failure
        _say(f"resnet-scale train: error: {message}", everyone=not getattr(err, "agreed", False))
        return status
    return 0


_HINTS = {
    errno.ENOSPC: "free disk space or choose another --output-dir",
    errno.EDQUOT: "free space in your disk quota or choose another --output-dir",
    errno.EFBIG: "a file-size limit was reached (ulimit -f): raise it or choose another --output-dir",
    errno.EROFS: "the file system is read-only: choose another --output-dir",
    errno.EACCES: "permission denied: choose another --output-dir or make it writable",
    errno.EPERM: "permission denied: choose another --output-dir or make it writable",
    errno.EIO: "the disk reported an I/O error: check it, or choose another --output-dir",
}


def _errno_of(err: BaseException) -> int | None:
    if isinstance(err, OSError):
        return err.errno
    found = re.search(r"os error (\d+)", str(err))  # safetensors: "I/O error: File too large (os error 27)"
    return int(found.group(1)) if found else None


def _torch_save_failed(err: BaseException) -> bool:
    """A RuntimeError raised while torch.save wrote a file (its zip writer names no errno: "unexpected
    pos 704 vs 598", "basic_ios::clear: iostream error", "PytorchStreamWriter failed writing file")."""
    if not isinstance(err, RuntimeError):
        return False
    tb = err.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if Path(code.co_filename).parts[-2:] == ("torch", "serialization.py"):
            return code.co_name in ("save", "_save")
        tb = tb.tb_next
    return False


def _run_roots(cfg) -> list[str] | None:
    """Where the run writes: --output-dir, and the run folder of a --resume <run>/checkpoints/step-N."""
    if cfg is None:
        return None
    roots = [cfg.train.output_dir]
    if cfg.train.resume not in (None, "auto"):
        roots.append(str(Path(cfg.train.resume).resolve().parent.parent))
    return roots


def file_error(err: BaseException, roots: list[str] | None) -> tuple[str, int] | None:
    """(one-line message, exit status) for a file that could not be written or read, whatever the
    errno and whichever library wrote it; None for any other error. A file under one of ``roots``
    (where the run writes), or an error that names no file, exits 1: the run's files could not be
    written. A file elsewhere (the data, a --ds-config) is bad input: exit 2."""
    library = type(err).__name__ == "SafetensorError" and "serializ" in str(err).lower()
    if not (isinstance(err, OSError) or library or _torch_save_failed(err)):
        return None
    code = _errno_of(err)
    name = errno.errorcode.get(code, "") if code is not None else ""
    filename = getattr(err, "filename", None)
    if isinstance(err, OSError):
        what = f"{err.strerror or err}" + (f" [{name}]" if name else "") + (f": {filename}" if filename else "")
    else:
        what = ("" if library else "torch.save: ") + " ".join(str(err).split()) + (f" [{name}]" if name else "")
    inside = filename is None or roots is None or any(_is_within(filename, root) for root in roots)
    if not inside:  # only an OSError names a file
        return (f"cannot read or write {filename}: {err.strerror or err}{f' [{name}]' if name else ''}; check "
                "the path and its permissions."), 2
    if code is None:  # torch.save's writer says no more
        hint = "the disk may be full or a file-size limit (ulimit -f) reached: free space or choose another --output-dir"
    else:
        hint = _HINTS.get(code, "choose another --output-dir")
    return (f"the run's files could not be written ({what}); {hint}. Checkpoints already complete stay "
            "valid (--resume auto continues from the newest)."), 1


def _is_within(path: str | bytes, folder: str) -> bool:
    try:
        return Path(os.fsdecode(path)).resolve().is_relative_to(Path(folder).resolve())
    except (OSError, ValueError, RuntimeError):
        return True


def main(argv: list[str] | None = None) -> int:
    """``resnet-scale train`` without the subcommand word (``launch/train.py``)."""
    return standalone(sys.modules[__name__], argv)
