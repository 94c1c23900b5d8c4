"""Optimizer groups and the per-step learning-rate schedule."""

import math

import pytest
import torch
from torch import nn

from resnet_scale.config import OptimConfig
from resnet_scale.train.optim import build_optimizer, build_scheduler, lr_factor


def test_no_weight_decay_on_batchnorm_and_bias():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight), id(model[3].weight)}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "constant"])
def test_schedule_warms_up_linearly_then_follows_its_shape(schedule):
    f = [lr_factor(s, total_steps=100, warmup_steps=10, schedule=schedule) for s in range(100)]
    assert f[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert f[10] == pytest.approx(1.0)
    if schedule == "constant":
        assert f[-1] == 1.0
    else:
        assert f[-1] < 0.05 and all(a >= b for a, b in zip(f[10:], f[11:]))
    if schedule == "cosine":
        assert f[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))


def test_scheduler_counts_optimizer_steps():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = build_scheduler(opt, OptimConfig(lr=1.0, warmup_epochs=1), total_steps=20, steps_per_epoch=4)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert seen[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))
