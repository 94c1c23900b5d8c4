"""resnet_scale: train ResNets on CIFAR-10 and data like it, and make them fit and go fast.

Data flows one way: config -> model -> memory transforms -> accelerator -> trainer loop ->
trackers -> report (see DESIGN.md). ``import resnet_scale`` needs only torch, torchvision and
accelerate; every optional dependency is imported where it is used.
"""

__version__ = "0.1.0"
