"""``torchrun --standalone --nproc-per-node N launch/train.py ARGS``, with the workers forked from
the agent after the imports: ``python fork_launch.py N ARGS``; ``python fork_launch.py N --script
PATH ARGS`` runs the Python file PATH in each worker instead of launch/train.py (as
``torchrun ... PATH ARGS`` would).

The agent is torchrun's own (``elastic_launch``: c10d rendezvous on localhost, one store, the
same environment per worker: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, TORCHELASTIC_*), and
each worker is its own process that trains over gloo; only the start differs: torchrun starts a new
interpreter per worker, which spends seconds importing torch, the package and DeepSpeed, and the
tests start dozens of them. Tests whose subject is the launcher itself use real torchrun.
"""

from __future__ import annotations

import os
import sys
import uuid

# The package of the repository these tests belong to, whatever ``pip install -e`` points at (the tests'
# ``python -m resnet_scale`` runs from the repository's root and imports it from there too).
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def worker(argv: list[str], script: str | None = None) -> None:
    import torch

    from resnet_scale.cli.train import main

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # as a new interpreter would read it
    if script is not None:
        import runpy

        sys.argv = [script, *argv]
        sys.path[0] = os.path.dirname(os.path.abspath(script))  # as ``python PATH`` has it
        runpy.run_path(script, run_name="__main__")
        sys.stdout.flush(), sys.stderr.flush()
        return
    sys.argv = ["launch/train.py", *argv]
    code = main(argv)
    sys.stdout.flush(), sys.stderr.flush()
    if code:
        raise SystemExit(code)


def launch(nproc: int, argv: list[str], script: str | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # What every worker imports, once, before the fork (DeepSpeed and the transformers that
    # Accelerate's DeepSpeed plugin needs only when the run asks for ZeRO: tests/_cli_server.py).
    import accelerate  # noqa: F401

    import resnet_scale.cli.train  # noqa: F401
    import resnet_scale.train  # noqa: F401

    sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from _cli_server import preload_lazy_imports

    preload_lazy_imports(deepspeed=bool({"--zero-stage", "--ds-config", "deepspeed", "--distributed=deepspeed"} & set(argv)))

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", run_id=str(uuid.uuid4()), max_restarts=0,
                          monitor_interval=0.1, start_method="fork")
    try:
        elastic_launch(config, worker)(argv, script)
    except ChildFailedError as err:
        print(f"fork_launch: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    args = sys.argv[2:]
    script = None
    if args[:1] == ["--script"]:
        script, args = args[1], args[2:]
    sys.exit(launch(int(sys.argv[1]), args, script))
