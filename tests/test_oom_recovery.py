"""Out-of-memory recovery (--oom-recovery): an out-of-memory error on one rank makes every rank
redo the step with half the micro-batch, and training finishes. On CPU the error is injected
(RESNET_SCALE_INJECT_OOM=RANK:STEP); the processes, collectives and plan switch are real."""

import json
import sys
from pathlib import Path

import pytest
import torch

from resnet_scale.config import Config, ConfigError
from resnet_scale.memory.settings import MemorySettings
from resnet_scale.train.oom import next_plan
from resnet_scale.train.run_dir import load_weights

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import BASE, ranks  # noqa: E402
from test_train_e2e import read_jsonl, run_cli  # noqa: E402


def _run(tmp_path, name, *extra, inject=None, monkeypatch=None):
    if inject:
        monkeypatch.setenv("RESNET_SCALE_INJECT_OOM", inject)
    out = run_cli(*BASE, "--distributed", "ddp", "--output-dir", tmp_path, "--run-name", name, *extra,
                  launcher=ranks(2))
    if inject:
        monkeypatch.delenv("RESNET_SCALE_INJECT_OOM")
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / name
    return {"losses": [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"],
            "weights": load_weights(run / "model.safetensors"),
            "summary": json.loads((run / "summary.json").read_text()), "stderr": out.stderr}


@pytest.mark.multiprocess
def test_oom_on_one_rank_moves_every_rank_to_the_next_plan_at_the_same_step(tmp_path, monkeypatch, ddp_run):
    plain = ddp_run  # the same flags as _run's, without --oom-recovery
    guarded = _run(tmp_path, "guarded", "--oom-recovery")
    # Without an error the guarded step (plain module, explicit gradient mean) is DDP's step.
    assert guarded["losses"] == pytest.approx(plain["losses"], rel=1e-6, abs=1e-7)
    assert all(torch.allclose(guarded["weights"][k], plain["weights"][k], rtol=1e-5, atol=1e-6)
               for k in plain["weights"])
    # Rank 1 runs out of memory at step 2 (of 3): both ranks halve the micro-batch there and finish.
    hit = _run(tmp_path, "oom", "--oom-recovery", inject="1:2", monkeypatch=monkeypatch)
    switch = [{"step": 2, "micro_batch_size": 8, "accumulation_steps": 2}]
    assert hit["summary"]["oom_recoveries_per_rank"] == [switch, switch]
    assert hit["summary"]["steps"] == 3 and hit["summary"]["memory"]["micro_batch_size"] == 8
    assert "step 2: out of memory on a rank; every rank redoes it with fp32, micro-batch 8 x 2" in hit["stderr"]
    assert hit["losses"][0] == pytest.approx(plain["losses"][0], rel=1e-6)  # step 1 ran as before
    # With BatchNorm in train mode a smaller micro-batch normalises with other statistics, so the
    # redone step's loss differs a little from the whole-batch one, but it is the same batch.
    assert hit["losses"][1] == pytest.approx(plain["losses"][1], rel=0.05)


def test_next_plan_halves_the_micro_batch_and_keeps_the_batch():
    m = MemorySettings(precision="fp32", channels_last=False, checkpointing="none", checkpoint_impl="native",
                       per_device_batch=12, micro_batch_size=12, accumulation_steps=1, offload_activations=False,
                       compile=False)
    sizes = []
    while m is not None:
        sizes.append((m.micro_batch_size, m.accumulation_steps))
        m = next_plan(m)
    assert sizes == [(12, 1), (6, 2), (3, 4), (1, 12)]


def test_oom_recovery_is_refused_under_deepspeed():
    cfg = Config()
    cfg.memory.oom_recovery = True
    cfg.distributed.zero_stage = 2
    with pytest.raises(ConfigError, match="--oom-recovery"):
        cfg.validate()


def test_oom_recovery_is_refused_with_sync_bn():
    cfg = Config()
    cfg.memory.oom_recovery = True
    cfg.distributed.sync_bn = True
    with pytest.raises(ConfigError, match="--sync-bn"):
        cfg.validate()
