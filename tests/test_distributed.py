"""Distributed training with real processes: torchrun, 2 CPU ranks over gloo, real DeepSpeed.

Run alone with ``python -m pytest -m multiprocess``. The refusals of bad configurations at the
end run in-process and fast.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnet_scale.config import ConfigError
from resnet_scale.distributed.deepspeed import BUCKET_CAP, build_ds_config, size_buckets
from resnet_scale.memory.settings import resolve_memory
from resnet_scale.models import build_resnet
from resnet_scale.train.run_dir import load_weights

sys.path.insert(0, str(Path(__file__).parent))
from test_memory_train import parse  # noqa: E402
from test_train_e2e import FORK, REPO, read_jsonl, run_cli  # noqa: E402



def free_port() -> int:
    """A port nobody listens on now (other test runs on this machine may use fixed ones)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

# 96 images, global batch 32: 3 steps make one whole epoch.
BASE = ("--data", "synthetic", "--layers", "1,1,1", "--image-size", "16", "--synthetic-train-samples", "96",
        "--synthetic-test-samples", "40", "--epochs", "1", "--batch-size", "32", "--log-every", "1",
        "--deterministic", "--record-samples", "--lr", "0.05")


def torchrun(nproc=2, script=None):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            str(script or REPO / "launch" / "train.py")]


def ranks(nproc=2, script=None):
    """The launcher of the tests that compare runs (or probe them with ``script``): torchrun's elastic
    agent with its workers forked after the imports (tests/workers/fork_launch.py), or real torchrun
    with RESNET_SCALE_TESTS_NO_FORK=1. The tests about launching itself (torchrun, two nodes,
    restarts) always use real torchrun."""
    if FORK:
        return [sys.executable, str(REPO / "tests" / "workers" / "fork_launch.py"), str(nproc),
                *(["--script", str(script)] if script else [])]
    return torchrun(nproc, script)


def train_run(tmp_path, name, *extra, nproc=2):
    launcher = ranks(nproc) if nproc > 1 else None  # one process: python -m resnet_scale train (the same main)
    out = run_cli(*BASE, "--output-dir", tmp_path, "--run-name", name, *extra, launcher=launcher)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / name
    return {
        "losses": [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"],
        "test": [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "test"],
        "samples": json.loads((run / "samples.json").read_text()) if (run / "samples.json").exists() else None,
        "weights": load_weights(run / "model.safetensors"),
        "summary": json.loads((run / "summary.json").read_text()),
    }


def assert_disjoint_cover(samples, n=96):
    per_rank = samples["epochs"]["0"]
    assert len(per_rank) == samples["world_size"] == 2
    assert all(per_rank), "a rank trained on nothing"
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(n))


@pytest.mark.multiprocess
def test_ddp_shards_every_sample_exactly_once_and_trains(ddp_run):
    assert ddp_run["summary"]["world_size"] == 2 and len(ddp_run["losses"]) == 3
    assert_disjoint_cover(ddp_run["samples"])
    assert ddp_run["test"][-1]["samples"] == 40  # every test image counted once over both ranks
    torch.manual_seed(0)
    untrained = build_resnet("basic", None, layers=(1, 1, 1), num_classes=10).state_dict()
    assert not torch.equal(untrained["fc.weight"], ddp_run["weights"]["fc.weight"])


ENGINES = {
    "zero1": ("--zero-stage", "1"),
    "zero2": ("--zero-stage", "2"),
    "zero3": ("--zero-stage", "3"),
    "zero3-offload": ("--ds-config", str(REPO / "ds_configs" / "zero3_offload.json")),
    "zero3-checkpointing": ("--zero-stage", "3", "--activation-checkpointing", "block"),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("engine", list(ENGINES))
def test_deepspeed_zero_matches_ddp(tmp_path, ddp_run, engine):
    run = train_run(tmp_path, engine, *ENGINES[engine])
    assert run["losses"] == pytest.approx(ddp_run["losses"], abs=1e-4)
    assert_disjoint_cover(run["samples"])
    assert run["test"][-1]["samples"] == 40
    # The consolidated fp32 export loads into a plain model and equals DDP's weights.
    model = build_resnet("basic", None, layers=(1, 1, 1), num_classes=10)
    model.load_state_dict(run["weights"], strict=True)
    for key, value in ddp_run["weights"].items():
        torch.testing.assert_close(run["weights"][key], value, atol=1e-4, rtol=1e-4, msg=key)


@pytest.mark.multiprocess
def test_deepspeed_accumulation_is_not_scaled_twice(tmp_path):
    ddp = train_run(tmp_path, "ddp-acc", "--distributed", "ddp", "--micro-batch-size", "8")
    zero = train_run(tmp_path, "zero2-acc", "--zero-stage", "2", "--micro-batch-size", "8")
    assert ddp["summary"]["memory"]["accumulation_steps"] == 2
    assert zero["losses"] == pytest.approx(ddp["losses"], abs=1e-4)


@pytest.mark.multiprocess
def test_global_batch_invariance_with_sync_bn(tmp_path, ddp_run):
    one = train_run(tmp_path, "one", nproc=1)
    two = train_run(tmp_path, "two-sync", "--sync-bn")
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-4)
    for key in ("layer1.0.bn1.running_mean", "layer1.0.bn1.running_var", "fc.weight"):
        torch.testing.assert_close(two["weights"][key], one["weights"][key], atol=1e-4, rtol=1e-4)
    # Without synchronised statistics each rank normalises its half: the run really differs
    # (ddp_run is that run: the same flags, DDP without --sync-bn).
    assert ddp_run["losses"] != pytest.approx(one["losses"], abs=1e-4)


