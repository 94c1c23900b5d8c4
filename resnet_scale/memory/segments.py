"""Which blocks activation checkpointing recomputes together: the checkpointing policies, the
stages of a ResNet, and the segments (runs of consecutive residual blocks) a policy cuts them into.

A ResNet's stages are found by name: ``stage_names`` (resnet_scale's ``ResNet``), else
``layer1``, ``layer2``, ... as torchvision's and timm's ResNets call them; each stage must be an
``nn.Sequential`` of blocks, which its model's forward calls in turn. Segments never cross a
stage boundary (``checkpointing.py``'s module docstring says why).
"""

from __future__ import annotations

import math

from torch import nn

__all__ = ["CHECKPOINT_POLICIES", "block_ranges", "find_stages", "parse_policy", "segments"]

#: ``--activation-checkpointing`` policies: name -> what one segment is.
CHECKPOINT_POLICIES: dict[str, str] = {
    "none": "no checkpointing: every activation is kept for the backward pass",
    "block": "each residual block is one segment (least recompute memory, most segment inputs)",
    "stage": "each stage layerN is one segment (fewest stored inputs, largest recompute)",
    "sqrt": "ceil(sqrt(n)) consecutive blocks per segment, n = blocks in the model "
    "(Chen et al. 2016, arXiv:1604.06174), chunked within each stage",
    "every:K": "K consecutive blocks per segment, chunked within each stage (e.g. every:2)",
}


def _policy_error(policy: object) -> ValueError:
    return ValueError(
        f"unknown activation checkpointing policy {policy!r} (--activation-checkpointing): choose one of "
        f"none, block, stage, sqrt, every:K with K >= 1 consecutive blocks per segment "
        f"(e.g. every:2)"
    )


def parse_policy(policy: str, total_blocks: int) -> int | None:
    """Blocks per segment for ``policy`` in a model of ``total_blocks`` blocks.

    Returns None for ``none``, 0 for ``stage`` (a whole stage per segment) and K >= 1 otherwise.
    Raises ValueError naming the valid policies.
    """
    if not isinstance(policy, str):
        raise _policy_error(policy)
    if policy == "none":
        return None
    if policy == "stage":
        return 0
    if policy == "block":
        return 1
    if policy == "sqrt":
        return max(1, math.ceil(math.sqrt(total_blocks)))
    if policy.startswith("every:"):
        k = policy[len("every:") :]
        if k.isdigit() and int(k) >= 1:
            return int(k)
    raise _policy_error(policy)


def _stage_names(model: nn.Module) -> list[str]:
    names = getattr(model, "stage_names", None)
    if names:
        return list(names)
    found = []  # torchvision's and timm's ResNets: layer1, layer2, ...
    while isinstance(getattr(model, f"layer{len(found) + 1}", None), nn.Module):
        found.append(f"layer{len(found) + 1}")
    return found


def find_stages(model: nn.Module) -> list[tuple[str, nn.Sequential]]:
    """``[(name, stage), ...]`` in forward order: resnet_scale's ``stage_names``, else torchvision's
    ``layer1``, ``layer2``, ... Raises ValueError for a model without them, or a stage that is not an
    ``nn.Sequential``."""
    names = _stage_names(model)
    if not names:
        raise ValueError(
            f"activation checkpointing needs a ResNet whose stages are nn.Sequential of blocks: a "
            f"resnet_scale ResNet (stage_names) or a torchvision/timm one (layer1, layer2, ...); got "
            f"{type(model).__name__}. Apply it to the model before torch.compile or accelerator.prepare "
            f"wrap it."
        )
    stages = []
    for name in names:
        stage = getattr(model, name)
        if not isinstance(stage, nn.Sequential):
            raise ValueError(f"stage {name!r} is a {type(stage).__name__}, not an nn.Sequential")
        stages.append((name, stage))
    return stages


def block_ranges(n: int, per_segment: int) -> list[tuple[int, int]]:
    """[start, stop) block ranges cutting a stage of n blocks (per_segment 0 = whole stage)."""
    k = n if per_segment == 0 else per_segment
    return [(a, min(a + k, n)) for a in range(0, n, k)]


def segments(model: nn.Module, policy: str) -> list[list[str]]:
    """Module names of the blocks in each segment, in forward order.

    ``segments(resnet50, "sqrt")`` -> ``[["layer1.0", "layer1.1", "layer1.2"], ["layer2.0", ...],
    ...]``; ``"none"`` -> ``[]``. Segments never cross a stage boundary.
    """
    stages = find_stages(model)
    per_segment = parse_policy(policy, sum(len(s) for _, s in stages))
    if per_segment is None:
        return []
    return [
        [f"{name}.{i}" for i in range(a, b)]
        for name, stage in stages
        for a, b in block_ranges(len(stage), per_segment)
    ]
