"""Data sources: each gives a (train, test) pair of in-memory uint8 :class:`ImageSet`.

``build_datasets(source, ...)`` is the one entry point. Sources:

- ``cifar10`` / ``cifar100``: Hugging Face download, or a local ``data_dir`` (:mod:`.cifar`).
- ``digits``: scikit-learn's 8x8 handwritten digits, offline (needs ``resnet-scale[demo]``).
- ``synthetic``: random pixels and labels from a seeded generator; for speed and plumbing tests.
- ``imagefolder``: ``train/<class>/`` and ``test/<class>/`` image folders (:mod:`.imagefolder`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from resnet_scale.config import NATIVE_IMAGE_SIZE, SOURCES

from .digits_split import TEST_INDICES
from .imageset import (
    DataError,
    ImageSet,
    channel_stats,
    check_host_memory,
    log,
    make_split,
)

# The digits test split is fixed (this seed, whatever the run's seed) so every run scores the same images.


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")


def native_image_size(source: str) -> int | None:
    """The size images of ``source`` have unless ``image_size`` asks otherwise (None: no native size)."""
    _check_source(source)
    return NATIVE_IMAGE_SIZE[source]


def build_datasets(
    source: str,
    *,
    data_dir: str | None = None,
    image_size: int | None = None,
    download: bool = True,
    seed: int = 0,
    synthetic_samples: tuple[int, int] = (1024, 256),
    num_classes: int = 10,
) -> tuple[ImageSet, ImageSet]:
    """(train, test) image sets for ``source``.

    ``image_size`` None means the source's native size (cifar 32, digits 16, synthetic 32;
    imagefolder requires it). Images are resized once here (bilinear, antialiased) when
    ``image_size`` differs from the native size. ``mean``/``std`` are the known CIFAR constants
    for cifar10/cifar100, otherwise computed from the train split (std floored at 1e-3).
    ``seed`` and ``num_classes`` are used by ``synthetic`` only (digits has a fixed split;
    the other sources' classes come from the data). Sets nothing global.
    """
    _check_source(source)
    if image_size is not None and (not isinstance(image_size, int) or image_size <= 0):
        raise DataError(f"image_size must be a positive number of pixels, got {image_size!r}")
    size = image_size if image_size is not None else NATIVE_IMAGE_SIZE[source]

    if source in ("cifar10", "cifar100"):
        from .cifar import CIFAR_STATS, load_cifar

        train, test, classes = load_cifar(source, data_dir, download)
        mean, std = CIFAR_STATS[source]
        result = (make_split(*train, classes, size, mean, std), make_split(*test, classes, size, mean, std))
    elif source == "imagefolder":
        from .imagefolder import load_imagefolder

        train, test, classes = load_imagefolder(data_dir, image_size)
        result = _with_train_stats(train, test, classes, size)
    elif source == "digits":
        result = _with_train_stats(*_load_digits(size), size)
    else:
        result = _synthetic(synthetic_samples, num_classes, size, seed)
    log.info("data %s: %d train / %d test images, %d classes, %dx%d px",
             source, len(result[0]), len(result[1]), len(result[0].classes), *result[0].image_size)
    return result


def _with_train_stats(train, test, classes, size) -> tuple[ImageSet, ImageSet]:
    """ImageSets whose mean/std are computed from the train split (after resizing)."""
    probe = make_split(*train, classes, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    mean, std = channel_stats(probe.images)
    probe.mean, probe.std = mean, std
    return probe, make_split(*test, classes, size, mean, std)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (N x 8 x 8 float values 0..16, N int64 labels), read from the
    ``digits.csv.gz`` scikit-learn ships (the file ``load_digits`` reads) without importing
    scikit-learn, which costs seconds (SciPy) at every start; ``load_digits`` if the file is elsewhere."""
    try:
        spec = importlib.util.find_spec("sklearn")
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError("--data digits needs scikit-learn: pip install 'resnet-scale[demo]'")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        table = np.loadtxt(path, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target.astype(np.int64)


def _load_digits(size: int):
    """scikit-learn digits: 1,797 8x8 images, 0..16 -> uint8 0..255, 3 channels; the fixed stratified
    80/20 split of ``digits_split.py``."""
    values, labels = digits_arrays()
    if len(labels) != 1797:
        raise DataError(f"scikit-learn's digits hold {len(labels)} images, not 1,797: the fixed split does not apply.")
    pixels = np.rint(values * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # N x 8 x 8
    images = np.ascontiguousarray(np.repeat(pixels[:, None], 3, axis=1))  # N x 3 x 8 x 8
    test_idx = np.asarray(TEST_INDICES)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    classes = [str(d) for d in range(10)]
    # make_split resizes 8x8 -> size x size (native 16) bilinearly.
    return (images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx]), classes


def _synthetic(samples: tuple[int, int], num_classes: int, size: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """Random uint8 images and labels from a torch.Generator seeded with ``seed`` (train, then test)."""
    n_train, n_test = (int(n) for n in samples)
    if n_train <= 0 or n_test <= 0:
        raise DataError(f"synthetic_samples must be two positive counts (train, test), got {samples}")
    if num_classes < 1:
        raise DataError(f"num_classes must be >= 1 for synthetic data, got {num_classes}")
    check_host_memory((n_train + n_test) * 3 * size * size,
                      f"the synthetic data ({n_train:,} train + {n_test:,} test images of 3 x {size} x {size} bytes)",
                      "lower --synthetic-train-samples / --synthetic-test-samples or --image-size")
    g = torch.Generator().manual_seed(seed)
    parts = []
    for n in (n_train, n_test):
        images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, num_classes, (n,), generator=g, dtype=torch.int64)
        parts.append((images, labels))
    classes = [str(c) for c in range(num_classes)]
    mean, std = channel_stats(parts[0][0])
    return (make_split(*parts[0], classes, None, mean, std), make_split(*parts[1], classes, None, mean, std))
