"""What a checkpoint held when it was saved, and whether it still holds exactly that.

When every process has written its part of a checkpoint into the shared temporary folder, the main
process records the size and sha256 of every file in it (``loop_state.json`` and every rank's
DeepSpeed partitions included) in the folder's ``COMPLETE`` marker, a small JSON file::

    {"step": 6, "algorithm": "sha256",
     "files": {"model.safetensors": {"bytes": 319656, "sha256": "9f2c..."}, ...}}

A resume checks them before anything is loaded (:func:`check_files`): a file that is missing,
has another size or another digest, or a file that was not there when the checkpoint was saved,
makes the checkpoint damaged. Every process must see the same folder, so checkpoints written to
node-local disks of several machines cannot be checked (or resumed) this way.

sha256 runs at about 1 GB/s a core on current x86 CPUs (SHA extensions), about as fast as a disk
writes; the files are hashed on several threads (hashlib releases the GIL), so a GB-sized
checkpoint adds about a second to each save and to the resume. Checkpoints saved before the
markers held digests (the marker is the line ``step N``) are accepted unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

MARKER = "COMPLETE"
ALGORITHM = "sha256"
_CHUNK = 1 << 22


class Damaged(Exception):
    """A checkpoint's files are not the ones it was saved with; the message names the first such file."""


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _digests(folder: Path, names: list[str]) -> dict[str, str]:
    """sha256 of each named file of ``folder``, several files at a time."""
    workers = max(1, min(8, os.cpu_count() or 1, len(names)))
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(names, pool.map(lambda name: _digest(folder / name), names)))


def _files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder but its marker, as sorted '/'-separated relative paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
                  and p.relative_to(folder).as_posix() != MARKER)


def describe_files(folder: Path) -> dict[str, dict[str, int | str]]:
    """``{relative path: {"bytes": size, "sha256": hex digest}}`` for every file of ``folder`` but its marker."""
    folder = Path(folder)
    names = _files(folder)
    digests = _digests(folder, names)
    return {name: {"bytes": (folder / name).stat().st_size, ALGORITHM: digests[name]} for name in names}


def write_marker(folder: Path, step: int) -> None:
    """Write ``folder``'s COMPLETE marker with the size and digest of every other file in it; the
    last write of a checkpoint (it says the checkpoint is complete)."""
    record = {"step": step, "algorithm": ALGORITHM, "files": describe_files(folder)}
    (Path(folder) / MARKER).write_text(json.dumps(record, indent=1) + "\n")


def _recorded(folder: Path) -> dict[str, dict] | None:
    """The files the marker records, or None for a marker of the older kind (``step N``, no digests)."""
    text = (folder / MARKER).read_text(errors="replace")
    if re.fullmatch(r"step \d+\s*", text):
        return None
    try:
        record = json.loads(text)
        files = record["files"]
        ok = record.get("algorithm") == ALGORITHM and isinstance(files, dict) and all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get(ALGORITHM), str)
            for v in files.values())
    except (ValueError, TypeError, KeyError, AttributeError):
        ok = False
    if not ok:
        raise Damaged(f"its {MARKER} marker is not one resnet-scale writes")
    for name in files:  # only plain relative paths inside the folder
        parts = PurePosixPath(name).parts
        if not parts or name.startswith("/") or ".." in parts or name == MARKER:
            raise Damaged(f"its {MARKER} marker names a file outside the checkpoint: {name[:100]!r}")
    return files


def check_files(folder: Path) -> bool:
    """True when every file of the checkpoint ``folder`` is the one saved (and no other file is
    there); False when its marker records no digests (an older checkpoint: not verified). Raises
    :class:`Damaged` naming the first file that differs."""
    folder = Path(folder)
    try:
        recorded = _recorded(folder)
        if recorded is None:
            return False
        present = _files(folder)
        missing = sorted(set(recorded) - set(present))
        if missing:
            raise Damaged(f"{missing[0]} is missing" if len(missing) == 1
                          else f"{missing[0]} and {len(missing) - 1} more files are missing")
        extra = sorted(set(present) - set(recorded))
        if extra:
            raise Damaged(f"{extra[0]} was not there when it was saved")
        for name in present:
            size, saved = (folder / name).stat().st_size, recorded[name]["bytes"]
            if size != saved:
                raise Damaged(f"{name} is {size} bytes, {saved} when it was saved: truncated or altered")
        for name, digest in _digests(folder, present).items():
            if digest != recorded[name][ALGORITHM]:
                raise Damaged(f"{name} differs from the file saved: {ALGORITHM} mismatch, corrupted or altered")
    except OSError as err:
        raise Damaged(f"{Path(err.filename or '?').name} cannot be read: {err.strerror or err}") from None
    return True


def printable(text: str, limit: int = 200) -> str:
    """``text`` on one line of plain characters (a crafted file chooses the names it holds)."""
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


def refused_pickle(message: str) -> str:
    """What torch's safe unpickler refused, in our words (its message advises loading the file
    unsafely, or allowlisting whatever the file asks for)."""
    found = re.search(r"GLOBAL (\S+?)\.?(?:\s|$)", message)
    if found:
        return (f"it asks to load {printable(found.group(1))}, which only a full unpickle could build "
                "and which could run code")
    found = re.search(r"(?:unrecognized function|but got) (.+?)(?: which belongs|$)", message, re.MULTILINE)
    if found:
        return (f"it asks to build or call {printable(found.group(1))}, which only a full unpickle could do "
                "and which could run code")
    found = re.search(r"Unsupported operand (\d+)", message)
    what = f"pickle opcode {found.group(1)}" if found else "pickle data"
    return f"it holds {what} that the safe unpickler does not run; only a full unpickle, which could run code, would"
