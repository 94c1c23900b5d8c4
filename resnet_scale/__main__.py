import sys

from resnet_scale.cli import main

sys.exit(main())
