"""``resnet-scale plan``: predict the peak GPU memory of a run and find the fastest settings that
fit a budget, before launching anything.

    resnet-scale plan --block bottleneck --depth 50 --image-size 224 --batch-size 256 \\
        --data synthetic [--max-memory 8GiB] [--world-size N] [--json]

Prints the predicted breakdown for the settings as given; with ``--max-memory``, also whether they
fit and the fastest plan that fits, as the exact flags to add to the ``resnet-scale train`` command.
``--json`` prints ``{"predicted_peak_bytes", "fits", "breakdown"}`` of the settings as given,
``"flags"`` to add, and ``"plan"`` (the plan's peak, breakdown, settings, relative step time,
notes); without a budget ``fits`` and ``plan`` are null and ``flags`` empty.

Every flag of ``train`` is accepted (a train command can be planned as it is); ``--help`` lists
only those that change the estimate (:data:`MEMORY_SETTINGS`).

Exit status: 0 -- the estimate was printed, the settings fit, or a plan that fits was found; 2 --
bad input (a flag, a size, settings that cannot work); 3 -- nothing fits the budget (the smallest
memory that would work is printed).
"""

from __future__ import annotations

import argparse
import json
import sys

from resnet_scale.cli.parser import EXIT_BAD_INPUT, standalone
from resnet_scale.config import Config, ConfigError, add_config_arguments, config_from_args

EXIT_OK, EXIT_NOTHING_FITS = 0, 3

NAME = "plan"
HELP = "predict peak GPU memory and find the fastest settings that fit --max-memory"
DESCRIPTION = ("Predict peak memory per device for the given training flags; with --max-memory, also print "
               "the fastest plan that fits, as the exact flags to add. Every train flag is accepted; only those "
               "that change memory are listed below. Exit status: 0 estimate printed, fits, or a plan was found; "
               "2 bad input; 3 nothing fits.")

