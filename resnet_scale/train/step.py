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
    """What one step leaves on the device: nothing here is read by the host per step (the loop
    reads its flags at log, save and stop points: ``control.LoopControl``)."""

    loss_sum: torch.Tensor  # sum of per-image losses over this device's batch (float64, on device)
    correct: torch.Tensor  # correctly classified images (on device)
    count: int  # images in this device's batch
    grad_norm: torch.Tensor | None = None  # total gradient norm before clipping (None under DeepSpeed)
    nonfinite: torch.Tensor | None = None  # bf16/fp32: 1.0 when the gradient norm was not finite (update withheld)
    withheld: torch.Tensor | bool = False  # the update was withheld: that, or fp16 loss scaling skipped it


class BufferSnapshot:
    """The model's buffers (BatchNorm running statistics) as they were before a step, put back
    when the step's update is withheld: the forward pass of a non-finite step has already folded
    NaN/inf into the running statistics. One fused copy per step (``_foreach_copy_``); putting them
    back is decided on the device (``torch.where`` on the step's flag), without the host."""

    def __init__(self, model: nn.Module):
        self.buffers = [b for b in model.buffers()]
        self.copies = [b.detach().clone() for b in self.buffers]

    def take(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.copies, self.buffers)

    def restore(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.copies)

    def restore_where(self, flag: torch.Tensor) -> None:
        """Put the buffers back where ``flag`` (a device scalar) is non-zero; bit-identical either way."""
        bad = flag.reshape(()).bool()
        for buffer, copy in zip(self.buffers, self.copies):
            buffer.copy_(torch.where(bad, copy, buffer))


def nonfinite_flag(accelerator: Accelerator, grad_norm: torch.Tensor) -> torch.Tensor | None:
    """bf16/fp32: 1.0 (float32, on the device) when the (all-reduced) gradient norm is not finite, else
    0.0; the fused SGD then leaves the weights and momentum as they are. fp16: None (the GradScaler
    passes its own flag)."""
    if accelerator.scaler is not None:
        return None
    return (~torch.isfinite(grad_norm)).float().reshape(1)


def _momentum_ready(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter a zero momentum buffer before the first step. The fused SGD treats a
    step without buffers as the first one and allocates them *uninitialised*; if that step's update
    is withheld (``found_inf``), they would stay garbage. A zero buffer gives the same first update
    (momentum x 0 + gradient), so nothing changes for a finite first step."""
    if getattr(optimizer, "_resnet_scale_momentum", False):
        return
    for group in optimizer.param_groups:
        if group.get("momentum", 0):
            for p in group["params"]:
                if optimizer.state[p].get("momentum_buffer") is None:
                    optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    optimizer._resnet_scale_momentum = True


def apply_update(accelerator: Accelerator, optimizer: torch.optim.Optimizer, nonfinite: torch.Tensor | None,
                 buffers: BufferSnapshot | None) -> torch.Tensor | bool:
    """The optimizer step, withheld on the device when ``nonfinite`` (bf16/fp32) or the GradScaler's
    flag (fp16) is set: the fused SGD leaves parameters and momentum bit-identical, and the BatchNorm
    statistics are put back. Then clear the gradients. Returns the withheld flag (a device tensor:
    not read here), or DeepSpeed's own answer."""
    inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate: the torch optimizer it wraps
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if (accelerator.sync_gradients and not deepspeed and nonfinite is not None
            and not all(group.get("fused") for group in inner.param_groups)):
        # An optimizer without the fused kernel (not build_optimizer's) cannot take the flag: decided
        # on the host, one synchronisation per step.
        if bool(nonfinite):
            if buffers is not None:
                buffers.restore()
            optimizer.zero_grad(set_to_none=True)
            return nonfinite
        nonfinite = None
    elif accelerator.sync_gradients and not deepspeed:
        _momentum_ready(inner)
        inner.grad_scale, inner.found_inf = None, nonfinite  # fp16: the GradScaler sets both in step()
    optimizer.step()
    withheld: torch.Tensor | bool = bool(getattr(optimizer, "step_was_skipped", False))
    if accelerator.sync_gradients and not deepspeed:
        withheld = getattr(inner, "found_inf", None) if getattr(inner, "found_inf", None) is not None else withheld
        inner.grad_scale = inner.found_inf = None
        if nonfinite is not None and buffers is not None:
            buffers.restore_where(nonfinite)
    optimizer.zero_grad(set_to_none=True)
    return withheld


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
    grad_norm = nonfinite = None
    withheld: torch.Tensor | bool = False
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
                # Withhold an update from non-finite gradients (on the device); the norm is of
                # all-reduced gradients, so every rank agrees.
                nonfinite = nonfinite_flag(accelerator, grad_norm)
            # optimizer.step is a no-op until the last micro-batch (Accelerate checks sync_gradients)
            withheld = apply_update(accelerator, optimizer, nonfinite, buffers)
    return StepResult(loss_sum=loss_sum, correct=correct, count=n, grad_norm=grad_norm, nonfinite=nonfinite,
                      withheld=withheld)
