"""The training loop reads nothing from the device in a step that does not log, save or stop.

Every read of a device value by the host (``bool``/``float``/``.item()`` of a tensor, ``.tolist()``)
makes the CPU wait until the device has finished everything queued before it; one per step drains
the GPU's queue every step. The read goes through torch's dispatcher as ``aten._local_scalar_dense``
(``aten.is_nonzero`` / ``aten.item`` on the way); ``.tolist()`` does not, so it is counted by
wrapping it. Counting them over a real ``train()`` of 20 and of 40 steps (one log line per 20
steps), the difference per step is what each further step costs: at most 0.1, the log line's share.
On a CPU nothing waits, but the reads are the same calls a GPU run makes.

fp16 is not measured: it needs a CUDA GPU (the package refuses it on a CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from torch.utils._python_dispatch import TorchDispatchMode

from resnet_scale.config import add_config_arguments, config_from_args

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import ranks  # noqa: E402
from test_train_e2e import run_cli  # noqa: E402

READS = {"aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.item.default"}

# 160 images at batch 4: 40 steps in one epoch, so both runs evaluate once (at their last step) and
# differ only in the steps they train and the one log line every 20 steps.
FLAGS = ["--data", "synthetic", "--synthetic-train-samples", "160", "--synthetic-test-samples", "8",
         "--layers", "1,1,1", "--image-size", "8", "--batch-size", "4", "--epochs", "1", "--log-every", "20",
         "--tracker", "none", "--lr", "0.05"]


class HostReads(TorchDispatchMode):
    """Counts the device reads of the host (see the module's docstring) while it is active."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in READS:
            self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counts, tolist = self.counts, self._tolist

        def counted(tensor):
            counts["Tensor.tolist"] += 1
            return tolist(tensor)

        torch.Tensor.tolist = counted
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def total(self) -> int:
        # is_nonzero and item call _local_scalar_dense: one read is counted once
        return self.counts["aten._local_scalar_dense.default"] + self.counts["Tensor.tolist"]


def _reads(tmp_path: Path, steps: int, precision: str) -> HostReads:
    from resnet_scale.train import train

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    argv = [*FLAGS, "--max-steps", str(steps), "--precision", precision, "--output-dir", str(tmp_path),
            "--run-name", f"{precision}-{steps}"]
    cfg = config_from_args(parser.parse_args(argv)).validate()
    AcceleratorState._reset_state(True)
    with HostReads() as reads:
        train(cfg)
    return reads


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_step_that_does_not_log_reads_nothing_from_the_device(tmp_path, precision):
    short, long = _reads(tmp_path, 20, precision), _reads(tmp_path, 40, precision)
    per_step = (long.total() - short.total()) / 20
    assert per_step <= 0.1, (f"{per_step} host reads per step ({precision}): 20 steps {dict(short.counts)}, "
                             f"40 steps {dict(long.counts)}")


PROBE = Path(__file__).parent / "workers" / "count_host_reads.py"


@pytest.mark.multiprocess
def test_two_ranks_read_nothing_from_the_device_in_a_step_that_does_not_log(tmp_path):
    """Two ranks (gloo, DDP): the flags every rank decides on travel in one all-reduce per read point."""
    counts = {}
    for steps in (20, 40):  # one launch each (see the worker)
        out = tmp_path / f"reads-{steps}.json"
        done = run_cli(str(out), *FLAGS, "--batch-size", "2", "--max-steps", steps, "--output-dir", tmp_path,
                       "--run-name", f"ddp-{steps}", launcher=ranks(2, PROBE), timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        counts[steps] = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    for rank in (0, 1):
        per_step = (counts[40][rank]["total"] - counts[20][rank]["total"]) / 20
        assert per_step <= 0.1, f"rank {rank}: {per_step} host reads per step: {counts[20][rank]} {counts[40][rank]}"


def test_a_nonfinite_step_is_withheld_on_the_device_bit_for_bit():
    """bf16/fp32: a step whose gradient norm is not finite leaves the weights, the SGD momentum and
    the BatchNorm statistics bit-identical, decided on the device (the fused SGD's ``found_inf``);
    even as the very first step (the fused kernel would otherwise leave uninitialised momentum behind),
    after which a finite step updates exactly as a first step does."""
    from accelerate import Accelerator

    from resnet_scale.config import OptimConfig
    from resnet_scale.train.optim import build_optimizer
    from resnet_scale.train.step import BufferSnapshot, train_step

    AcceleratorState._reset_state(True)
    acc = Accelerator(cpu=True)

    def setup():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                  torch.nn.Linear(4 * 6 * 6, 10))
        opt = build_optimizer(net, OptimConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4))
        return acc.prepare(net, opt)

    def state(net, opt):
        inner = opt.optimizer
        return ([t.detach().clone() for t in [*net.parameters(), *net.buffers()]],
                [inner.state[p]["momentum_buffer"].clone() for p in net.parameters() if p in inner.state])

    images, labels = torch.randn(8, 3, 8, 8), torch.arange(8) % 10
    poisoned = images.clone()
    poisoned[0, 0, 0, 0] = float("inf")
    net, opt = setup()
    snapshot = BufferSnapshot(net)
    before = state(net, opt)
    bad = train_step(acc, net, opt, poisoned, labels, buffers=snapshot)
    after = state(net, opt)
    assert float(bad.nonfinite) == 1 and float(bad.withheld) == 1
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])), "weights or BN statistics changed"
    assert all(not m.any() for m in after[1]), "momentum of a withheld first step is not zero"
    finite = train_step(acc, net, opt, images, labels, buffers=snapshot)  # the first real update
    ref_net, ref_opt = setup()
    train_step(acc, ref_net, ref_opt, images, labels, buffers=BufferSnapshot(ref_net))
    assert float(finite.withheld) == 0
    mid = state(net, opt)
    assert all(torch.equal(a, b) for a, b in zip(mid[0], state(ref_net, ref_opt)[0]))
    train_step(acc, net, opt, poisoned, labels, buffers=snapshot)  # withheld again, with momentum in use
    weights, momentum = state(net, opt)
    assert all(torch.equal(a, b) for a, b in zip(mid[0] + mid[1], weights + momentum))
