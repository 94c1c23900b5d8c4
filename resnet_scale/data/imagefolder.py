"""Image folders: ``data_dir/train/<class>/*.png|jpg|...`` and ``data_dir/test/<class>/...`` (or ``val/``).

Everything is decoded with PIL into memory once, as uint8, resized so the shorter side is
``image_size`` and center-cropped to a square. This suits data that fits in host memory (the
DeviceLoader then holds it on the GPU). Data too big for that will need a streaming path
(a torch DataLoader over the files, decoding per batch); it is not built yet.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .imageset import DataError, log

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


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
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read this image ({exc}); delete or replace the file") from exc


def _load_split(split_dir: Path, classes: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
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
    images = np.empty((len(files), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(files):  # load time only; never in the training loop
        images[i] = _load_image(path, size).transpose(2, 0, 1)
    return images, np.asarray(labels, dtype=np.int64)


def load_imagefolder(data_dir: str | None, image_size: int | None):
    """((train_images, train_labels), (test_images, test_labels), classes), images uint8 N x 3 x S x S."""
    layout = "data_dir/train/<class>/*.png (or .jpg, ...) and data_dir/test/<class>/... (or val/)"
    if data_dir is None:
        raise DataError(f"--data imagefolder needs --data-dir pointing at {layout}")
    if image_size is None:
        raise DataError("--data imagefolder needs --image-size (pixels; images are resized by their shorter "
                        "side and center-cropped to a square)")
    root = Path(data_dir).expanduser()
    train_dir = root / "train"
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(f"--data-dir {root}: expected {layout}; missing "
                        f"{'train/' if not train_dir.is_dir() else 'test/ (or val/)'}")
    classes = _classes(train_dir)
    if not classes:
        raise DataError(f"{train_dir}: no class folders; expected {layout}")
    test_classes = _classes(test_dir)
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise DataError(f"{root}: test classes differ from train classes (only in train: {only_train}; "
                        f"only in {test_dir.name}: {only_test}); both splits need the same class folders")
    log.info("reading image folders from %s (%d classes, %d px)", root, len(classes), image_size)
    return _load_split(train_dir, classes, image_size), _load_split(test_dir, classes, image_size), classes
