"""Image folders: ``data_dir/train/<class>/*.png|jpg|...`` and ``data_dir/test/<class>/...`` (or ``val/``).

Two paths over the same folders, with the same checks and the same pixels:

- in memory (:func:`load_imagefolder`, via ``build_datasets("imagefolder", ...)``): everything is
  decoded with PIL once, as uint8, resized so the shorter side is ``image_size`` and center-cropped to
  a square. This suits data that fits in memory (the DeviceLoader then holds it on the GPU).
- streaming (:func:`index_imagefolder`): only the file names are listed, into an
  :class:`ImageFolderIndex`; :class:`~resnet_scale.data.streaming.StreamingLoader`'s worker processes
  decode each batch with the same :func:`_load_image`. :func:`estimate_imagefolder_bytes` says which
  path a folder needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .imageset import DataError, check_host_memory, log

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_LAYOUT = "data_dir/train/<class>/*.png (or .jpg, ...) and data_dir/test/<class>/... (or val/)"
# index_imagefolder's mean/std come from at most this many train images (decoding all of ImageNet
# would take as long as an epoch).
STATS_SAMPLE = 1000


def _classes(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _load_image(path: Path, size: int) -> np.ndarray:
    """H x W x 3 uint8: shorter side resized to ``size`` (bilinear; PIL filters when shrinking), then center crop."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), Image.Resampling.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read this image ({exc}); delete or replace the file") from exc


def _verify_image(path: Path) -> None:
    """Decode ``path`` once, cheaply, or raise :func:`_load_image`'s DataError: a JPEG at 1/8 scale
    (its whole entropy-coded stream is still read, so truncation and corrupt data show), every
    other format in full at its own size (PNG: every chunk, CRC and the zlib stream)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.draft("RGB", (1, 1))
            img.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read this image ({exc}); delete or replace the file") from exc


def verify_images(files: list[str] | list[Path], threads: int | None = None) -> None:
    """Decode every file of ``files`` (:func:`_verify_image`), in threads (PIL decodes without the
    GIL); the first unreadable one in list order is the DataError raised."""
    from concurrent.futures import ThreadPoolExecutor

    threads = threads or min(8, os.cpu_count() or 1)
    if threads <= 1 or len(files) < 64:
        for path in files:
            _verify_image(Path(path))
        return
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(_verify_image, map(Path, files), chunksize=16):
            pass


def _list_split(split_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """The split's image files, class by class (classes in the given order, files sorted), and labels."""
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = _files(split_dir / name)
        if not found:
            raise DataError(
                f"{split_dir / name}: class folder holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                f"add images or remove the folder"
            )
        files += found
        labels += [label] * len(found)
    return files, labels


