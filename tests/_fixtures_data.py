"""Writers of small data sets in the real on-disk formats, for tests (no network needed).

Images are numpy uint8 N x 3 x 32 x 32 (the layout ImageSet holds and CIFAR's rows flatten), labels
int N. Reusable from any test (e.g. an end-to-end CLI run: write a fixture, pass ``--data-dir``).
Nothing here imports resnet_scale: the files are written from the formats' own definitions.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def random_cifar(n_train: int, n_test: int, num_classes: int = 10, seed: int = 0):
    """(images_train, labels_train, images_test, labels_test): random pixels, every class used if n allows."""
    rng = np.random.default_rng(seed)
    out = []
    for n in (n_train, n_test):
        out.append(rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8))
        out.append((np.arange(n) + rng.integers(0, num_classes)) % num_classes)
    return tuple(out)


def _dump(path: Path, obj: dict, protocol: int) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def write_cifar10_pickles(root, images_train, labels_train, images_test, labels_test, *,
                          label_names=CIFAR10_NAMES, num_batches: int = 5, protocol: int = 2) -> Path:
    """``root/cifar-10-batches-py`` as in cifar-10-python.tar.gz: data_batch_1..5, test_batch, batches.meta.

    Dicts with bytes keys (the original files are Python 2 pickles read with encoding="bytes"),
    b"data" uint8 N x 3072 (row-major C x H x W), b"labels" a list of ints. Protocol 2 by default,
    like the originals (numpy arrays then pickle through ``_reconstruct``).
    """
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    parts = np.array_split(np.arange(len(labels_train)), num_batches)
    for i, idx in enumerate(parts, start=1):
        _dump(folder / f"data_batch_{i}", {
            b"batch_label": f"training batch {i} of {num_batches}".encode(),
            b"labels": [int(v) for v in np.asarray(labels_train)[idx]],
            b"data": np.ascontiguousarray(images_train[idx]).reshape(len(idx), 3072),
            b"filenames": [f"img_{j}.png".encode() for j in idx],
        }, protocol)
    _dump(folder / "test_batch", {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [int(v) for v in labels_test],
        b"data": np.ascontiguousarray(images_test).reshape(len(labels_test), 3072),
        b"filenames": [f"test_{j}.png".encode() for j in range(len(labels_test))],
    }, protocol)
    _dump(folder / "batches.meta", {
        b"num_cases_per_batch": len(parts[0]),
        b"label_names": [n.encode() for n in label_names],
        b"num_vis": 3072,
    }, protocol)
    return folder


def write_cifar100_pickles(root, images_train, labels_train, images_test, labels_test, *,
                           protocol: int = 2) -> Path:
    """``root/cifar-100-python``: train, test (b"fine_labels", b"coarse_labels", b"data") and meta."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, images, labels in (("train", images_train, labels_train), ("test", images_test, labels_test)):
        _dump(folder / name, {
            b"filenames": [f"{name}_{j}.png".encode() for j in range(len(labels))],
            b"batch_label": f"{name} batch".encode(),
            b"fine_labels": [int(v) for v in labels],
            b"coarse_labels": [int(v) // 5 for v in labels],
            b"data": np.ascontiguousarray(images).reshape(len(labels), 3072),
        }, protocol)
    _dump(folder / "meta", {
        b"fine_label_names": [f"fine_{i:02d}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range(20)],
    }, protocol)
    return folder


def png_bytes(chw: np.ndarray) -> bytes:
    """PNG encoding of one uint8 3 x H x W (or H x W x 3 if last dim is 3 and first is not) image."""
    from PIL import Image

    hwc = chw.transpose(1, 2, 0) if chw.shape[0] == 3 and chw.shape[-1] != 3 else chw
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(hwc)).save(buf, format="PNG")
    return buf.getvalue()


def write_cifar10_parquet(root, images_train, labels_train, images_test, labels_test, *,
                          subdir: str = "plain_text", image_col: str = "img", label_col: str = "label",
                          label_names=CIFAR10_NAMES, train_shards: int = 1, split_dirs: bool = False) -> Path:
    """Hub-layout parquet (``root/plain_text/train-00000-of-00001.parquet``, ``test-...``) in the HF schema.

    The image column is the HF Image struct {bytes: PNG, path}, the label column int64, and the
    schema metadata carries the Hugging Face features (ClassLabel names) as the hub's files do.
    ``split_dirs`` writes the refs/convert/parquet layout instead (``plain_text/train/0000.parquet``).
    Written with pyarrow only. Use ``label_col="fine_label"`` and 100 names for CIFAR-100.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(root) / subdir
    features = {image_col: {"_type": "Image"}, label_col: {"names": list(label_names), "_type": "ClassLabel"}}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for split, images, labels, shards in (("train", images_train, labels_train, train_shards),
                                          ("test", images_test, labels_test, 1)):
        for s, idx in enumerate(np.array_split(np.arange(len(labels)), shards)):
            column = pa.array([{"bytes": png_bytes(images[i]), "path": None} for i in idx], type=struct)
            table = pa.table({image_col: column, label_col: pa.array(np.asarray(labels)[idx], type=pa.int64())})
            table = table.replace_schema_metadata(meta)
            if split_dirs:
                path = folder / split / f"{s:04d}.parquet"
            else:
                path = folder / f"{split}-{s:05d}-of-{shards:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)
    return folder


def write_cifar10_save_to_disk(root, images_train, labels_train, images_test, labels_test, *,
                               name: str = "cifar10", label_names=CIFAR10_NAMES) -> Path:
    """A ``datasets.DatasetDict`` (train/test; img Image + label ClassLabel) saved with save_to_disk."""
    folder = Path(root) / name
    dd = make_cifar10_datasetdict(images_train, labels_train, images_test, labels_test, label_names=label_names)
    dd.save_to_disk(str(folder))
    return folder


def make_cifar10_datasetdict(images_train, labels_train, images_test, labels_test, *, label_names=CIFAR10_NAMES):
    """The DatasetDict ``load_dataset("uoft-cs/cifar10")`` returns, built from the given pixels."""
    import datasets

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(label_names))})
    splits = {}
    for split, images, labels in (("train", images_train, labels_train), ("test", images_test, labels_test)):
        rows = {"img": [{"bytes": png_bytes(im), "path": None} for im in images],
                "label": [int(v) for v in labels]}
        splits[split] = datasets.Dataset.from_dict(rows, features=features)
    return datasets.DatasetDict(splits)


def write_image_folder(root, classes=("cat", "dog"), counts=None, size=(24, 20), seed: int = 0,
                       splits=("train", "test")) -> dict:
    """``root/<split>/<class>/<i>.png`` with random RGB images of ``size`` (W, H); returns
    {split: {class: [H x W x 3 arrays]}}. ``counts`` maps split -> images per class (default 3/2)."""
    from PIL import Image

    counts = counts or {"train": 3, "test": 2, "val": 2}
    rng = np.random.default_rng(seed)
    written: dict = {}
    for split in splits:
        for name in classes:
            d = Path(root) / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(counts[split]):
                arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
                written.setdefault(split, {}).setdefault(name, []).append(arr)
    return written