@pytest.mark.multiprocess
@pytest.mark.parametrize("engine", [("--distributed", "ddp"), ("--zero-stage", "2")])
def test_channels_last_is_what_the_step_uses(tmp_path, engine):
    """With --activation-compression int8 too (it changes only what the backward pass reads, never
    a forward's layout): both ranks end with the same parameters, the losses are finite and the
    exported weights and the checkpoint's state_dict (ZeRO's too) have the plain model's keys."""
    probe = tmp_path / "probe"
    cmd = ranks(2, REPO / "tests" / "workers" / "probe_channels_last.py")
    out = run_cli(probe, *BASE, "--output-dir", tmp_path, "--run-name", "r", "--channels-last",
                  "--activation-compression", "int8", "--checkpoint-every", "3", *engine, launcher=cmd)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = [json.loads(Path(f"{probe}.rank{rank}").read_text()) for rank in (0, 1)]
    for rank in seen:
        assert rank["activations"] and all(rank["activations"]), "an activation was not NHWC"
        if engine[0] == "--distributed":  # DDP: the weights are NHWC too; ZeRO keeps them NCHW by design
            assert all(rank["weights"])
    assert seen[0]["parameters"] == seen[1]["parameters"]
    run = tmp_path / "r"
    assert json.loads((run / "config.json").read_text())["memory"]["activation_compression"] == "int8"
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    plain = sorted(build_resnet("basic", None, layers=(1, 1, 1), num_classes=10).state_dict())
    assert sorted(load_weights(run / "model.safetensors")) == plain
    (checkpoint,) = (run / "checkpoints").iterdir()  # step 3's: the model's state_dict as saved
    if engine[0] == "--distributed":
        assert sorted(load_weights(checkpoint / "model.safetensors")) == plain
    else:
        states = torch.load(checkpoint / "pytorch_model" / "mp_rank_00_model_states.pt", weights_only=False)
        assert sorted(states["module"]) == plain


def _wait_for_listener(port: int, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)


