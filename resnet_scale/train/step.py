"""One optimizer step over a device's batch, as micro-batches accumulated through
``accelerator.accumulate`` (gradient accumulation the framework knows about: DDP syncs only on
the last micro-batch, DeepSpeed uses its own accumulation, no double scaling).

Loss scaling: each micro-batch's loss is its *sum* over images divided by the images of the
whole per-device batch, times the accumulation steps (``accelerator.backward`` divides by them
again). The accumulated gradient therefore equals the full batch's mean-loss gradient exactly,
also for a short last batch split unevenly. What differs from one big batch is BatchNorm: in
training mode it normalises each micro-batch with that micro-batch's own statistics
(Ioffe & Szegedy 2015), so very small micro-batches make those statistics noisy.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # sum of per-image losses over this device's batch (float64, on device)
    correct: torch.Tensor  # correctly classified images (on device)
    count: int  # images in this device's batch
    stepped: bool  # False when fp16 loss scaling skipped the update (inf/nan gradients)
    grad_norm: torch.Tensor | None = None  # total gradient norm before clipping (None under DeepSpeed)
    finite: bool = True  # False: the gradient norm was not finite and the update was withheld


class BufferSnapshot:
    """The model's buffers (BatchNorm running statistics) as they were before a step, put back
    when the step's update is withheld: the forward pass of a non-finite step has already folded
    NaN/inf into the running statistics. One fused copy per step (``_foreach_copy_``)."""

    def __init__(self, model: nn.Module):
        self.buffers = [b for b in model.buffers()]
        self.copies = [b.detach().clone() for b in self.buffers]

    def take(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.copies, self.buffers)

    def restore(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.copies)


def gradients_finite(accelerator: Accelerator, grad_norm: torch.Tensor) -> bool:
    """bf16/fp32: is the (all-reduced) gradient norm finite? Under fp16 the GradScaler decides."""
    return accelerator.scaler is not None or bool(torch.isfinite(grad_norm))


def apply_update(optimizer: torch.optim.Optimizer, finite: bool, buffers: "BufferSnapshot | None") -> None:
    """The optimizer step, or (non-finite gradients) no update and BatchNorm statistics put back;
    then clear the gradients."""
    if finite:
        optimizer.step()
    elif buffers is not None:
        buffers.restore()
    optimizer.zero_grad(set_to_none=True)


def step_result(optimizer, loss_sum, correct, n, grad_norm, finite: bool) -> StepResult:
    stepped = finite and not getattr(optimizer, "step_was_skipped", False)
    return StepResult(loss_sum=loss_sum, correct=correct, count=n, stepped=stepped, grad_norm=grad_norm,
                      finite=finite)


def micro_batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, label_smoothing: float):
    """(summed cross-entropy in fp32, logits) of one micro-batch."""
    logits = model(x)
    return F.cross_entropy(logits.float(), y, reduction="sum", label_smoothing=label_smoothing), logits


def split_micro_batches(images: torch.Tensor, labels: torch.Tensor, steps: int):
    """``steps`` micro-batches of near-equal size; when there are fewer images than steps, the
    empty ones come first so the last (gradient-syncing) micro-batch is never empty."""
    chunks = list(zip(images.tensor_split(steps), labels.tensor_split(steps)))
    return sorted(chunks, key=lambda c: c[1].numel())  # stable: equal sizes keep their order


def train_step(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    accumulation_steps: int = 1,
    label_smoothing: float = 0.0,
    offload=None,
    max_grad_norm: float | None = None,
    buffers: BufferSnapshot | None = None,
) -> StepResult:
    """Forward/backward every micro-batch, then one optimizer step (inside the last
    ``accumulate`` context, where Accelerate lets it through)."""
    if accumulation_steps != accelerator.gradient_accumulation_steps:
        raise ValueError(
            f"accumulation_steps {accumulation_steps} differs from the accelerator's "
            f"gradient_accumulation_steps {accelerator.gradient_accumulation_steps}"
        )
    n = labels.numel()
    loss_sum = torch.zeros((), dtype=torch.float64, device=labels.device)
    correct = torch.zeros((), dtype=torch.int64, device=labels.device)
    grad_norm = None
    finite = True
    if buffers is not None:
        buffers.take()
    for x, y in split_micro_batches(images, labels, accumulation_steps):
        with accelerator.accumulate(model):
            if y.numel():
                with offload if offload is not None else contextlib.nullcontext():
                    loss, logits = micro_batch_loss(model, x, y, label_smoothing)
                accelerator.backward(loss * (accumulation_steps / n))
                loss_sum += loss.detach().double()
                correct += (logits.detach().argmax(1) == y).sum()
            if accelerator.sync_gradients and accelerator.distributed_type != DistributedType.DEEPSPEED:
                # The (unscaled, all-reduced) gradient norm; clips only with --max-grad-norm.
                # DeepSpeed clips itself (gradient_clipping) and keeps its gradients partitioned.
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
                # Withhold an update from non-finite gradients; the norm is of all-reduced
                # gradients, so every rank agrees.
                finite = gradients_finite(accelerator, grad_norm)
            # optimizer.step is a no-op until the last micro-batch (Accelerate checks sync_gradients)
            apply_update(optimizer, finite, buffers)
    return step_result(optimizer, loss_sum, correct, n, grad_norm, finite)
