"""What the loop measures: the metric window between log lines, sums over ranks, the test-split
evaluation, and BatchNorm statistics made equal on every rank before they are used or saved."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator



@dataclass
class Window:
    """Sums over the steps since the last log line, kept on the device (no sync per step)."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    count: torch.Tensor
    started: float = 0.0

    @classmethod
    def new(cls, device: torch.device) -> "Window":
        zero = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        return cls(zero(), zero(), zero(), time.perf_counter())

    def snapshot(self, accelerator: Accelerator | None = None) -> dict[str, float]:
        """The window for a checkpoint: its sums over every rank (a collective with several processes:
        every rank calls it), so the one ``loop_state.json`` holds the whole interval's sums."""
        sums = [self.loss_sum, self.correct, self.count]
        loss_sum, correct, count = (reduce_sums(accelerator, *sums) if accelerator is not None
                                    else [float(v) for v in sums])
        return {"loss_sum": loss_sum, "correct": correct, "count": count,
                "elapsed": time.perf_counter() - self.started}

    def restore(self, saved: dict[str, float], *, sums: bool = True) -> None:
        """Continue a saved window; ``sums=False`` (every rank but the main one) starts the sums at zero,
        so the next line's sum over ranks counts the saved interval once."""
        self.loss_sum.fill_(saved["loss_sum"] if sums else 0.0)
        self.correct.fill_(saved["correct"] if sums else 0.0)
        self.count.fill_(saved["count"] if sums else 0.0)
        self.started = time.perf_counter() - saved["elapsed"]

    def add(self, loss_sum: torch.Tensor, correct: torch.Tensor, count: int) -> None:
        self.loss_sum += loss_sum
        self.correct += correct
        self.count += count


def peak_memory_bytes(device: torch.device) -> int | None:
    """The most memory this process's tensors held on a GPU so far (None off a GPU)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reduce_sums(accelerator: Accelerator, *values: torch.Tensor, local: torch.Tensor | None = None) -> list[float]:
    """Sum scalars over all ranks (one collective) and return them as Python floats, in one host read;
    ``local``: a scalar of this rank read with them (not summed), last in the list."""
    stacked = torch.stack([v.double() for v in values])
    if accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked, reduction="sum")
    if local is not None:
        stacked = torch.cat([stacked, local.detach().reshape(1).double().to(stacked.device)])
    return stacked.tolist()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable, accelerator: Accelerator) -> dict[str, float]:
    """Loss and accuracy over the whole test split (batches of images and labels), each sample
    counted exactly once over all ranks: the loader shards the split without padding, and per-rank
    sums are reduced.

    A ``torch.compile``d model is evaluated eagerly (``force_eager``): its compiled graph is the
    training-mode one of the training batch shape, and evaluation mode and the split's short last
    batch would each compile another (static) graph, costing more compile time than an eager
    forward pass over the test split costs."""
    model.eval()
    device = accelerator.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    with torch.compiler.set_stance("force_eager"):
        for images, labels in loader:
            if labels.numel() == 0:  # an empty tail shard on this rank keeps the batch count equal
                continue
            logits = model(images)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
            correct += (logits.argmax(1) == labels).sum()
            count += labels.numel()
    model.train()
    total_loss, total_correct, total = reduce_sums(accelerator, loss_sum, correct, count)
    return {"loss": total_loss / total, "accuracy": total_correct / total, "samples": int(total)}


def broadcast_buffers(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """Give every rank rank 0's BatchNorm running statistics. DDP broadcasts buffers before each
    forward; DeepSpeed does not, so its ranks drift apart. Done before every evaluation and
    checkpoint, so evaluation uses the statistics that are saved and exported (rank 0's) and a
    resumed run evaluates exactly as an uninterrupted one."""
    import torch.distributed as dist

    for buffer in accelerator.unwrap_model(model).buffers():
        dist.broadcast(buffer, src=0)
