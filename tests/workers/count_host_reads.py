"""Run ``train()`` on every rank, counting the host's device reads (tests/test_host_syncs.py), and
write each rank's totals to ``OUT.RANK``.

Usage: torchrun ... count_host_reads.py OUT <resnet-scale train flags>

One ``train()`` per launch: a second ``train()`` in the same 2-rank processes would need a second
process group on torchrun's store, and is refused (``resnet_scale/train/process_state.py``).
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from test_host_syncs import HostReads  # noqa: E402

from resnet_scale.config import add_config_arguments, config_from_args  # noqa: E402
from resnet_scale.train import train  # noqa: E402


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    cfg = config_from_args(parser.parse_args(argv)).validate()
    with HostReads() as reads:
        train(cfg)
    totals = {"total": reads.total(), "detail": dict(reads.counts)}
    Path(f"{out}.{os.environ['RANK']}").write_text(json.dumps(totals))


if __name__ == "__main__":
    main()
