"""How each process starts the default process group: NCCL groups here, with the process's GPU made
current first and bound to the group (``device_id``); gloo groups by Accelerate as before, except
under a torchrun restart (a store prefix per attempt). The 2-rank gloo runs of test_distributed.py and
test_reliability.py run the code that acts on this decision."""

import torch

from resnet_scale.distributed.accelerator import ProcessGroupStart, process_group_start


def _start(device, **kw):
    args = {"world_size": 2, "local_rank": 1, "device_count": 8, "restart_attempt": None, "initialized": False}
    return process_group_start(device, **{**args, **kw})


def test_nccl_is_started_here_on_the_local_gpu_with_device_id():
    assert _start("cuda") == ProcessGroupStart("nccl", torch.device("cuda", 1), None)
    # Under a torchrun restart: the same, on the attempt's store prefix.
    assert _start("cuda", restart_attempt="2") == ProcessGroupStart("nccl", torch.device("cuda", 1),
                                                                    "resnet_scale/attempt_2")
    # One GPU visible per process (CUDA_VISIBLE_DEVICES set per rank): local rank 3 is that GPU, cuda:0,
    # the device Accelerate makes current too.
    assert _start("cuda", local_rank=3, device_count=1).device_id == torch.device("cuda", 0)


def test_gloo_stays_with_accelerate_except_under_a_torchrun_restart():
    assert _start("cpu") is None
    assert _start("cpu", restart_attempt="0") == ProcessGroupStart("gloo", None, "resnet_scale/attempt_0")


def test_nothing_is_started_for_one_process_an_existing_group_or_no_local_rank():
    assert _start("cuda", world_size=1) is None
    assert _start("cuda", initialized=True) is None
    assert _start("cpu", restart_attempt="1", initialized=True) is None
    assert _start("cuda", local_rank=None) is None


def test_one_process_under_deepspeed_gets_a_world_of_one_here():
    """DeepSpeed needs a group even alone, and Accelerate told to use it looks for one; without a launcher
    nothing else starts it (a one-process ZeRO run failed: "Default process group has not been initialized")."""
    assert _start("cpu", world_size=1, local_rank=None, deepspeed=True) == ProcessGroupStart("gloo", None, None,
                                                                                              alone=True)
    assert _start("cuda", world_size=1, local_rank=None, device_count=2, deepspeed=True) == ProcessGroupStart(
        "nccl", torch.device("cuda", 0), None, alone=True)
    assert _start("cpu", world_size=1, deepspeed=True, initialized=True) is None
    assert _start("cpu", world_size=2, deepspeed=True) is None  # several processes: as before
