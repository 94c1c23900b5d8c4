"""Run the real trainer (under torchrun) with forward hooks on every convolution, and write
which memory format the activations and weights really had during the training step, and a
digest of the parameters this rank ends with (the ranks of one run must agree).

Usage: torchrun ... probe_channels_last.py OUT_JSON <resnet-scale train flags>
"""

import hashlib
import json
import os
import sys

import torch

import resnet_scale.train.setup as setup
import resnet_scale.train.trainer as trainer
from resnet_scale.config import add_config_arguments, config_from_args


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    seen = {"activations": [], "weights": []}
    build = setup.build_resnet  # the name set_up calls
    built = []

    def build_with_hooks(*args, **kwargs):
        model = build(*args, **kwargs)
        built.append(model)

        def hook(module, inputs, output):
            if module.training and torch.is_grad_enabled():
                seen["activations"].append(output.is_contiguous(memory_format=torch.channels_last))
                seen["weights"].append(module.weight.is_contiguous(memory_format=torch.channels_last)
                                       and not module.weight.is_contiguous() or module.weight.shape[-1] == 1)

        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_hook(hook)
        return model

    setup.build_resnet = build_with_hooks
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    trainer.train(config_from_args(parser.parse_args(argv)))
    digest = hashlib.sha256()
    for name, p in built[-1].named_parameters():
        digest.update(name.encode() + p.detach().float().contiguous().numpy().tobytes())
    seen["parameters"] = digest.hexdigest()
    with open(f"{out}.rank{os.environ.get('RANK', '0')}", "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main()
