"""The in-memory image set every source produces, the data error, and the helpers they share.

Only torch and numpy are imported here: ``import resnet_scale.data`` must not need the optional
dependencies (datasets, pyarrow, scikit-learn, PIL), which are imported inside the functions that
use them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .budget import available_memory_bytes, format_size

log = logging.getLogger("resnet_scale.data")

# Rows per chunk when resizing or summing statistics: bounds the float32 temporaries to
# ~CHUNK x 3 x H x W x 4 bytes (12 MiB at 32x32) however large the split is.
_CHUNK = 1024


class DataError(ValueError):
    """A problem with the user's data or data options; the message says what was wrong and what to do."""


@dataclass
class ImageSet:
    """One split of an image data set, held in memory.

    ``images`` is uint8 N x 3 x H x W, contiguous, on the CPU (grayscale sources are repeated to
    3 channels); ``labels`` is int64 N with values in [0, len(classes)). ``mean`` and ``std`` are the
    per-channel statistics of the TRAIN split on the [0, 1] scale, used for normalisation (the test
    split carries the train split's statistics too).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        im, lb = self.images, self.labels
        if im.dtype != torch.uint8 or im.dim() != 4 or im.shape[1] != 3:
            raise DataError(
                f"ImageSet images must be uint8 N x 3 x H x W, got {im.dtype} {tuple(im.shape)}"
            )
        if lb.dtype != torch.int64 or lb.dim() != 1 or lb.shape[0] != im.shape[0]:
            raise DataError(
                f"ImageSet labels must be int64 of length {im.shape[0]}, got {lb.dtype} {tuple(lb.shape)}"
            )
        if lb.numel() and (int(lb.min()) < 0 or int(lb.max()) >= len(self.classes)):
            raise DataError(
                f"ImageSet labels must lie in [0, {len(self.classes)}), "
                f"found [{int(lb.min())}, {int(lb.max())}]"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise DataError(f"ImageSet mean/std must be 3 values, std > 0; got {self.mean} / {self.std}")
        self.images = im.cpu().contiguous()
        self.labels = lb.cpu().contiguous()
        self.mean = tuple(float(m) for m in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(s) for s in self.std)  # type: ignore[assignment]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images."""
        return int(self.images.shape[2]), int(self.images.shape[3])


def check_host_memory(nbytes: int, what: str, fix: str) -> None:
    """Raise DataError, before anything is allocated, when ``what`` (``nbytes``) cannot fit in the
    host memory available now."""
    available = available_memory_bytes()
    if available is not None and nbytes > available:
        raise DataError(f"{what} would take {format_size(nbytes)} of memory ({nbytes:,} bytes), more than the "
                        f"{format_size(available)} available; {fix}")


def check_device_memory(nbytes: int, device: torch.device, what: str, fix: str) -> None:
    """Raise DataError when ``what`` cannot fit in the free memory of CUDA ``device`` (other devices:
    no check)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes > free:
            raise DataError(f"{what} would take {format_size(nbytes)} on {device}, more than its "
                            f"{format_size(free)} of free memory; {fix}")


def channel_stats(images: torch.Tensor, std_floor: float = 1e-3) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 N x C x H x W images on the [0, 1] scale.

    Sums in float64 over chunks of rows, so it neither overflows nor allocates a float copy of the
    whole split. std is floored at ``std_floor`` so that normalising a constant channel cannot
    divide by zero.
    """
    n, c = images.shape[0], images.shape[1]
    if n == 0:
        raise DataError("cannot compute mean/std of an empty training split")
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, n, _CHUNK):
        x = images[start:start + _CHUNK].to(torch.float64).div_(255.0)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square_().sum(dim=(0, 2, 3))
    count = n * images.shape[2] * images.shape[3]
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    std = var.sqrt().clamp_min(std_floor)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 N x C x H x W images to size x size, bilinear with antialiasing, once at load time.

    Returns the input unchanged when it already has that size. Works in chunks of rows so the float
    temporaries stay small.
    """
    if size <= 0:
        raise DataError(f"image_size must be a positive number of pixels, got {size}")
    if images.shape[2] == size and images.shape[3] == size:
        return images
    n, c = images.shape[0], images.shape[1]
    check_host_memory(n * c * size * size, f"{n:,} images resized to {size}x{size} px",
                      "use a smaller --image-size")
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], _CHUNK):
        x = images[start:start + _CHUNK].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start:start + _CHUNK] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def check_labels(labels: np.ndarray, num_classes: int, where: str, fix: str, first_row: int = 0) -> np.ndarray:
    """Return labels as int64, or raise DataError naming ``where`` and the row (``first_row`` is the
    row of ``labels[0]`` in that file) if any lies outside [0, num_classes)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"{where}: labels must be a 1-D list, got shape {labels.shape}. {fix}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers, got dtype {labels.dtype}. {fix}")
    labels = labels.astype(np.int64, copy=False)
    if labels.size:
        bad = (labels < 0) | (labels >= num_classes)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{where}: label {int(labels[first])} at position {first_row + first} is outside [0, {num_classes}) "
                f"({int(bad.sum())} labels out of range). {fix}"
            )
    return labels


def make_split(
    images_nchw: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    classes: list[str],
    image_size: int | None,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> ImageSet:
    """Wrap uint8 N x 3 x H x W pixels and int labels as an ImageSet, resized to ``image_size`` if given."""
    im = torch.as_tensor(images_nchw)
    lb = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if image_size is not None:
        im = resize_uint8(im, image_size)
    return ImageSet(images=im.contiguous(), labels=lb, classes=list(classes), mean=mean, std=std)
