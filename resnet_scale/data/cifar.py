"""CIFAR-10 / CIFAR-100: download through Hugging Face ``datasets``, or read a local ``--data-dir``.

Every Hugging Face form of the data -- a fresh download (``load_dataset``), a ``save_to_disk``
folder, or hub-layout parquet files -- is the same Arrow table underneath: an image column holding
the HF Image struct ``{bytes: PNG, path}`` and an integer label column. All three end in ONE
converter, :func:`_decode_tables`, so the files the tests write take the same path real CIFAR-10
takes. The original python-pickle folders are read by :mod:`.cifar_pickle`.

``datasets`` and ``pyarrow`` are imported inside the functions that need them.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from .cifar_pickle import CIFAR10_PICKLE_DIR, CIFAR100_PICKLE_DIR, find_pickle_dir, load_pickle_dir
from .imageset import DataError, check_labels, log

HF_REPOS = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
IMAGE_COLUMNS = ("img", "image")
LABEL_COLUMNS = {"cifar10": ("label",), "cifar100": ("fine_label", "label")}
# Known per-channel statistics of the training sets on the [0, 1] scale (widely used constants).
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple("""
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
    camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
    dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower
    leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid
    otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray
    road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar
    sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle
    wardrobe whale willow_tree wolf woman worm""".split())
_DEFAULT_CLASSES = {"cifar10": CIFAR10_CLASSES, "cifar100": CIFAR100_CLASSES}
_ROWS_PER_BATCH = 4096
_SPLIT_NAME = re.compile(r"^(train|test)([-_.]|$)")
_MAX_DEPTH = 4  # how deep below --data-dir to look for parquet files / save_to_disk folders


def formats_help(source: str) -> str:
    """What ``--data-dir`` may hold for ``source``; shown in every 'could not find the data' error."""
    pickle_dir = CIFAR10_PICKLE_DIR if source == "cifar10" else CIFAR100_PICKLE_DIR
    return (
        f"--data-dir may hold (itself, or in a folder directly below it) the python-pickle folder "
        f"'{pickle_dir}/' from the original tar.gz; a Hugging Face DatasetDict saved with "
        f"save_to_disk (train and test splits); or the {HF_REPOS[source]} parquet files "
        f"(train-*.parquet and test-*.parquet, e.g. plain_text/train-00000-of-00001.parquet)"
    )


def offline_hint(source: str) -> str:
    return (
        f"Offline? Pass --data-dir DIR; {formats_help(source)}. Or run the offline demo with "
        f"--data digits (scikit-learn's digits, no download). If you downloaded {source} before, "
        f"set HF_DATASETS_OFFLINE=1 to use the Hugging Face cache."
    )


def load_cifar(source: str, data_dir: str | os.PathLike | None, download: bool):
    """((train_images, train_labels), (test_images, test_labels), classes) as numpy arrays,
    images uint8 N x 3 x 32 x 32, labels int64 N.

    With ``data_dir``: read it if it holds one of the formats in :func:`formats_help`; if it holds
    none and ``download`` is true, download and save the DatasetDict to ``data_dir/<source>`` so
    the next run finds it offline. Without ``data_dir``: download (Hugging Face cache).
    """
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        found = _load_local(root, source)
        if found is not None:
            return found
        state = "does not exist" if not root.exists() else f"holds no {source} data"
        archives = sorted(p.name for p in root.glob("cifar*.tar.gz")) if root.is_dir() else []
        if archives:
            raise DataError(f"--data-dir {root} {state} but holds {', '.join(archives)}: extract it there "
                            f"first (tar xzf ARCHIVE -C {root}). {formats_help(source)}.")
        if not download:
            raise DataError(f"--data-dir {root} {state} and downloading is disabled. {formats_help(source)}.")
        try:
            dd = _download(source)
        except DataError as exc:
            raise DataError(f"--data-dir {root} {state}, so it was to be downloaded there, but: {exc}") from exc
        target = root / source
        log.info("saving the downloaded %s to %s (read from there on later runs)", source, target)
        dd.save_to_disk(str(target))
        return _from_datasetdict(dd, source, f"{HF_REPOS[source]} (saved to {target})")
    if not download:
        raise DataError(f"no --data-dir given and downloading is disabled for {source}. {offline_hint(source)}")
    return _from_datasetdict(_download(source), source, f"{HF_REPOS[source]} (Hugging Face Hub)")


# --------------------------------------------------------------------------- download

def _hub_unreachable(datasets_module) -> str | None:
    """Why the Hub cannot be reached, found in at most a few seconds; None if it may be reachable.

    Without this, an offline machine waits ~25 s while huggingface_hub retries with backoff before
    ``load_dataset`` fails. Skipped in offline mode (datasets then fails fast or uses its cache) and
    behind a proxy (a direct connection says nothing there).
    """
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    if getattr(datasets_module.config, "HF_HUB_OFFLINE", False) or getattr(constants, "HF_HUB_OFFLINE", False):
        return None
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(getattr(constants, "ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return None
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        return f"cannot connect to {host}:{port} ({exc})"
    return None


def _download(source: str):
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"downloading {source} needs the Hugging Face datasets package: pip install "
            f"'resnet-scale[data]'. {offline_hint(source)}"
        ) from None
    reason = _hub_unreachable(datasets)
    if reason is not None:
        raise DataError(f"cannot download {source} from the Hugging Face Hub: {reason}. {offline_hint(source)}")
    log.info("loading %s through Hugging Face datasets (%s)", source, HF_REPOS[source])
    try:
        dd = datasets.load_dataset(HF_REPOS[source])
    except Exception as exc:  # offline, DNS, HTTP, auth, cache: any failure to get the data
        raise DataError(
            f"could not download {source} ({HF_REPOS[source]}) from the Hugging Face Hub: "
            f"{type(exc).__name__}: {exc}. {offline_hint(source)}"
        ) from exc
    return dd


# --------------------------------------------------------------------------- local formats

def _load_local(root: Path, source: str):
    if not root.is_dir():
        return None
    pickle_dir = find_pickle_dir(root, source)
    if pickle_dir is not None:
        log.info("reading %s python pickles from %s", source, pickle_dir)
        return load_pickle_dir(pickle_dir, source)
    dirs, parquet = _scan(root)
    saved = _pick(dirs, root, source, "save_to_disk folders")
    if saved is not None:
        return _load_saved(saved, source)
    if parquet:
        group = _pick(sorted(parquet), root, source, "parquet folders")
        return _load_parquet(group, parquet[group], source)
    return None


def _scan(root: Path) -> tuple[list[Path], dict[Path, dict[str, list[Path]]]]:
    """save_to_disk folders (holding dataset_dict.json) and parquet files by (data set folder, split)."""
    saved: list[Path] = []
    parquet: dict[Path, dict[str, list[Path]]] = {}
    base_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if len(here.parts) - base_depth >= _MAX_DEPTH:
            dirnames[:] = []
        dirnames.sort()
        if "dataset_dict.json" in filenames:
            saved.append(here)
            dirnames[:] = []
            continue
        for name in sorted(filenames):
            if not name.endswith(".parquet"):
                continue
            m = _SPLIT_NAME.match(name)
            if m:  # plain_text/train-00000-of-00001.parquet
                split, group = m.group(1), here
            elif here.name in ("train", "test"):  # plain_text/train/0000.parquet
                split, group = here.name, here.parent
            else:
                continue
            parquet.setdefault(group, {}).setdefault(split, []).append(here / name)
    return saved, parquet


def _pick(candidates: list[Path], root: Path, source: str, what: str) -> Path | None:
    """The one candidate folder for ``source``; several are told apart by a path part naming it."""
    if len(candidates) <= 1:
        return candidates[0] if candidates else None

    def names_source(p: Path) -> bool:
        parts = p.relative_to(root).parts if p != root else (p.name,)
        return any(re.sub(r"[^a-z0-9]", "", part.lower()).endswith(source) for part in parts)

    matching = [c for c in candidates if names_source(c)]
    if len(matching) == 1:
        return matching[0]
    listed = ", ".join(str(c) for c in candidates)
    raise DataError(f"--data-dir {root} holds several {what} ({listed}); point --data-dir at the {source} one")


def _load_saved(folder: Path, source: str):
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{folder} was written by Hugging Face datasets' save_to_disk; reading it needs "
            f"pip install 'resnet-scale[data]'"
        ) from None
    log.info("reading %s saved with save_to_disk from %s", source, folder)
    try:
        dd = datasets.load_from_disk(str(folder))
    except Exception as exc:
        raise DataError(
            f"{folder}: cannot read this save_to_disk folder ({type(exc).__name__}: {exc}); it is "
            f"incomplete or corrupt: save it again, or pass another --data-dir"
        ) from exc
    return _from_datasetdict(dd, source, str(folder))


def _from_datasetdict(dd, source: str, where: str):
    """The converter the download and save_to_disk paths share: DatasetDict -> numpy arrays."""
    missing = [s for s in ("train", "test") if s not in dd]
    if missing:
        raise DataError(f"{where}: no {' or '.join(missing)} split (found {sorted(dd)}); {formats_help(source)}")
    out, classes = [], None
    for split in ("train", "test"):
        ds = dd[split]
        label_col = _choose(ds.column_names, LABEL_COLUMNS[source], f"{where} [{split}]", "label")
        names = getattr(ds.features[label_col], "names", None)
        classes = classes or _class_names(names, source, f"{where} [{split}]")
        image_col = _choose(ds.column_names, IMAGE_COLUMNS, f"{where} [{split}]", "image")
        tables = ds.with_format("arrow").iter(batch_size=_ROWS_PER_BATCH)
        out.append(_decode_tables(tables, image_col, label_col, source, f"{where} [{split}]"))
    return out[0], out[1], classes


def _load_parquet(group: Path, files: dict[str, list[Path]], source: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{group} holds parquet files; reading them needs pip install 'resnet-scale[data]'") from None
    missing = [s for s in ("train", "test") if s not in files]
    if missing:
        raise DataError(f"{group}: found parquet files for {sorted(files)} but none for {', '.join(missing)}; "
                        f"{formats_help(source)}")
    log.info("reading %s parquet files from %s", source, group)
    out, classes = [], None
    for split in ("train", "test"):
        parts = []
        for path in files[split]:
            try:
                pf = pq.ParquetFile(path)
                schema = pf.schema_arrow
            except Exception as exc:
                raise DataError(f"{path}: cannot read this parquet file ({type(exc).__name__}: {exc}); "
                                f"it is truncated or corrupt: download it again") from exc
            label_col = _choose(schema.names, LABEL_COLUMNS[source], str(path), "label")
            image_col = _choose(schema.names, IMAGE_COLUMNS, str(path), "image")
            classes = classes or _class_names(_parquet_names(schema, label_col), source, str(path))
            batches = _guarded(pf.iter_batches(batch_size=_ROWS_PER_BATCH, columns=[image_col, label_col]), path)
            parts.append(_decode_tables(batches, image_col, label_col, source, str(path), allow_empty=True))
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        if images.shape[0] == 0:
            raise DataError(f"{group}: the {split} parquet files hold no rows; download them again")
        out.append((images, labels))
    return out[0], out[1], classes


def _guarded(batches: Iterable, path: Path) -> Iterable:
    try:
        yield from batches
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read this parquet file ({type(exc).__name__}: {exc}); "
                        f"it is truncated or corrupt: download it again") from exc


def _parquet_names(schema, label_col: str) -> list[str] | None:
    """Class names from the Hugging Face features stored in the parquet schema metadata, if any."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        meta = json.loads(raw)
        return meta.get("info", {}).get("features", {}).get(label_col, {}).get("names")
    except (ValueError, AttributeError):
        return None


