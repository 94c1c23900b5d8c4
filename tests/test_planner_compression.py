"""The planner with activation compression: the compressed activation estimate equals the meter's
bytes (meta and a real CPU forward), the predicted peak holds what a real compressed step holds
(restored tensors included), the search prefers no compression, then the mildest that fits, keeps
an explicit --activation-compression, never proposes what the settings refuse, and the flags and
apply_plan set it; unpack's chunked restore is bit-identical and stays within restore_peak_bytes."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from resnet_scale.config import Config
from resnet_scale.memory import measure_saved_activation_bytes
from resnet_scale.memory.compression import (
    GROUP_SIZE,
    RESTORE_CHUNK,
    CompressSaved,
    apply_activation_compression,
    dequantize,
    restore_peak_bytes,
)
from resnet_scale.models import build_resnet
from resnet_scale.planner import apply_plan, plan_memory
from resnet_scale.planner import estimate as P
from resnet_scale.planner import profile as PR
from resnet_scale.planner.compressed import compressed_activation_bytes

pytestmark = pytest.mark.usefixtures("one_thread")

KiB, MiB, GiB = 2**10, 2**20, 2**30


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created by ops under this mode that are alive at once."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.seen:
                st = t.untyped_storage()
                key, n = st._cdata, st.nbytes()
                self.seen.add(key)
                self.live += n
                weakref.finalize(st, self._free, key, n)
        self.peak = max(self.peak, self.live)
        return out

    def _free(self, key, n):
        self.live -= n
        self.seen.discard(key)


def small_config(precision="fp32", policy="none", compression=None, batch=6, micro=None) -> Config:
    cfg = Config()
    cfg.model.block, cfg.model.depth, cfg.model.layers, cfg.model.stem = "basic", None, (1, 1, 1, 1), "imagenet"
    cfg.data.source, cfg.data.image_size = "synthetic", 32
    cfg.train.batch_size = batch
    cfg.memory.precision, cfg.memory.checkpointing = precision, policy
    cfg.memory.micro_batch_size, cfg.memory.activation_compression = micro, compression
    return cfg.validate()


KEY = P.ModelKey("basic", None, (1, 1, 1, 1), "imagenet", 10)


# ----------------------------------------------------------------------------- the estimate


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compressed_estimate_equals_the_meter(precision):
    """Saved bytes of every policy x mode, derived from the uncompressed profile's records, equal
    the meter's figure for the compressed model (which runs the real hooks on the meta device)."""
    model = PR._cached_model(KEY)
    for mode in {"fp32": ("int2",), "bf16": ("int8",)}[precision]:
        compressed = apply_activation_compression(copy.deepcopy(model), mode)
        for policy, micro in (("none", 3), ("block", 5), ("stage", 3), ("sqrt", 64)):
            saved, *_ = compressed_activation_bytes(KEY, 32, precision, precision == "bf16", policy, micro, mode)
            assert saved == measure_saved_activation_bytes(compressed, micro, 32, dtype=PR._DTYPES[precision],
                                                           channels_last=precision == "bf16", policy=policy)


@pytest.mark.parametrize("policy", ["none", "block"])
def test_predicted_peak_holds_a_real_compressed_step(policy):
    """A real CPU step (forward + backward) of the compressed model: the bytes it stores equal the
    estimate's activations, and everything it holds at once -- stored payloads, restored tensors and
    their temporaries, recomputed segments, activation and parameter gradients -- stays under the
    predicted peak less the workspace's 256 MiB floor (its 10 % share kept)."""
    cfg = small_config(policy=policy, compression="int4", batch=8)
    est = P.estimate_memory(cfg, device_type="cpu")
    torch.manual_seed(0)
    model = build_resnet("basic", None, layers=(1, 1, 1, 1), stem="imagenet", num_classes=10)
    from resnet_scale.memory.settings import apply_memory_transforms, resolve_memory

    model = apply_memory_transforms(model, resolve_memory(cfg, world_size=1, device_type="cpu"))
    assert est.activations == measure_saved_activation_bytes(model, 8, 32, device="cpu")
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    tracker = LiveBytes()
    with tracker:
        F.cross_entropy(model(x), y).backward()
    held = tracker.peak + 8 * (3 * 32 * 32 * 4 + 8)  # + the input batch, made outside the tracker
    rest = est.total - est.workspace - est.parameters - est.optimizer_states - est.dataset
    assert est.restore_peak > 0 and est.activations < held <= rest + int(P.WORKSPACE_FRACTION * est.total)


def test_restore_is_chunked_bit_identical_and_within_its_bound():
    torch.manual_seed(0)
    n = RESTORE_CHUNK + 3 * GROUP_SIZE + 5  # two chunks, a short last group
    leaf = torch.randn(n, requires_grad=True)
    for bits in (8, 4, 2):
        for t in (torch.relu(leaf * 1.0), torch.randn(n)):
            hooks = CompressSaved(bits)
            packed = hooks.pack(t)
            tracker = LiveBytes()
            with tracker:
                back = hooks.unpack(packed)
            whole = dequantize(packed.codes, packed.lo, packed.step, bits, n)
            if packed.mask is not None:
                nonzero = t.detach() != 0
                whole = torch.where(nonzero, whole.clamp_min(torch.finfo(t.dtype).tiny), 0.0)
            assert torch.equal(back, whole)
            assert n * 4 <= tracker.peak <= restore_peak_bytes(n, t.dtype)