def _process_tree(pid: int) -> list[int]:
    """``pid``'s descendants (Linux /proc): torchrun starts its workers in sessions of their own,
    so neither a signal to the agent's process group nor the agent's death reaches them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        tree += kids
        todo += kids
    return tree


def _launch_two_nodes(out_dir, timeout=180):
    """Two torchrun agents on loopback, each playing one machine (c10d rendezvous, as
    launch/torchrun.sh does). Returns (output of node 0, output of node 1) and the exit codes.

    A failure on one "node" must not look like a hang: torchrun's agent whose workers succeeded
    waits 300 s in its exit barrier for the other agent, which a failed agent never enters (and an
    agent whose peer never joined waits for the rendezvous timeout). So as soon as one agent exits
    non-zero the other is stopped, and both logs are returned. The outputs go to files: two pipes
    read one after the other can fill up and block the agent that is not being read.
    """
    import time

    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    agents, logs = [], [out_dir / "node0.log", out_dir / "node1.log"]
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "two-nodes", str(REPO / "launch" / "train.py"), *BASE,
               "--output-dir", out_dir, "--run-name", "nodes"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(logs[node], "w") as log:
            agents.append(subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, env=env))
        if node == 0:  # node 0 hosts the rendezvous store; node 1 then finds it at once
            _wait_for_listener(port, timeout=60)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(a.poll() is None for a in agents):
        if any(a.poll() not in (None, 0) for a in agents):
            break  # one node failed: the other would only wait
        time.sleep(0.2)
    if any(a.poll() is None for a in agents):
        family = [p for a in agents for p in _process_tree(a.pid)]
        for a in agents:
            if a.poll() is None:
                a.terminate()  # torchrun passes SIGTERM on to its workers
        for a in agents:
            try:
                a.wait(timeout=30)
            except subprocess.TimeoutExpired:
                a.kill()
                a.wait()
        for pid in family:  # workers an agent did not stop would outlive it
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    return [log.read_text() for log in logs], [a.returncode for a in agents]


@pytest.mark.multiprocess
def test_two_nodes_on_loopback(tmp_path):
    outputs, codes = _launch_two_nodes(tmp_path)
    logs = "\n".join(f"--- node {n}:\n{out[-3000:]}" for n, out in enumerate(outputs))
    assert codes == [0, 0], f"exit codes {codes} (negative: stopped, the other node failed or 180 s passed)\n{logs}"
    run = tmp_path / "nodes"
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    assert_disjoint_cover(json.loads((run / "samples.json").read_text()))


# -- refusals, before any process group starts (in-process, fast) -------------------------------


def ds_config_from(tmp_path, payload, *argv):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(payload))
    cfg = parse("--ds-config", str(path), "--batch-size", "64", *argv)
    return build_ds_config(cfg, resolve_memory(cfg, world_size=2, device_type="cpu"), 2)


def test_ds_config_autos_are_filled_from_the_flags(tmp_path):
    filled = ds_config_from(tmp_path, json.load(open(REPO / "ds_configs" / "zero2.json")),
                            "--micro-batch-size", "8", "--precision", "bf16", "--max-grad-norm", "1.5")
    assert filled["train_batch_size"] == 64 and filled["train_micro_batch_size_per_gpu"] == 8
    assert filled["gradient_accumulation_steps"] == 4 and filled["gradient_clipping"] == 1.5
    assert filled["zero_optimization"]["stage"] == 2
    assert filled["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in filled
    def values(node):
        return [x for v in node.values() for x in (values(v) if isinstance(v, dict) else [v])]

    # The bucket sizes are the one "auto" that waits for the model (distributed.accelerator.prepare).
    assert [k for k, v in filled["zero_optimization"].items() if v == "auto"] == ["reduce_bucket_size",
                                                                                 "allgather_bucket_size"]
    size_buckets(filled, 1_234_567)
    assert "_comment" not in filled and "auto" not in values(filled)


def test_auto_buckets_are_the_model_capped_and_a_concrete_size_is_kept(tmp_path):
    """DeepSpeed allocates its reduce buckets at the configured size whatever the model: "auto" (or
    absent) is the parameter count, at most 50M elements; a number given is used as it is; the
    planner counts the same bytes."""
    from resnet_scale.planner.estimate import _comm_bucket_bytes

    resnet50 = build_resnet("bottleneck", 50, num_classes=10)
    n = sum(p.numel() for p in resnet50.parameters())
    zero = {}
    size_buckets({"zero_optimization": zero}, n)
    assert zero == {"reduce_bucket_size": n, "allgather_bucket_size": n} and 2e7 < n < 5e7
    assert _comm_bucket_bytes("deepspeed", 2, 2, n, {"overlap_comm": True}) == 2 * 4 * n  # two fp32 buffers
    huge = {"reduce_bucket_size": "auto", "allgather_bucket_size": 5000}
    size_buckets({"zero_optimization": huge}, 10**9)
    assert huge == {"reduce_bucket_size": BUCKET_CAP, "allgather_bucket_size": 5000} and BUCKET_CAP == 50_000_000
    assert _comm_bucket_bytes("deepspeed", 1, 2, 10**9, {"reduce_bucket_size": 5e8}) == 4 * 500_000_000
    with pytest.raises(ConfigError, match="reduce_bucket_size must be a whole number of elements"):
        ds_config_from(tmp_path, {"zero_optimization": {"stage": 2, "reduce_bucket_size": -3}})


@pytest.mark.parametrize(
    "payload, argv, message",
    [
        ({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}, ("--micro-batch-size", "8"),
         "sets train_micro_batch_size_per_gpu = 16 but --batch-size 64 over 2 processes"),
        ({"train_micro_batch_size_per_gpu": "sixteen"}, (), "must be an integer or \"auto\""),
        ({"zero_optimization": {"stage": 2}}, ("--zero-stage", "3"), "stage = 2 but --zero-stage gives 3"),
        ({"zero_optimization": {"stage": 7}}, (), "must be 0, 1, 2 or 3"),
        ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, (), "casts BatchNorm"),
        ({"zero_optimization": {"stage": 1}}, ("--offload", "optimizer+params"), "needs --zero-stage 3"),
        ({"gradient_accumulation_steps": 3, "zero_optimization": {"stage": 1}}, (), "gradient_accumulation_steps = 3"),
    ],
)
def test_contradicting_or_malformed_ds_configs_are_refused(tmp_path, payload, argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")):
        ds_config_from(tmp_path, payload, *argv)


def test_bad_distributed_flags_exit_before_training(tmp_path, monkeypatch):
    out = run_cli("--zero-stage", "4", "--output-dir", tmp_path)
    assert out.returncode == 2 and "ZeRO stages are 0, 1, 2 and 3" in out.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    out = run_cli("--ds-config", bad, "--output-dir", tmp_path)
    assert out.returncode == 2 and "is not valid JSON" in out.stderr
    assert not (tmp_path / "runs").exists() and [p.name for p in tmp_path.iterdir()] == ["bad.json"]


def test_deepspeed_missing_is_a_clear_error(monkeypatch):
    import importlib.util

    from resnet_scale.distributed.deepspeed import require_deepspeed

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'resnet-scale\[deepspeed\]'"):
        require_deepspeed()


def test_deepspeed_launcher_without_deepspeed_flags_is_refused(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_DEEPSPEED": "true"}
    out = run_cli("--output-dir", tmp_path, "--max-steps", "1", env=env, timeout=120)
    assert out.returncode == 2 and "add --zero-stage N" in out.stderr
