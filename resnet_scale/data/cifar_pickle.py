"""Reading the original CIFAR "python version" folders (``cifar-10-batches-py``, ``cifar-100-python``).

Those files are Python pickles: CIFAR's own distribution format requires unpickling them. A plain
``pickle.load`` can run arbitrary code from a tampered file, so we use a RESTRICTED unpickler
(:class:`_CifarUnpickler`) that resolves only the globals a CIFAR batch needs -- numpy array and
dtype reconstruction, ``_codecs.encode`` which Python 3 protocol-2 pickles use for bytes, and
``bytes()`` (no argument) which they use for empty bytes -- and refuses every other global (no
``os.system``, no ``builtins.eval``, no arbitrary classes). Plain containers (dict, list, bytes,
str, int, float, tuple) need no global lookups at all. Object-dtype arrays are rejected after
loading, so a file cannot smuggle in pickled objects through an array.
``encoding="bytes"`` is what the original Python 2 files need (their dict keys become ``b"data"``).
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import numpy as np

from .imageset import DataError, check_labels

CIFAR10_PICKLE_DIR = "cifar-10-batches-py"
CIFAR100_PICKLE_DIR = "cifar-100-python"
_CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR10_FILES = (*_CIFAR10_TRAIN, "test_batch", "batches.meta")
_CIFAR100_FILES = ("train", "test", "meta")
_REDOWNLOAD = {
    "cifar10": "re-download and extract cifar-10-python.tar.gz "
               "(https://www.cs.toronto.edu/~kriz/cifar.html), or pass another --data-dir",
    "cifar100": "re-download and extract cifar-100-python.tar.gz "
                "(https://www.cs.toronto.edu/~kriz/cifar.html), or pass another --data-dir",
}


def _empty_bytes() -> bytes:
    return b""


def _allowed_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric

    allowed: dict[tuple[str, str], object] = {("_codecs", "encode"): codecs.encode}
    # Protocol-2 pickles spell EMPTY bytes as a call of ``bytes()`` (a batch with zero rows holds
    # one); only the no-argument call is honoured (bytes(N) would allocate N bytes).
    allowed[("__builtin__", "bytes")] = allowed[("builtins", "bytes")] = _empty_bytes
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x / 2.x spellings
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):  # protocol >= 5 pickles of arrays
        allowed[(mod, "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy/codecs globals listed in :func:`_allowed_globals`."""

    _allowed = None

    def find_class(self, module: str, name: str) -> object:
        if _CifarUnpickler._allowed is None:
            _CifarUnpickler._allowed = _allowed_globals()
        try:
            return _CifarUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: a CIFAR batch holds only dicts, lists, "
                "bytes, numbers and numpy arrays"
            ) from None


def load_pickle(path: Path, source: str) -> dict:
    """Load one CIFAR pickle file safely; any failure becomes a DataError naming the file."""
    fix = _REDOWNLOAD[source]
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: file is missing; {fix}") from None
    except Exception as exc:  # EOFError, UnpicklingError, ValueError, ... : truncated or corrupt
        raise DataError(
            f"{path}: cannot read this CIFAR pickle ({type(exc).__name__}: {exc}); the file is "
            f"truncated, corrupt or not a CIFAR batch; {fix}"
        ) from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, found {type(obj).__name__}; {fix}")
    return obj


def _key(d: dict, name: str, path: Path, source: str) -> object:
    for k in (name.encode(), name):  # Python 2 files give bytes keys; re-pickled copies may give str
        if k in d:
            return d[k]
    keys = ", ".join(sorted(repr(k) for k in d)[:8])
    raise DataError(f"{path}: no {name!r} entry (found {keys}); {_REDOWNLOAD[source]}")


def _names(d: dict, name: str, path: Path, source: str, count: int) -> list[str]:
    raw = _key(d, name, path, source)
    if not isinstance(raw, (list, tuple)) or len(raw) != count:
        n = len(raw) if isinstance(raw, (list, tuple)) else type(raw).__name__
        raise DataError(f"{path}: {name!r} should list {count} class names, found {n}; {_REDOWNLOAD[source]}")
    return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in raw]


def _read_batch(path: Path, source: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 3 x 32 x 32, labels int64 N) from one batch file, validated."""
    d = load_pickle(path, source)
    fix = _REDOWNLOAD[source]
    data = _key(d, "data", path, source)
    if not isinstance(data, np.ndarray) or data.dtype == object:
        raise DataError(f"{path}: 'data' must be a uint8 numpy array, found {type(data).__name__}; {fix}")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"{path}: 'data' has shape {data.shape}, expected N x 3072 (32 x 32 RGB rows, channel-major); {fix}"
        )
    if data.dtype != np.uint8:
        if not np.issubdtype(data.dtype, np.integer) or data.min(initial=0) < 0 or data.max(initial=0) > 255:
            raise DataError(f"{path}: 'data' must hold uint8 pixels 0..255, found dtype {data.dtype}; {fix}")
        data = data.astype(np.uint8)
    labels = np.asarray(_key(d, label_key, path, source))
    if labels.shape != (data.shape[0],):
        raise DataError(
            f"{path}: {data.shape[0]} images but {labels.size} {label_key!r} entries; {fix}"
        )
    labels = check_labels(labels, num_classes, str(path), fix)
    # Rows are row-major C x H x W (1024 red, 1024 green, 1024 blue): a reshape, no transpose.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32))
    return images, labels


def find_pickle_dir(data_dir: Path, source: str) -> Path | None:
    """The CIFAR pickle folder at ``data_dir`` or directly below it, or None."""
    if source == "cifar10":
        folder, markers = CIFAR10_PICKLE_DIR, ("batches.meta",)
    else:
        folder, markers = CIFAR100_PICKLE_DIR, ("meta", "train")
    for cand in (data_dir, data_dir / folder):
        if all((cand / m).is_file() for m in markers) or (cand.name == folder and cand.is_dir()):
            return cand
    return None


def load_pickle_dir(folder: Path, source: str) -> tuple[tuple, tuple, list[str]]:
    """((train_images, train_labels), (test_images, test_labels), classes) from a CIFAR pickle folder."""
    expected = _CIFAR10_FILES if source == "cifar10" else _CIFAR100_FILES
    missing = [f for f in expected if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)}; {_REDOWNLOAD[source]}")
    if source == "cifar10":
        meta = folder / "batches.meta"
        classes = _names(load_pickle(meta, source), "label_names", meta, source, 10)
        parts = [_read_batch(folder / f, source, "labels", 10) for f in _CIFAR10_TRAIN]
        train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        test = _read_batch(folder / "test_batch", source, "labels", 10)
    else:
        classes = _names(load_pickle(folder / "meta", source), "fine_label_names", folder / "meta", source, 100)
        train = _read_batch(folder / "train", source, "fine_labels", 100)
        test = _read_batch(folder / "test", source, "fine_labels", 100)
    for split, (images, _) in (("train", train), ("test", test)):
        if images.shape[0] == 0:
            raise DataError(f"{folder}: the {split} split is empty; {_REDOWNLOAD[source]}")
    return train, test, classes
