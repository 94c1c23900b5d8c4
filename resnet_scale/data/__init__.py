"""Data: sources (CIFAR-10/100, digits, synthetic, image folders) and the device-resident loader.

``build_datasets(source, ...)`` gives a (train, test) pair of in-memory uint8 :class:`ImageSet`;
:class:`DeviceLoader` holds one split on the device and yields sharded, augmented, normalised
batches. Every user-facing data problem raises :class:`DataError` (a ``ValueError``). Importing
this package needs only torch, torchvision and numpy; datasets, pyarrow, scikit-learn and PIL are
imported inside the functions that use them.
"""

from .imageset import DataError, ImageSet
from .loader import DeviceLoader
from .sources import SOURCES, build_datasets, native_image_size

__all__ = ["SOURCES", "DataError", "DeviceLoader", "ImageSet", "build_datasets", "native_image_size"]
