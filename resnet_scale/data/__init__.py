"""Data: sources (CIFAR-10/100, digits, synthetic, image folders) and the loaders.

``build_datasets(source, ...)`` gives a (train, test) pair of in-memory uint8 :class:`ImageSet`;
:class:`DeviceLoader` holds one split on the device and yields sharded, augmented, normalised
batches. An image folder too big to hold goes the streaming way instead: ``index_imagefolder``
lists its files into two :class:`ImageFolderIndex`, and :class:`StreamingLoader` decodes them in
DataLoader workers and yields the very batches a DeviceLoader would. ``estimate_imagefolder_bytes``
says how much the in-memory way would hold, so the caller can choose. Every user-facing data problem
raises :class:`DataError` (a ``ValueError``). Importing this package needs only torch, torchvision
and numpy; datasets, pyarrow, scikit-learn and PIL are imported inside the functions that use them.
"""

from .imagefolder import ImageFolderIndex, estimate_imagefolder_bytes, index_imagefolder
from .imageset import DataError, ImageSet
from .loader import DeviceLoader
from .sources import SOURCES, build_datasets, native_image_size
from .streaming import StreamingLoader

__all__ = [
    "SOURCES",
    "DataError",
    "DeviceLoader",
    "ImageFolderIndex",
    "ImageSet",
    "StreamingLoader",
    "build_datasets",
    "estimate_imagefolder_bytes",
    "index_imagefolder",
    "native_image_size",
]