#: The settings the memory estimate reads (``planner/estimate.py``, ``memory/settings.py``): the
#: flags ``plan --help`` lists. The other train flags are accepted and change nothing here.
MEMORY_SETTINGS = frozenset({
    "model.block", "model.depth", "model.layers", "model.stem",
    "data.source", "data.data_dir", "data.image_size", "data.in_memory", "data.in_memory_limit_gib",
    "data.synthetic_train_samples", "data.synthetic_test_samples", "data.synthetic_classes",
    "optim.momentum",  # SGD's momentum buffer (none with --momentum 0)
    "memory.precision", "memory.channels_last", "memory.checkpointing", "memory.micro_batch_size",
    "memory.grad_accum_steps", "memory.offload_activations", "memory.activation_compression", "memory.compile",
    "memory.low_memory",
    "memory.max_memory",
    "distributed.distributed", "distributed.zero_stage", "distributed.offload", "distributed.ds_config",
    "distributed.sync_bn",
    "train.batch_size", "train.device",
})


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The training config flags (those of :data:`MEMORY_SETTINGS` listed in the help), plus
    ``--world-size N`` and ``--json``."""
    add_config_arguments(parser, listed=MEMORY_SETTINGS.__contains__)
    group = parser.add_argument_group("plan", "The devices to plan for.")
    group.add_argument("--world-size", type=int, default=1, metavar="N",
                       help="Devices (processes) the global --batch-size is split over (default: 1).")
    group.add_argument("--json", action="store_true", help="Print the result as one JSON object.")
    return parser


def _budget_text(ns: argparse.Namespace, cfg: Config) -> str | None:
    return getattr(ns, "max_memory", None) or getattr(cfg.memory, "max_memory", None)


def _device_type(cfg: Config) -> str:
    """Plan for a GPU unless --device cpu: planning happens before launch, often elsewhere."""
    return "cpu" if cfg.train.device == "cpu" else "cuda"


def _header(cfg: Config, world: int, device_type: str, budget: int | None) -> str:
    from resnet_scale.planner import format_bytes

    from resnet_scale.models import count_weighted_layers

    layers, _ = cfg.layers()
    return (
        f"ResNet-{count_weighted_layers(cfg.model.block, layers)} ({cfg.model.block} blocks "
        f"{','.join(map(str, layers))}, {cfg.stem()} stem), "
        f"{cfg.image_size()} px, global batch {cfg.train.batch_size} over {world} {device_type} device(s)"
        + (f"; budget {format_bytes(budget)} per device" if budget is not None else "")
    )


def run(ns: argparse.Namespace) -> int:
    """Print the breakdown and the plan; return the exit status (module docstring)."""
    from resnet_scale.data import DataError
    from resnet_scale.planner import estimate_memory, format_bytes, parse_bytes
    from resnet_scale.planner import plan_memory

    try:
        cfg = config_from_args(ns).validate()
        text = _budget_text(ns, cfg)
        budget = parse_bytes(text) if text else None
        if text and budget is None:
            raise ConfigError(f"--max-memory {text!r}: give a size, e.g. 8GiB.")
        world = ns.world_size
        if world < 1:
            raise ConfigError(f"--world-size {world} must be at least 1.")
        device_type = _device_type(cfg)
        if budget is None:
            estimate = estimate_memory(cfg, world_size=world, device_type=device_type)
        else:
            plan = plan_memory(cfg, budget, world_size=world, device_type=device_type)
    except (ConfigError, DataError) as err:
        print(f"resnet-scale plan: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if budget is None:
        _print_estimate(cfg, world, device_type, estimate, as_json=ns.json)
        return EXIT_OK

    given = plan.given
    if ns.json:
        print(json.dumps({
            "predicted_peak_bytes": given.total,
            "fits": given.total <= budget,
            "budget_bytes": budget,
            "world_size": world,
            "breakdown": given.breakdown(),
            "settings": given.settings,
            "flags": plan.flags,
            "plan": plan.as_dict(),
        }, indent=2))
    else:
        print(f"resnet-scale plan: {_header(cfg, world, device_type, budget)}")
        print()
        print(f"settings as given: {plan.given_description}")
        print(given.format_table(budget))
        print()
        if plan.fits:
            speed = f"predicted step time {plan.predicted_relative_time:.2f}x that of the settings as given"
            if not plan.flags:
                print(f"fastest plan that fits: the settings as given ({speed}).")
            else:
                print(f"fastest plan that fits: {plan.describe()}")
                print(f"  predicted peak {format_bytes(plan.predicted_peak_bytes)}, {speed}")
                print(f"  add: {' '.join(plan.flags)}")
                print(plan.estimate.format_table(budget))
        else:
            print(f"nothing fits in {format_bytes(budget)} per device: the smallest plan needs "
                  f"{format_bytes(plan.smallest_budget_bytes)} ({plan.smallest_budget_bytes} bytes):")
            print(f"  {plan.describe()}")
            if plan.flags:
                print(f"  flags: {' '.join(plan.flags)}")
            print(f"  give --max-memory {_round_up_gib(plan.smallest_budget_bytes)} or more, or lower --batch-size / "
                  f"--image-size, or spread the batch over more devices (--world-size).")
        if plan.notes:
            print()
            print("notes:")
            for note in plan.notes:
                print(f"  - {note}")
    if not plan.fits:
        if ns.json:
            print(f"resnet-scale plan: nothing fits in {format_bytes(budget)}; the smallest plan needs "
                  f"{format_bytes(plan.smallest_budget_bytes)}", file=sys.stderr)
        return EXIT_NOTHING_FITS
    return EXIT_OK


def _print_estimate(cfg: Config, world: int, device_type: str, estimate, *, as_json: bool) -> None:
    """The settings as given, without a budget: their breakdown and notes."""
    if as_json:
        print(json.dumps({
            "predicted_peak_bytes": estimate.total, "fits": None, "budget_bytes": None, "world_size": world,
            "breakdown": estimate.breakdown(), "settings": estimate.settings, "flags": [], "plan": None,
            "notes": list(estimate.notes),
        }, indent=2))
        return
    from resnet_scale.planner.search import _describe

    print(f"resnet-scale plan: {_header(cfg, world, device_type, None)}")
    print()
    print(f"settings as given: {_describe(estimate.settings)}")
    print(estimate.format_table())
    print()
    print("(give --max-memory SIZE to check a budget and find the fastest settings that fit it)")
    if estimate.notes:
        print()
        print("notes:")
        for note in estimate.notes:
            print(f"  - {note}")


def _round_up_gib(n: int) -> str:
    """A --max-memory value at or above ``n`` bytes, in tenths of a GiB."""
    tenths = -(-n * 10 // 2**30)
    return f"{tenths / 10:.1f}GiB"


def main(argv: list[str] | None = None) -> int:
    """``resnet-scale plan`` without the subcommand word (``python -m resnet_scale.cli.plan``)."""
    return standalone(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
