"""Shared fixtures."""

import os

import pytest
import torch

# Runs started by tests track nothing unless a test asks for W&B itself (the default tracker is
# wandb, which would add a wandb/ folder to every run and cost seconds per run).
os.environ.setdefault("WANDB_MODE", "disabled")

# One intra-op thread in the test processes and in every process they start (inherited through the
# environment): the xdist workers run side by side on CI's 2 cores, and two OpenMP threads per process
# would oversubscribe them (spinning threads slow a loaded machine several-fold). Runs compared with
# each other therefore always use the same thread count, so their float sums agree.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny CPU tensors: one intra-op thread is faster, and immune to oversubscribed CI cores.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core, at most 4 (each test may start several processes)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory):
    """The reference 2-rank DDP run on gloo (tests/test_distributed.py's BASE flags, --distributed ddp),
    made once per session (per xdist worker that needs it): the ZeRO, sync-BN and OOM-recovery tests
    compare against it."""
    from test_distributed import train_run

    return train_run(tmp_path_factory.mktemp("ddp"), "ddp", "--distributed", "ddp")


@pytest.fixture(scope="session")
def straight_ddp_run(tmp_path_factory):
    """tests/test_resume.py's ARGS and DDP flags as one uninterrupted 2-rank DDP run, made once per
    session (per xdist worker that needs it): the runs that are SIGTERMed, or lose a worker to SIGKILL,
    and then resume must end exactly like it. Returns the run folder."""
    from test_distributed import ranks
    from test_resume import ARGS, DDP
    from test_train_e2e import run_cli

    out_dir = tmp_path_factory.mktemp("straight-ddp")
    out = run_cli(*ARGS, *DDP, "--output-dir", out_dir, "--run-name", "straight", launcher=ranks(2))
    assert out.returncode == 0, out.stderr[-3000:]
    return out_dir / "straight"