# ----------------------------------------------------------------------------- the search


def search_config() -> Config:
    """ResNet-18 at 224 px, bf16, batch 64: big enough activations that compression, not only
    micro-batching and checkpointing, shrinks the smallest plan."""
    cfg = Config()
    cfg.model.block, cfg.model.depth = "basic", 18
    cfg.data.source, cfg.data.image_size, cfg.train.batch_size = "synthetic", 224, 64
    cfg.memory.precision = "bf16"
    return cfg.validate()


def smallest(cfg_given: Config, compression: str) -> int:
    """The least memory any plan with ``compression`` needs (the rest of the search free)."""
    cfg = copy.deepcopy(cfg_given)
    cfg.memory.activation_compression = compression
    return plan_memory(cfg, 1, device_type="cpu").smallest_budget_bytes


def test_no_compression_when_it_fits_else_the_mildest():
    """At every budget the plan has the mildest compression any of whose plans fit (none whenever
    an uncompressed plan fits, micro-batch 1 and checkpointing included); the flags and apply_plan
    carry it. (At micro-batch 1 an int8 plan of this model needs more than the best uncompressed
    one: restoring costs more than int8 saves there, so the budgets pick none, int4 and int2.)"""
    modes = ("none", "int8", "int4", "int2")
    cfg = search_config()
    least = {m: smallest(cfg, m) for m in modes}
    assert least["int2"] < least["int4"] < least["none"]
    chosen = set()
    for budget in sorted({v + d for v in least.values() for d in (-1, 0)}):
        plan = plan_memory(cfg, budget, device_type="cpu")
        fitting = [m for m in modes if least[m] <= budget]
        assert plan.fits == bool(fitting)
        if not fitting:
            continue
        mode = plan.settings["activation_compression"]
        assert mode == fitting[0], (budget, plan.describe())
        chosen.add(mode)
        assert ("--activation-compression" in plan.flags) == (mode != "none")
        applied = apply_plan(cfg, plan)
        assert (applied.memory.activation_compression or "none") == mode
        assert P.estimate_memory(applied, device_type="cpu").total == plan.predicted_peak_bytes <= budget
    assert {"none", "int4", "int2"} <= chosen
    roomy = plan_memory(cfg, 8 * GiB, device_type="cpu")
    assert roomy.settings["activation_compression"] == "none" and "--activation-compression" not in roomy.flags


@pytest.mark.parametrize("flag", ["offload_activations", "compile", "checkpoint_impl", "given"])
def test_refused_or_explicit_settings_are_kept(flag):
    """With --offload-activations, --compile or --checkpoint-impl fairscale (each refuses compression)
    the planner never proposes it, however tight the budget; an explicit --activation-compression
    (none too) is kept."""
    cfg = search_config()
    tight = smallest(cfg, "int2")
    if flag == "given":
        for mode in ("none", "int4"):
            cfg.memory.activation_compression = mode
            plans = [plan_memory(cfg, b, device_type="cpu") for b in (tight, 8 * GiB)]
            assert {p.settings["activation_compression"] for p in plans} == {mode}
            assert not any("--activation-compression" in p.flags for p in plans)
        return
    if flag == "checkpoint_impl":
        cfg.memory.checkpoint_impl, cfg.memory.checkpointing = "fairscale", "block"
    else:
        setattr(cfg.memory, flag, True)
    plan = plan_memory(cfg, tight, device_type="cpu")
    assert not plan.fits and plan.settings["activation_compression"] == "none"
    assert plan_memory(cfg, 8 * GiB, device_type="cpu").settings["activation_compression"] == "none"


def test_int4_and_int2_are_never_paired_with_checkpointing_unless_both_are_given():
    """Recomputing a segment from an int4/int2-restored input biases its gradients (int8 stays
    unbiased): the planner offers those pairs only when the user chose both settings."""
    from resnet_scale.planner.search import _candidates

    def pairs(cfg):
        ctx = P.PlanContext.build(cfg, 1, "cpu")
        return {(c.activation_compression, c.checkpointing) for c in _candidates(ctx, P.given_candidate(cfg, 1, "cpu"))}

    cfg = search_config()
    found = pairs(cfg)
    assert {("int8", "block"), ("int2", "none"), ("int4", "none"), ("none", "stage")} <= found
    assert not {(m, p) for m, p in found if m in ("int4", "int2") and p != "none"}
    cfg.memory.activation_compression = "int2"
    assert pairs(cfg) == {("int2", "none")}
    cfg.memory.checkpointing = "block"  # the user's own pairing is searched, no other
    assert pairs(cfg) == {("int2", "none"), ("int2", "block")}


def test_plan_command_prints_the_flag(capsys):
    """``resnet-scale plan`` adds --activation-compression to the flags when only compression fits."""
    from resnet_scale.cli.plan import main as plan_main

    budget = smallest(search_config(), "int2")
    argv = ["--block", "basic", "--depth", "18", "--image-size", "224", "--batch-size", "64", "--data", "synthetic",
            "--precision", "bf16", "--device", "cpu", "--max-memory", str(budget)]
    assert plan_main(argv) == 0
    out = capsys.readouterr().out
    assert "activations saved as int2" in out and "--activation-compression int2" in out
    assert "restore peak" in out and "chosen because no uncompressed plan fits" in out
