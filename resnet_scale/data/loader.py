"""DeviceLoader: a whole split resident on the device, sharded across ranks, augmented in batches there.

After KellerJordan/cifar10-airbench: the uint8 images are moved to the device once, each batch is
an ``index_select``, and crop/flip run on the whole batch at once. No worker processes, no per-sample
Python in the iteration path.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .imageset import DataError, ImageSet

_SEED_STRIDE = 1_000_003  # epoch seed = seed * _SEED_STRIDE + epoch: distinct for every (seed, epoch < 1e6)


def epoch_seed(seed: int, epoch: int) -> int:
    """The CPU generator seed of one epoch; the same on every rank."""
    return (int(seed) * _SEED_STRIDE + int(epoch)) % (1 << 63)


def random_crop(x: torch.Tensor, shifts: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad ``x`` (N x C x H x W) by ``padding`` on each side and crop back to H x W at per-sample
    offsets ``shifts`` (N x 2: row, column, each in [0, 2 * padding]).

    Two batched gathers (rows, then columns), no loop over samples; on CPU this measured 2-3x faster
    than one four-index advanced-indexing gather.
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = shifts[:, 0, None] + torch.arange(h, device=x.device)  # N x H
    cols = shifts[:, 1, None] + torch.arange(w, device=x.device)  # N x W
    x = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * padding))
    return x.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def random_flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the samples of ``x`` where the boolean ``mask`` (N) is set, left to right."""
    return torch.where(mask[:, None, None, None], x.flip(3), x)


class DeviceLoader:
    """Iterate over one split held on ``device``, sharded across ``world_size`` ranks.

    ``batch_size`` is the GLOBAL batch (all ranks together); each rank gets ``batch_size //
    world_size`` samples of every full batch. ``batch_size`` must be divisible by ``world_size``.
    Every rank must be built with the same data, ``batch_size``, ``seed`` and ``train`` and call
    :meth:`set_epoch` with the same epoch before each epoch (as with ``DistributedSampler``;
    without it every epoch repeats epoch 0's order and augmentation).

    Training (``train=True``): each epoch draws, from a CPU ``torch.Generator`` seeded with
    :func:`epoch_seed` ``(seed, epoch)``, one global permutation of all N samples plus each
    position's crop offsets and flip coin -- identical on every rank. The permutation is cut into
    global batches of ``batch_size``; rank r takes the r-th contiguous slice of each. The last,
    partial global batch is kept and split as evenly as possible (rank sizes differ by at most
    one), so every sample is used exactly once per epoch -- EXCEPT when that remainder has fewer
    than ``world_size`` samples: then some rank would get an empty batch, so those ``N %
    batch_size`` (< world_size) samples are left out of this epoch. The permutation changes every
    epoch, so no sample is systematically left out. Augmentation is drawn per position in the
    permutation, not per rank, so a sample gets the same crop and flip in a given epoch whatever
    the world size: 1-rank and 2-rank runs are comparable.

    Evaluation (``train=False``): no shuffle and no augmentation; samples in order, batches cut
    the same way, and every sample is seen exactly once across ranks. The remainder is always
    kept, split as evenly as possible, and a rank's final batch may be EMPTY (a 0-size tensor)
    when the remainder is smaller than ``world_size``, so that all ranks still yield the same
    number of batches (collectives such as ``gather_for_metrics`` need that).

    Batches are ``(images, labels)`` on ``device``: images ``dtype`` N x C x H x W, scaled to [0, 1]
    and normalised with the split's mean/std (channels_last if asked); labels int64 N.
    """

    def __init__(
        self,
        data: ImageSet,
        *,
        batch_size: int,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        train: bool = True,
        seed: int = 0,
        crop_padding: int = 0,
        flip: bool = False,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        n = len(data)
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        if batch_size % world_size:
            lower = max(world_size, batch_size // world_size * world_size)
            raise DataError(
                f"global batch size {batch_size} is not divisible by world size {world_size} "
                f"({batch_size / world_size:.2f} samples per rank); use a multiple of {world_size}, "
                f"e.g. {lower} or {lower + world_size}"
            )
        if n == 0:
            raise DataError("the data split is empty; there is nothing to iterate over")
        if train and n < world_size:
            raise DataError(f"the training split has {n} samples, fewer than the {world_size} ranks; "
                            f"use fewer processes or more data")
        if crop_padding < 0:
            raise DataError(f"crop padding must be >= 0 pixels, got {crop_padding}")
        if not dtype.is_floating_point:
            raise DataError(f"the batch dtype must be a floating type, got {dtype}")
        self.device = torch.device(device)
        self.rank, self.world_size, self.train, self.seed = rank, world_size, train, int(seed)
        self.batch_size, self.local_batch_size = batch_size, batch_size // world_size
        self.crop_padding, self.flip = int(crop_padding), bool(flip)
        self.channels_last, self.dtype = channels_last, dtype
        self.epoch = 0
        self.num_total = n
        # Moved to the device once, as uint8 (4x smaller than float32).
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self._mean = torch.tensor(data.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(data.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._spans = self._rank_spans()

    def _rank_spans(self) -> list[tuple[int, int]]:
        """[start, end) positions in the epoch order of this rank's batches (the same every epoch)."""
        n, b, w, r, per = self.num_total, self.batch_size, self.world_size, self.rank, self.local_batch_size
        full, rem = divmod(n, b)
        spans = [(k * b + r * per, k * b + (r + 1) * per) for k in range(full)]
        if rem >= w or (rem > 0 and not self.train):
            base, extra = divmod(rem, w)  # ranks < extra get one more sample
            start = full * b + r * base + min(r, extra)
            spans.append((start, start + base + (1 if r < extra else 0)))
        return spans

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration uses (same on every rank)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Batches per epoch; the same on every rank."""
        return len(self._spans)

    def num_samples(self) -> int:
        """Samples this rank sees in the current epoch."""
        return sum(end - start for start, end in self._spans)

    def _draws(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(order, flip coins, crop offsets) for the whole epoch, indexed by position; on the CPU."""
        if not self.train:
            return torch.arange(self.num_total), None, None
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_total, generator=g)
        # Drawn whether or not flip/crop are on, so turning one on does not change the other.
        flips = torch.rand(self.num_total, generator=g) < 0.5
        shifts = torch.randint(0, 2 * self.crop_padding + 1, (self.num_total, 2), generator=g)
        return order, flips, shifts

    def epoch_indices(self) -> list[torch.Tensor]:
        """Dataset indices of each batch this rank gets in the current epoch (CPU int64), for tests."""
        order = self._draws()[0]
        return [order[start:end].clone() for start, end in self._spans]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, flips, shifts = self._draws()
        order = order.to(self.device, non_blocking=True)
        augment = self.train and (self.flip or self.crop_padding > 0)
        if augment:
            flips = flips.to(self.device, non_blocking=True)
            shifts = shifts.to(self.device, non_blocking=True)
        for start, end in self._spans:
            idx = order[start:end]
            x = self.images.index_select(0, idx)
            y = self.labels.index_select(0, idx)
            if augment and self.crop_padding > 0:
                x = random_crop(x, shifts[start:end], self.crop_padding)
            if augment and self.flip:
                x = random_flip(x, flips[start:end])
            x = x.float().div_(255.0).sub_(self._mean).div_(self._std).to(self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y
