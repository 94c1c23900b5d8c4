"""Run ``train()`` on every rank for 20 and then 40 steps, counting the host's device reads
(tests/test_host_syncs.py), and write each rank's totals to ``OUT.RANK``.

Usage: torchrun ... count_host_reads.py OUT <resnet-scale train flags without --max-steps/--run-name>
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accelerate.state import AcceleratorState  # noqa: E402
from test_host_syncs import HostReads  # noqa: E402

from resnet_scale.config import add_config_arguments, config_from_args  # noqa: E402
from resnet_scale.train import train  # noqa: E402


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    totals = {}
    for steps in (20, 40):
        parser = argparse.ArgumentParser()
        add_config_arguments(parser)
        name = next(argv[i + 1] for i, a in enumerate(argv) if a == "--run-name")
        args = [a if a != name else f"{name}-{steps}" for a in argv]
        cfg = config_from_args(parser.parse_args([*args, "--max-steps", str(steps)])).validate()
        AcceleratorState._reset_state(True)
        with HostReads() as reads:
            train(cfg)
        totals[str(steps)] = reads.total()
        totals[f"{steps}_detail"] = dict(reads.counts)
    Path(f"{out}.{os.environ['RANK']}").write_text(json.dumps(totals))


if __name__ == "__main__":
    main()
