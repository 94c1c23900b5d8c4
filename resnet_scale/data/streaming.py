"""StreamingLoader: an image folder too big to hold, decoded per batch by DataLoader worker processes.

The same loader as :class:`~resnet_scale.data.loader.DeviceLoader` from the trainer's side -- the same
constructor arguments, sharding rule, per-epoch permutation and per-sample crop/flip draws (all from
:mod:`.sharding`), the same methods -- so for the same images, seed and epoch both yield the same
batches. Only where the uint8 pixels come from differs: instead of an ``index_select`` on a split held
on the device, a ``torch.utils.data.DataLoader`` whose batch sampler hands each step's index list
(this rank's slice of the global batch) to worker processes, which read each file with PIL and resize
it exactly as the in-memory path does (shorter side, then center crop) into uint8 C x H x W. The batch
is moved to the device (from pinned memory on CUDA) and cropped, flipped and normalised there, batched,
by the very function DeviceLoader uses.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .imagefolder import ImageFolderIndex, _load_image
from .imageset import DataError, check_host_memory
from .sharding import LoaderBase, epoch_draws, rank_spans


class FolderDataset(Dataset):
    """Sample i of an :class:`ImageFolderIndex`: (uint8 3 x S x S tensor, int label), decoded on access.

    The paths are held as one numpy array of bytes rather than a list of str: forked workers then
    share its pages instead of copying them as Python reference counts are touched (ImageNet: 1.3M
    paths).
    """

    def __init__(self, index: ImageFolderIndex) -> None:
        self._paths = np.array([os.fsencode(f) for f in index.files], dtype=np.bytes_)
        self._labels = np.asarray(index.labels, dtype=np.int64)
        self.image_size = int(index.image_size)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        hwc = _load_image(os.fsdecode(self._paths[i]), self.image_size)
        return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1))), int(self._labels[i])


class _Collate:
    """default_collate, except that an empty index list (a rank's empty last eval batch) gives
    0 x 3 x S x S uint8 images and 0 int64 labels. A class, not a closure, so workers can unpickle it."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        if not samples:
            s = self.image_size
            return torch.empty((0, 3, s, s), dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
        return tuple(default_collate(samples))  # type: ignore[return-value]


class RankBatchSampler(Sampler[list[int]]):
    """Yields, step by step, the dataset indices of this rank's batch in the current epoch.

    The order is :func:`~resnet_scale.data.sharding.epoch_draws`' permutation cut by
    :func:`~resnet_scale.data.sharding.rank_spans` -- DeviceLoader's rule. Call :meth:`set_epoch`
    before iterating; the draws of the epoch (order, flip coins, crop offsets) are computed once and
    kept, so the loader applies the augmentation drawn with the order the workers were given.
    """

    def __init__(self, n: int, *, batch_size: int, world_size: int, rank: int, train: bool, seed: int,
                 crop_padding: int, drop_last: bool = False) -> None:
        self.n, self.train, self.seed, self.crop_padding = n, train, int(seed), int(crop_padding)
        self.spans = rank_spans(n, batch_size, world_size, rank, train, drop_last)
        self.epoch = 0
        self._cached: tuple[int, tuple] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def draws(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(order, flips, shifts) of the current epoch, on the CPU; computed once per epoch."""
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, epoch_draws(self.n, self.seed, self.epoch, self.train, self.crop_padding))
        return self._cached[1]

    def __iter__(self) -> Iterator[list[int]]:
        order = self.draws()[0]
        for start, end in self.spans:
            yield order[start:end].tolist()

    def __len__(self) -> int:
        return len(self.spans)


class StreamingLoader(LoaderBase):
    """Iterate over one image-folder split read from disk, sharded across ``world_size`` ranks.

    Arguments, rules and batches are those of :class:`~resnet_scale.data.loader.DeviceLoader`
    (``batch_size`` is the GLOBAL batch; call :meth:`set_epoch` before each epoch; see its docstring
    for the sharding, the left-out training remainder, ``drop_last`` and empty eval batches), with ``index`` (an
    :class:`ImageFolderIndex` from :func:`~resnet_scale.data.imagefolder.index_imagefolder`) in place
    of an ImageSet, and ``num_workers`` decoding processes (0: decode in this process). Workers persist
    across epochs; each prefetches two batches. Batches are pinned when ``device`` is CUDA.
    """

    def __init__(
        self,
        index: ImageFolderIndex,
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
        num_workers: int = 2,
        drop_last: bool = False,
    ) -> None:
        n = len(index)
        self._configure(n, index.mean, index.std, batch_size=batch_size, device=device, rank=rank,
                        world_size=world_size, train=train, seed=seed, crop_padding=crop_padding, flip=flip,
                        channels_last=channels_last, dtype=dtype, drop_last=drop_last)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise DataError(f"num_workers must be an int >= 0 (0: decode in the training process), "
                            f"got {num_workers!r}")
        self.num_workers = num_workers
        # One batch as uint8 and as ``dtype``, and the uint8 batches the workers prefetch (two each).
        side = int(index.image_size)
        per_image = 3 * side * side
        check_host_memory(self.local_batch_size * per_image * (1 + dtype.itemsize + 2 * num_workers),
                          f"a batch of {self.local_batch_size:,} images at {side}x{side} px (with "
                          f"{num_workers} workers prefetching)", "use a smaller --image-size or --batch-size")
        self.sampler = RankBatchSampler(n, batch_size=batch_size, world_size=world_size, rank=rank,
                                        train=train, seed=self.seed, crop_padding=self.crop_padding,
                                        drop_last=self.drop_last)
        self._spans = self.sampler.spans
        self._loader = DataLoader(
            FolderDataset(index),
            batch_sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=_Collate(int(index.image_size)),
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
        )

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration uses (same on every rank)."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        """Batches per epoch; the same on every rank."""
        return len(self._spans)

    def num_samples(self) -> int:
        """Samples this rank sees in the current epoch."""
        return sum(end - start for start, end in self._spans)

    def epoch_indices(self) -> list[torch.Tensor]:
        """Dataset indices of each batch this rank gets in the current epoch (CPU int64), for tests."""
        order = self.sampler.draws()[0]
        return [order[start:end].clone() for start, end in self._spans]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        _, flips, shifts = self.sampler.draws()  # the draws the sampler's order came from
        augment = self.train and (self.flip or self.crop_padding > 0)
        if augment:
            flips = flips.to(self.device, non_blocking=True)
            shifts = shifts.to(self.device, non_blocking=True)
        # iter() runs the batch sampler for this epoch (persistent workers are reset, not restarted).
        try:
            for (start, end), (x, y) in zip(self._spans, self._loader, strict=True):
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                x = self._augment(x, shifts, flips, start, end, augment)
                yield x, y
        except DataError as err:  # e.g. an unreadable image, found by a worker
            clean = _worker_error(err)
            if clean is err:
                raise
            raise clean from None


def _worker_error(err: DataError) -> DataError:
    """A DataError raised in a DataLoader worker comes back as "Caught DataError in DataLoader worker
    process N. Original Traceback ..." with the whole traceback in its message; the user gets the
    original one-line message (which names the file and what to do) instead."""
    text, marker = str(err), "DataError: "
    if not text.startswith("Caught DataError") or marker not in text:
        return err
    return DataError(text.rsplit(marker, 1)[1].strip())