def _choose(columns: list[str], wanted: Iterable[str], where: str, what: str) -> str:
    for name in wanted:
        if name in columns:
            return name
    raise DataError(f"{where}: no {what} column (looked for {', '.join(wanted)}; found {', '.join(columns)})")


def _class_names(names, source: str, where: str) -> list[str]:
    if not names:
        return list(_DEFAULT_CLASSES[source])
    if len(names) != NUM_CLASSES[source]:
        raise DataError(f"{where}: the label column has {len(names)} classes, {source} has {NUM_CLASSES[source]}; "
                        f"is this the right data set?")
    return [str(n) for n in names]


def _decode_tables(tables: Iterable, image_col: str, label_col: str, source: str, where: str,
                   allow_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Arrow tables / record batches with an HF image column and a label column ->
    (uint8 N x 3 x 32 x 32, int64 N). The one converter for every Hugging Face form of CIFAR."""
    from PIL import Image, UnidentifiedImageError

    fix = "download the data again, or pass another --data-dir"
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    row = 0
    for table in tables:
        col = table.column(image_col)
        col = col.combine_chunks() if hasattr(col, "combine_chunks") else col
        if hasattr(col.type, "get_field_index") and col.type.get_field_index("bytes") >= 0:
            blobs = col.field("bytes").to_pylist()
            paths = col.field("path").to_pylist() if col.type.get_field_index("path") >= 0 else [None] * len(blobs)
        elif str(col.type) in ("binary", "large_binary"):
            blobs, paths = col.to_pylist(), [None] * len(col)
        else:
            raise DataError(f"{where}: image column {image_col!r} has type {col.type}; expected the Hugging Face "
                            f"Image struct {{bytes, path}} or binary PNG/JPEG bytes")
        batch = np.empty((len(blobs), 32, 32, 3), dtype=np.uint8)
        for i, (blob, path) in enumerate(zip(blobs, paths)):
            try:
                if blob is None:
                    if not path or not Path(path).is_file():
                        raise DataError(f"{where}: row {row + i} has no image bytes and no readable path; {fix}")
                    blob = Path(path).read_bytes()
                with Image.open(io.BytesIO(blob)) as img:
                    arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img)
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise DataError(f"{where}: row {row + i}: cannot decode the image ({exc}); {fix}") from exc
            if arr.shape != (32, 32, 3):
                raise DataError(f"{where}: row {row + i}: image is {arr.shape[1]}x{arr.shape[0]}, "
                                f"{source} images are 32x32; {fix}")
            batch[i] = arr
        lab = table.column(label_col)
        if lab.null_count:
            raise DataError(f"{where}: {lab.null_count} rows have no label; {fix}")
        labels.append(check_labels(np.asarray(lab), NUM_CLASSES[source], where, fix, first_row=row))
        images.append(batch)
        row += len(blobs)
    if row == 0 and not allow_empty:
        raise DataError(f"{where}: the split is empty; {fix}")
    hwc = np.concatenate(images) if images else np.empty((0, 32, 32, 3), np.uint8)
    flat = np.concatenate(labels) if labels else np.empty((0,), np.int64)
    return np.ascontiguousarray(hwc.transpose(0, 3, 1, 2)), flat
