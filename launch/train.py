"""Thin entry point with the flags of ``resnet-scale train``, for launchers that want a script:

    accelerate launch launch/train.py --block bottleneck --depth 50 --data cifar10
    torchrun --nproc-per-node 2 launch/train.py --data digits
"""

import sys

from resnet_scale.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
