"""Two ranks over gloo each choose the checkpoint to resume from, as every process of a run does:
``python resume_choice.py PORT RESUME RUN [RUN...]``. The ranks are forked after the imports; each
prints ``rank R: PATH`` or ``rank R: refused: MESSAGE`` per run, and warnings go to stderr."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from resnet_scale.config import ConfigError
from resnet_scale.train.checkpoint import resolve_resume


def rank(r: int, port: int, resume: str, runs: list[str]) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=2)
    for run in runs:
        try:
            said = str(resolve_resume(resume, Path(run)))
        except ConfigError as err:
            said = f"refused: {err}"
        os.write(1, f"rank {r}: {said}\n".encode())  # one write: the ranks' lines never interleave
    dist.destroy_process_group()


if __name__ == "__main__":
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING)
    mp.start_processes(rank, args=(int(sys.argv[1]), sys.argv[2], sys.argv[3:]), nprocs=2, start_method="fork")
