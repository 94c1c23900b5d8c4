"""The planner's time model: predicted seconds per optimizer step of a candidate (``predicted_step_seconds``).

Time model (per optimizer step on one device; a reference GPU, NOT calibrated -- only ratios
between plans are used, reported relative to the settings as given):

* compute = images x (forward + backward [+ one more forward of every residual block when any
  checkpointing policy is on: each policy recomputes every block once]) FLOPs / FLOP rate, bf16
  twice as fast as fp32 (TF32) on a GPU, half as fast on a CPU;
* each micro-batch costs as much again as ``MICRO_BATCH_OVERHEAD_IMAGES`` (16) more images plus a
  fixed launch cost: GPU efficiency m / (m + 16) -- 67 % at 32 images, 50 % at 16 (on a CPU,
  4 images and 2 ms);
* gradient communication (world_size > 1): an all-reduce per step (DDP, ZeRO-1), a
  reduce-scatter per micro-batch (ZeRO-2), and parameter all-gathers per micro-batch (ZeRO-3);
  DeepSpeed's engine costs ``DEEPSPEED_OVERHEAD`` (5 %) of compute, so ZeRO is only chosen when it
  is needed to fit;
* offload moves gradients and weights over PCIe each step and runs SGD on the CPU (parameter
  offload: weights over PCIe for every micro-batch) -- a large penalty, a last resort;
* activation compression is memory-bound work on every quantized element (``compressed.py``
  counts them: every saved activation without checkpointing, only the segment inputs, stem and
  head with it): ``COMPRESSION_BYTES_PER_ELEMENT`` bytes of device-memory traffic each, at the
  device's memory bandwidth. The count follows ``compression.py``'s plain torch ops: quantizing
  reads the activation, writes an fp32 copy, reads it for the group minimum and maximum, draws
  one fp32 random number, and runs the shift/scale/round/clamp/cast chain on fp32 temporaries
  (about 60 bytes); restoring unpacks the codes, scales them in fp32 and writes the activation
  (about 30 bytes); packing 2 or 4 codes per byte adds about 6 bytes per extra code per byte
  (shift and or; on restoring, shift and mask): int8 90, int4 96, int2 108. So int8 < int4 < int2 in cost: among compressed plans that fit, the mildest wins when the
  rest is equal. On the reference GPU this makes an int8 step of ResNet-50 at 224 px several times
  slower than an uncompressed one (an estimate, not a measurement).

The search (``search.py``) does not leave the preference for no compression to this cost: it
ranks plans by compression first (none, int8, int4, int2), then by this time, because
compression also costs gradient accuracy (int2 gradients are unbiased but noisy), which no time
model prices.
"""

from __future__ import annotations

from dataclasses import dataclass

from resnet_scale.planner.estimate import Candidate, PlanContext

__all__ = ["COMPRESSION_BYTES_PER_ELEMENT", "DEEPSPEED_OVERHEAD", "MICRO_BATCH_OVERHEAD_IMAGES", "REFERENCE_DEVICES", "DeviceModel",
           "predicted_step_seconds"]


@dataclass(frozen=True)
class DeviceModel:
    """Reference throughputs of the time model (uncalibrated; see the module docstring)."""

    flops: dict  # effective FLOP/s by precision
    launch_s: float  # fixed cost of one micro-batch's forward + backward
    overhead_images: int  # each micro-batch costs as if it held this many more images
    memory_bytes_per_s: float  # device memory bandwidth (optimizer step)
    pcie_bytes_per_s: float = 20e9
    host_optimizer_bytes_per_s: float = 10e9  # SGD on the CPU, bytes of state touched per second
    interconnect_bytes_per_s: float = 100e9  # per device, for collectives


MICRO_BATCH_OVERHEAD_IMAGES = 16
DEEPSPEED_OVERHEAD = 0.05
#: Device-memory bytes moved per quantized element, quantize + restore (module docstring).
COMPRESSION_BYTES_PER_ELEMENT = {8: 90, 4: 96, 2: 108}
REFERENCE_DEVICES = {
    "cuda": DeviceModel({"fp32": 100e12, "bf16": 200e12, "fp16": 200e12}, 1e-3, MICRO_BATCH_OVERHEAD_IMAGES, 2e12),
    "cpu": DeviceModel({"fp32": 1e12, "bf16": 0.5e12, "fp16": 0.25e12}, 2e-3, 4, 20e9),
}


def predicted_step_seconds(ctx: PlanContext, c: Candidate) -> float:
    """Seconds per optimizer step on the reference device (time model in the module docstring)."""
    f, dev, n = ctx.facts, REFERENCE_DEVICES[ctx.device_type], ctx.world_size
    rate = dev.flops[c.precision]
    per_image = f.forward_flops_per_image + f.backward_flops_per_image
    recompute = f.block_forward_flops_per_image if c.checkpointing != "none" else 0.0
    compute = c.per_device_batch * (per_image + recompute) / rate
    acc = c.accumulation_steps
    t = compute + acc * (dev.overhead_images * per_image / rate + dev.launch_s)
    if c.activation_compression != "none":
        from resnet_scale.memory.compression import COMPRESSION_MODES
        from resnet_scale.planner.compressed import compressed_activation_bytes

        *_, elements = compressed_activation_bytes(ctx.key, ctx.image_size, c.precision, c.channels_last,
                                                   c.checkpointing, c.micro_batch_size, c.activation_compression)
        per_element = COMPRESSION_BYTES_PER_ELEMENT[COMPRESSION_MODES[c.activation_compression]]
        t += acc * elements * per_element / dev.memory_bytes_per_s
    grad_bytes = f.num_params * 4
    zero = c.engine == "deepspeed" and c.zero_stage >= 1
    if zero:
        t += DEEPSPEED_OVERHEAD * compute
    if zero and c.offload != "none":
        t += 2 * grad_bytes / dev.pcie_bytes_per_s + 4 * grad_bytes / dev.host_optimizer_bytes_per_s
        if c.offload == "optimizer+params":
            t += acc * 2 * grad_bytes / dev.pcie_bytes_per_s
    else:
        local = grad_bytes / n if zero else grad_bytes
        t += 4 * local / dev.memory_bytes_per_s  # SGD reads weights, grads, momentum; writes two
    if n > 1:
        ring = grad_bytes * (n - 1) / n / dev.interconnect_bytes_per_s
        if not zero or c.zero_stage == 1:
            t += 2 * ring
        elif c.zero_stage == 2:
            t += acc * ring + ring
        else:
            t += acc * 3 * ring
    return t