def _load_split(split_dir: Path, classes: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    files, labels = _list_split(split_dir, classes)
    check_host_memory(len(files) * 3 * size * size, f"{split_dir}: {len(files):,} images at {size}x{size} px",
                      "use a smaller --image-size, or --in-memory no to stream the images from disk")
    images = np.empty((len(files), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(files):  # load time only; never in the training loop
        images[i] = _load_image(path, size).transpose(2, 0, 1)
    return images, np.asarray(labels, dtype=np.int64)


def _find_splits(data_dir: str | None, image_size: int | None) -> tuple[Path, Path, Path, list[str]]:
    """(root, train_dir, test_dir, classes) after checking the layout; test_dir is test/ or else val/."""
    if data_dir is None:
        raise DataError(f"--data imagefolder needs --data-dir pointing at {_LAYOUT}")
    if image_size is None:
        raise DataError("--data imagefolder needs --image-size (pixels; images are resized by their shorter "
                        "side and center-cropped to a square)")
    root = Path(data_dir).expanduser()
    train_dir = root / "train"
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(f"--data-dir {root}: expected {_LAYOUT}; missing "
                        f"{'train/' if not train_dir.is_dir() else 'test/ (or val/)'}")
    classes = _classes(train_dir)
    if not classes:
        raise DataError(f"{train_dir}: no class folders; expected {_LAYOUT}")
    if len(classes) == 1:
        raise DataError(f"{train_dir}: one class folder ({classes[0]}) only; a classifier needs at least 2 "
                        f"classes: add a folder of images per class ({_LAYOUT})")
    test_classes = _classes(test_dir)
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise DataError(f"{root}: test classes differ from train classes (only in train: {only_train}; "
                        f"only in {test_dir.name}: {only_test}); both splits need the same class folders")
    return root, train_dir, test_dir, classes


def load_imagefolder(data_dir: str | None, image_size: int | None):
    """((train_images, train_labels), (test_images, test_labels), classes), images uint8 N x 3 x S x S."""
    root, train_dir, test_dir, classes = _find_splits(data_dir, image_size)
    log.info("reading image folders from %s (%d classes, %d px)", root, len(classes), image_size)
    return _load_split(train_dir, classes, image_size), _load_split(test_dir, classes, image_size), classes


# ----------------------------------------------------------------------------- streaming: an index of files


@dataclass
class ImageFolderIndex:
    """One split of an image folder as a list of files, for :class:`StreamingLoader` (nothing decoded).

    ``files[i]`` is the path of sample i and ``labels[i]`` (int64) its class index into ``classes``;
    samples are ordered class by class, files sorted by name, exactly as the in-memory path orders
    them. Every image is read as ``image_size`` x ``image_size`` (shorter side resized, center crop).
    ``mean``/``std`` are the TRAIN split's per-channel statistics on the [0, 1] scale (the test index
    carries the train split's too), from a sample: see :func:`index_imagefolder`.
    """

    files: list[str]
    labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int

    def __post_init__(self) -> None:
        self.files = [str(f) for f in self.files]
        lb = torch.as_tensor(self.labels)
        if lb.dtype != torch.int64 or lb.dim() != 1 or lb.shape[0] != len(self.files):
            raise DataError(f"ImageFolderIndex labels must be int64 of length {len(self.files)}, "
                            f"got {lb.dtype} {tuple(lb.shape)}")
        if lb.numel() and (int(lb.min()) < 0 or int(lb.max()) >= len(self.classes)):
            raise DataError(f"ImageFolderIndex labels must lie in [0, {len(self.classes)}), "
                            f"found [{int(lb.min())}, {int(lb.max())}]")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise DataError(f"ImageFolderIndex mean/std must be 3 values, std > 0; got {self.mean} / {self.std}")
        if not isinstance(self.image_size, int) or self.image_size <= 0:
            raise DataError(f"image_size must be a positive number of pixels, got {self.image_size!r}")
        self.labels = lb.cpu().contiguous()
        self.classes = list(self.classes)
        self.mean = tuple(float(m) for m in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(s) for s in self.std)  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _check_size(image_size) -> None:
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size <= 0):
        raise DataError(f"image_size must be a positive number of pixels, got {image_size!r}")


def sample_stats(files: list[Path], size: int, limit: int = STATS_SAMPLE, std_floor: float = 1e-3):
    """Per-channel (mean, std) on the [0, 1] scale of at most ``limit`` of ``files``, decoded at ``size``.

    The sample is fixed, not random: positions ``i * n // k`` for i < k = min(n, limit), spread evenly
    over the list (so over the classes, which the list holds in order). All files when n <= limit.
    Pixel sums are exact int64 (one image decoded at a time), so the result equals the in-memory
    path's ``channel_stats`` of the same images up to float64 rounding; std is floored like there.
    """
    n = len(files)
    if n == 0:
        raise DataError("cannot compute mean/std of an empty training split")
    k = min(n, limit)
    total = torch.zeros(3, dtype=torch.int64)
    total_sq = torch.zeros(3, dtype=torch.int64)
    for i in range(k):
        px = torch.from_numpy(_load_image(files[i * n // k], size).astype(np.int64))  # S x S x 3
        total += px.sum(dim=(0, 1))
        total_sq += px.square().sum(dim=(0, 1))
    count = k * size * size
    mean = total.to(torch.float64) / (255.0 * count)
    var = (total_sq.to(torch.float64) / (255.0 * 255.0 * count) - mean.square()).clamp_min(0.0)
    std = var.sqrt().clamp_min(std_floor)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def index_imagefolder(data_dir: str | None, image_size: int | None) -> tuple[ImageFolderIndex, ImageFolderIndex]:
    """(train_index, test_index) of ``data_dir/train/<class>/`` and ``test/`` (or ``val/``), for streaming.

    Lists the files WITHOUT decoding them, with the same checks (and messages) as the in-memory
    path: missing folders, no class folders, train and test class folders that differ, an empty class
    folder, no ``image_size``. The one decoding done here is for the normalisation statistics: mean
    and std of a fixed sample of at most ``STATS_SAMPLE`` (1,000) train images (:func:`sample_stats`),
    which for a folder of <= 1,000 train images equals the in-memory path's statistics up to float64
    rounding. Every test image is decoded once (:func:`verify_images`: a JPEG at 1/8 scale, in
    threads), so an unreadable one is refused here rather than after the first epoch of training.
    """
    _check_size(image_size)
    root, train_dir, test_dir, classes = _find_splits(data_dir, image_size)
    train_files, train_labels = _list_split(train_dir, classes)
    test_files, test_labels = _list_split(test_dir, classes)
    log.info("indexed image folders in %s: %d train / %d %s files, %d classes; mean/std from %d train images",
             root, len(train_files), len(test_files), test_dir.name, len(classes),
             min(len(train_files), STATS_SAMPLE))
    # PIL holds a resized RGB image at 4 bytes a pixel, then the crop and its array: ~12 bytes a pixel.
    check_host_memory(12 * image_size * image_size, f"one image decoded at {image_size}x{image_size} px",
                      "use a smaller --image-size")
    mean, std = sample_stats(train_files, image_size)
    # The test split is first read after the first epoch: a bad file there is found now, before a step.
    verify_images(test_files)
    return tuple(  # type: ignore[return-value]
        ImageFolderIndex(files, torch.tensor(labels, dtype=torch.int64), classes, mean, std, image_size)
        for files, labels in ((train_files, train_labels), (test_files, test_labels))
    )


def estimate_imagefolder_bytes(data_dir: str | None, image_size: int | None) -> int:
    """Bytes the in-memory path would hold for ``data_dir``: (train + test files) x 3 x image_size² (uint8).

    Lists the files (same checks as :func:`index_imagefolder`) but decodes none, so a caller can
    choose between ``build_datasets`` + ``DeviceLoader`` and ``index_imagefolder`` + ``StreamingLoader``
    before reading any pixels. The DeviceLoader holds the same bytes again on the device.
    """
    _check_size(image_size)
    _, train_dir, test_dir, classes = _find_splits(data_dir, image_size)
    count = len(_list_split(train_dir, classes)[0]) + len(_list_split(test_dir, classes)[0])
    return count * 3 * int(image_size) ** 2
