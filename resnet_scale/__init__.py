"""resnet_scale: train ResNets on CIFAR-10 and data like it, and make them fit and go fast.

Data flows one way: config -> data -> model -> memory transforms -> accelerator -> training loop
-> run files -> trackers -> report (docs/architecture.md). ``import resnet_scale`` needs only
torch, torchvision and accelerate; every optional dependency is imported where it is used.
"""

from resnet_scale._version import __version__

__all__ = ["__version__"]
