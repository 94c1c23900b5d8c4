"""Low-memory settings wired into training: micro-batching, channels_last, precision, offload,
--low-memory resolution, and whole runs that must not change with the memory settings."""

import argparse
import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from resnet_scale.config import Config, ConfigError
from resnet_scale.config import add_config_arguments, config_from_args
from resnet_scale.memory import apply_channels_last
from resnet_scale.memory.settings import activation_offload, apply_memory_transforms, resolve_memory
from resnet_scale.models import build_resnet
from resnet_scale.train.run_dir import load_weights
from resnet_scale.train.step import split_micro_batches, train_step

sys.path.insert(0, str(Path(__file__).parent))
from test_train_e2e import read_jsonl, run_cli  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(list(argv))).validate()


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    return build_resnet("basic", 8, num_classes=10, **kw)


def batch(n=16, size=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def one_step(model, images, labels, k, *, mixed_precision="no", offload=None):
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=k, mixed_precision=mixed_precision)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    result = train_step(accelerator, model, optimizer, images, labels, accumulation_steps=k, offload=offload)
    return accelerator.unwrap_model(model), result


@pytest.mark.parametrize("n, k", [(16, 4), (16, 2), (10, 4), (3, 4)])
def test_micro_batches_give_the_full_batch_step(n, k):
    """BatchNorm in eval mode (batch-independent), so one step of B equals k micro-steps of B/k."""
    images, labels = batch(n)
    full, micro = small_model().eval(), small_model().eval()
    full, r_full = one_step(full, images, labels, 1)
    micro, r_micro = one_step(micro, images, labels, k)
    for (name, a), b in zip(full.state_dict().items(), micro.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)
    assert r_full.count == r_micro.count == n
    torch.testing.assert_close(r_full.loss_sum, r_micro.loss_sum, atol=1e-5, rtol=1e-6)
    assert int(r_full.correct) == int(r_micro.correct)
    torch.testing.assert_close(r_full.grad_norm, r_micro.grad_norm, atol=1e-5, rtol=1e-5)


def test_micro_batches_really_change_batchnorm_statistics_in_training_mode():
    """The documented difference: per-micro-batch statistics in training mode."""
    images, labels = batch(16)
    full, _ = one_step(small_model(), images, labels, 1)
    micro, _ = one_step(small_model(), images, labels, 4)
    assert not torch.allclose(full.layer1[0].conv1.weight, micro.layer1[0].conv1.weight, atol=1e-7)


def test_grad_norm_is_reported_and_max_grad_norm_clips():
    images, labels = batch(8)
    _, free = one_step(small_model(), images, labels, 1)
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, optimizer = accelerator.prepare(model, optimizer)
    clipped = train_step(accelerator, model, optimizer, images, labels, max_grad_norm=0.01)
    torch.testing.assert_close(clipped.grad_norm, free.grad_norm)  # reported before clipping
    moved = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p - before[n])
                                                  for n, p in model.named_parameters()]))
    assert float(moved) == pytest.approx(0.01, rel=1e-3)  # plain SGD, lr 1: the step is the clipped gradient


def test_split_puts_empty_micro_batches_first():
    x, y = torch.arange(3).float()[:, None], torch.arange(3)
    sizes = [c[1].numel() for c in split_micro_batches(x, y, 4)]
    assert sizes == [0, 1, 1, 1]
    assert torch.equal(torch.cat([c[1] for c in split_micro_batches(x, y, 4)]), y)


def test_channels_last_survives_forward_backward_and_optimizer():
    model = apply_channels_last(small_model())
    seen = []
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
            module.weight.register_hook(lambda g: seen.append(g.is_contiguous(memory_format=torch.channels_last)) or g)
    images, labels = batch(8)
    model, _ = one_step(model, images.contiguous(memory_format=torch.channels_last), labels, 2)
    assert seen and all(seen), "an activation or a gradient left channels_last"
    for name, p in model.named_parameters():
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last), name
            if p.shape[-1] > 1:  # a 1x1 kernel is both layouts at once
                assert not p.is_contiguous(), name


def test_bf16_autocast_keeps_weights_and_batchnorm_in_fp32():
    images, labels = batch(8)
    model, result = one_step(small_model(), images, labels, 1, mixed_precision="bf16")
    assert torch.isfinite(result.loss_sum)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.bn1.running_mean.dtype == torch.float32 and int(model.bn1.num_batches_tracked) == 1
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = small_model()
    dtypes = []
    model.fc.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    accelerator.prepare(model)(images)
    assert dtypes == [torch.bfloat16]  # the forward really ran under autocast (Accelerate returns fp32)


