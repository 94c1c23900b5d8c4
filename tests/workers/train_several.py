"""Several ``train()`` calls in each process of one launch (tests/test_train_repeat.py); each rank
writes what it saw to ``OUT.RANK`` (JSON).

Usage: fork_launch.py N --script train_several.py OUT MODE <resnet-scale train flags>

MODE ``ended``: a ``train()`` that starts the process group (and ends it), then a second ``train()``,
which must be refused (a second group on the launcher's store would hang).
MODE ``own-group``: the script starts the group; fp32, then ZeRO-2, then fp32 again all use it.
MODE ``alone``: ZeRO-2 twice, then fp32 (a world of one: each ZeRO run starts and ends its own group).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from resnet_scale.config import ConfigError, add_config_arguments, config_from_args
from resnet_scale.train import train


def main() -> None:
    out, mode, flags = sys.argv[1], sys.argv[2], sys.argv[3:]

    def config(name: str, *extra: str):
        parser = argparse.ArgumentParser()
        add_config_arguments(parser)
        return config_from_args(parser.parse_args([*flags, "--run-name", name, *extra])).validate()

    seen: dict = {"runs": []}
    if mode == "ended":
        train(config("fresh"))
        seen["runs"].append("fresh")
        try:
            train(config("again", "--precision", "bf16"))
            seen["second"] = "trained"
        except ConfigError as err:
            seen["second"] = str(err)
    elif mode == "own-group":
        dist.init_process_group("gloo")
        for name, extra in (("a", ()), ("zero", ("--zero-stage", "2")), ("b", ())):
            train(config(name, *extra))
            seen["runs"].append(name)
            seen.setdefault("group_open", []).append(dist.is_initialized())
        dist.destroy_process_group()
    elif mode == "alone":
        for name, extra in (("zero1", ("--zero-stage", "2")), ("zero2", ("--zero-stage", "2")), ("a", ())):
            train(config(name, *extra))
            seen["runs"].append(name)
            seen.setdefault("group_open", []).append(dist.is_initialized())
    seen["accelerate_env"] = {k: os.environ.get(k) for k in ("ACCELERATE_USE_DEEPSPEED", "DS_ACCELERATOR")}
    Path(f"{out}.{os.environ['RANK']}").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
