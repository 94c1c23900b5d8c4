"""Shared fixtures."""

import os

import pytest
import torch

# Runs started by tests track nothing unless a test asks for W&B itself (the default tracker is
# wandb, which would add a wandb/ folder to every run and cost seconds per run).
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny CPU tensors: one intra-op thread is faster, and immune to oversubscribed CI cores.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