def test_offloaded_activations_give_the_same_step():
    images, labels = batch(8)
    plain, _ = one_step(small_model(), images, labels, 2)
    settings = resolve_memory(parse("--offload-activations", "--batch-size", "8"), world_size=1, device_type="cpu")
    offloaded, _ = one_step(small_model(), images, labels, 2, offload=activation_offload(settings, torch.device("cpu")))
    for a, b in zip(plain.state_dict().values(), offloaded.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_low_memory_defaults_and_explicit_flags_win():
    low = resolve_memory(parse("--low-memory", "--batch-size", "256"), world_size=2, device_type="cpu")
    assert (low.precision, low.channels_last, low.checkpointing) == ("bf16", True, "block")
    assert (low.per_device_batch, low.micro_batch_size, low.accumulation_steps) == (128, 64, 2)
    odd = resolve_memory(parse("--low-memory", "--batch-size", "90"), world_size=1, device_type="cpu")
    assert (odd.micro_batch_size, odd.accumulation_steps) == (45, 2)
    mine = resolve_memory(parse("--low-memory", "--activation-checkpointing", "none", "--precision", "fp32",
                                "--no-channels-last", "--micro-batch-size", "128", "--batch-size", "128"),
                          world_size=1, device_type="cpu")
    assert (mine.precision, mine.channels_last, mine.checkpointing, mine.accumulation_steps) == ("fp32", False, "none", 1)
    default = resolve_memory(Config(), world_size=1, device_type="cpu")
    assert (default.precision, default.channels_last, default.checkpointing, default.accumulation_steps) == (
        "fp32", False, "none", 1)


@pytest.mark.parametrize(
    "argv, world, device, message",
    [
        (["--precision", "fp16"], 1, "cpu", "needs a CUDA GPU"),
        (["--batch-size", "96", "--micro-batch-size", "40"], 1, "cpu", "divisors up to 64: 1, 2, 3, 4, 6, 8"),
        (["--batch-size", "100"], 3, "cpu", "not divisible by the 3 processes"),
        (["--activation-checkpointing", "every:0"], 1, "cpu", "none, block, stage, sqrt, every:K"),
        (["--checkpoint-impl", "fairscale"], 1, "cpu", "needs an --activation-checkpointing policy"),
    ],
)
def test_impossible_memory_settings_are_refused(argv, world, device, message):
    with pytest.raises(ConfigError, match=message):
        resolve_memory(parse(*argv), world_size=world, device_type=device)


#: fairscale is an optional alternative (pip install 'resnet-scale[fairscale]'): its cases skip without it.
HAS_FAIRSCALE = importlib.util.find_spec("fairscale") is not None


@pytest.mark.parametrize("impl", ["native", pytest.param("fairscale", marks=pytest.mark.skipif(
    not HAS_FAIRSCALE, reason="fairscale is not installed"))])
def test_memory_transforms_keep_state_dict_keys(impl):
    model = small_model()
    keys = list(model.state_dict())
    settings = resolve_memory(parse("--low-memory", "--checkpoint-impl", impl), world_size=1, device_type="cpu")
    assert list(apply_memory_transforms(copy.deepcopy(model), settings).state_dict()) == keys


def _same_run(tmp_path, name, *extra):
    args = ("--data", "synthetic", "--layers", "2,1,1", "--block", "basic", "--depth", "8", "--image-size", "16",
            "--synthetic-train-samples", "96", "--max-steps", "6", "--batch-size", "16", "--log-every", "1",
            "--deterministic", "--output-dir", tmp_path, "--run-name", name)
    out = run_cli(*args, *extra)
    assert out.returncode == 0, out.stderr
    return read_jsonl(tmp_path / name / "metrics.jsonl")


def _losses(records):
    return [(r["split"], r["step"], r["loss"], r["accuracy"]) for r in records]


@pytest.mark.e2e
def test_checkpointing_leaves_a_whole_training_run_unchanged_and_low_memory_keeps_the_schedule(tmp_path):
    plain = _same_run(tmp_path, "plain")
    cases = [("block", "native"), ("stage", "native")] + ([("block", "fairscale")] if HAS_FAIRSCALE else [])
    for policy, impl in cases:
        other = _same_run(tmp_path, f"{policy}-{impl}", "--activation-checkpointing", policy, "--checkpoint-impl", impl)
        for a, b in zip(_losses(plain), _losses(other), strict=True):
            assert a[:2] == b[:2] and a[2] == pytest.approx(b[2], abs=1e-5) and a[3] == b[3], (policy, impl)

    # Micro-batches: the learning rate follows optimizer steps, not micro-steps.
    low = _same_run(tmp_path, "low", "--low-memory", "--micro-batch-size", "4")
    assert [(r["step"], r["lr"]) for r in low] == [(r["step"], r["lr"]) for r in plain]
    assert low[-1]["split"] == "test"
    summary = json.loads((tmp_path / "low" / "summary.json").read_text())
    assert summary["memory"]["accumulation_steps"] == 4 and summary["memory"]["precision"] == "bf16"
    model = build_resnet("basic", None, layers=(2, 1, 1), stem="cifar", num_classes=10)
    model.load_state_dict(load_weights(tmp_path / "low" / "model.safetensors"), strict=True)


def test_train_max_memory_applies_the_flags_that_plan_prints(tmp_path):
    flags = ("--data", "synthetic", "--depth", "8", "--image-size", "32", "--batch-size", "64",
             "--synthetic-train-samples", "64", "--synthetic-test-samples", "32", "--device", "cpu", "--max-memory", "290MiB")
    shown = run_cli(*flags, "--json", subcommand="plan", timeout=300)
    assert shown.returncode == 0, shown.stderr
    plan = json.loads(shown.stdout)
    assert plan["fits"] is False and plan["plan"]["fits"] is True and plan["flags"]
    out = run_cli(*flags, "--max-steps", "1", "--output-dir", tmp_path, "--run-name", "planned")
    assert out.returncode == 0, out.stderr
    assert "memory plan flags: " + " ".join(plan["flags"]) in out.stderr
    config = json.loads((tmp_path / "planned" / "config.json").read_text())
    assert config["memory_plan"]["flags"] == plan["flags"]
    applied = run_cli(*flags[:-2], *plan["flags"], "--max-steps", "1", "--output-dir", tmp_path, "--run-name", "by-hand")
    assert applied.returncode == 0, applied.stderr
    by_hand = json.loads((tmp_path / "by-hand" / "summary.json").read_text())["memory"]
    assert json.loads((tmp_path / "planned" / "summary.json").read_text())["memory"] == by_hand
