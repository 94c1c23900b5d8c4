"""DeviceLoader: a whole split resident on the device, sharded across ranks, augmented in batches there.

After KellerJordan/cifar10-airbench: the uint8 images are moved to the device once, each batch is
an ``index_select``, and crop/flip run on the whole batch at once. No worker processes, no per-sample
Python in the iteration path. The sharding rule, the per-epoch draws and the batched augmentation live
in :mod:`.sharding`, shared with :class:`~resnet_scale.data.streaming.StreamingLoader`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .imageset import DataError, ImageSet, check_device_memory  # noqa: F401  (DataError stays importable from here)
from .sharding import (  # noqa: F401  (epoch_seed, random_crop, random_flip: re-exported from here)
    LoaderBase,
    epoch_draws,
    epoch_seed,
    random_crop,
    random_flip,
    rank_spans,
)


class DeviceLoader(LoaderBase):
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

    ``drop_last=True`` (training only; what ``--compile`` uses): every batch is a full one, so a
    compiled model sees one static shape. The last ``N % batch_size`` positions of each epoch's
    permutation are left out of that epoch -- different samples every epoch, as the permutation is
    drawn anew -- and each epoch has ``N // batch_size`` batches. Every other sample is used exactly
    once per epoch.

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
        drop_last: bool = False,
    ) -> None:
        check_device_memory(data.images.nbytes + data.labels.nbytes, torch.device(device),
                            f"the {'train' if train else 'test'} split ({len(data):,} images)",
                            "use a smaller --image-size, or --in-memory no to stream an image folder")
        self._configure(len(data), data.mean, data.std, batch_size=batch_size, device=device, rank=rank,
                        world_size=world_size, train=train, seed=seed, crop_padding=crop_padding, flip=flip,
                        channels_last=channels_last, dtype=dtype, drop_last=drop_last)
        self.epoch = 0
        # Moved to the device once, as uint8 (4x smaller than float32).
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self._spans = self._rank_spans()

    def _rank_spans(self) -> list[tuple[int, int]]:
        """[start, end) positions in the epoch order of this rank's batches (the same every epoch)."""
        return rank_spans(self.num_total, self.batch_size, self.world_size, self.rank, self.train, self.drop_last)

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
        return epoch_draws(self.num_total, self.seed, self.epoch, self.train, self.crop_padding)

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
            x = self._augment(x, shifts, flips, start, end, augment)
            yield x, y
