"""The dataset a device-resident loader holds on each device, for the memory estimate."""

from __future__ import annotations

from pathlib import Path

from resnet_scale.config import Config
from resnet_scale.planner.units import GiB, format_bytes

#: Sizes of the sources' splits (train, test), for the device-resident dataset.
_SPLIT_SIZES = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000), "digits": (1_437, 360)}
_CLASSES = {"cifar10": 10, "cifar100": 100, "digits": 10}


def _num_classes(cfg: Config) -> int:
    d = cfg.data
    if d.source == "synthetic":
        return d.synthetic_classes
    if d.source == "imagefolder":
        train = Path(d.data_dir or ".") / "train"
        n = sum(1 for p in train.iterdir() if p.is_dir()) if train.is_dir() else 0
        return n or 10
    return _CLASSES[d.source]


def dataset_device_bytes(cfg: Config) -> tuple[int, str]:
    """(bytes the device-resident loader holds on each device, how it was found)."""
    d, size = cfg.data, cfg.image_size()
    if d.source == "imagefolder":
        if d.in_memory == "no":
            return 0, "image folder streamed (--in-memory no)"
        from resnet_scale.data import estimate_imagefolder_bytes

        images = estimate_imagefolder_bytes(d.data_dir, size)
        if d.in_memory == "auto" and images > d.in_memory_limit_gib * GiB:
            return 0, f"image folder streamed ({format_bytes(images)} > --in-memory-limit-gib {d.in_memory_limit_gib})"
        count = images // (3 * size * size)
        return images + 8 * count, f"image folder held on the device ({count} images)"
    if d.source == "synthetic":
        n_train, n_test = d.synthetic_train_samples, d.synthetic_test_samples
    else:
        n_train, n_test = _SPLIT_SIZES[d.source]
    count = n_train + n_test
    return count * (3 * size * size + 8), f"{d.source}: {n_train:,} + {n_test:,} images at {size} px, uint8"
