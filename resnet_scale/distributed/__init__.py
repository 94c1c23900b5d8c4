"""How the processes share the work: the ``Accelerator`` built from the config.

* ``accelerator.py`` -- ``build_accelerator(cfg, memory)``: device, autocast precision, gradient
  accumulation and the engine, DDP (NCCL on GPUs, gloo on CPU) or DeepSpeed ZeRO 0-3; every
  configuration error is raised before a process group starts.
  ``prepare(accelerator, model, optimizer)``: Accelerate's prepare, with the DeepSpeed buckets
  sized to the model first.
* ``deepspeed.py`` -- the DeepSpeed JSON config: a template from ``ds_configs/`` or ``--ds-config``,
  its ``"auto"`` values filled from the flags (the bucket sizes from the model's size), a
  contradiction refused.
* ``sync_bn.py`` -- ``apply_sync_batchnorm(model, device_type)``: BatchNorm statistics over all
  processes (torch's SyncBatchNorm on GPUs, an all-reduce version on CPU).

Imports accelerate, ``resnet_scale.config`` and ``resnet_scale.memory``; deepspeed (and
transformers, which Accelerate's DeepSpeed plugin needs) only when a run asks for DeepSpeed.
"""

from resnet_scale.distributed.accelerator import build_accelerator

__all__ = ["build_accelerator"]
