"""What a finished run leaves in its trackers: the weights as a W&B model artifact (offline run
files read back) and the hyperparameters with the final metrics in TensorBoard's event files."""

import json
import os
import sys
from pathlib import Path

import pytest

from resnet_scale.tracking.offline import find_offline_runs, read_offline_run


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_a_run_sends_its_weights_as_a_wandb_artifact_and_its_hparams_to_tensorboard(tmp_path):
    """A real tiny run with --tracker wandb,tensorboard (wandb alone where tensorboard is not installed):
    the offline W&B run holds a model artifact whose files are the run's final and best weights, and
    TensorBoard's event files hold the hyperparameters with the final metrics."""
    import hashlib
    import importlib.util

    pytest.importorskip("wandb")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train_e2e import run_cli

    has_tb = importlib.util.find_spec("tensorboard") is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", **{v: str(tmp_path / "home") for v in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR",
                                                                            "WANDB_DATA_DIR")})
    out = run_cli("--data", "synthetic", "--synthetic-classes", "2", "--layers", "1,1,1", "--image-size", "8",
                  "--synthetic-train-samples", "32", "--synthetic-test-samples", "16", "--batch-size", "16",
                  "--epochs", "2", "--device", "cpu", "--tracker", "wandb,tensorboard" if has_tb else "wandb",
                  "--output-dir", tmp_path, "--run-name", "a", env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "a"
    summary = json.loads((run / "summary.json").read_text())
    (offline,) = find_offline_runs(run)
    stored = read_offline_run(offline)
    (artifact,) = stored["artifacts"]
    assert artifact["type"] == "model" and artifact["name"] == f"model-{summary['tracker_run_id']}"
    weights = sorted(p.name for p in run.glob("model*.safetensors"))
    assert weights == ["model.safetensors", "model_best.safetensors"]  # the best of 2 evaluations exists
    assert sorted(artifact["files"]) == weights and set(artifact["aliases"]) >= {"final", "best"}
    for name, entry in artifact["files"].items():  # the bytes `wandb sync` uploads are the run's weights
        data = (run / name).read_bytes()
        assert entry["size"] == len(data) and entry["md5"] == hashlib.md5(data).hexdigest()
        assert _sha256(entry["local_path"]) == _sha256(run / name)
    assert artifact["metadata"]["final_accuracy"] == summary["final_accuracy"]
    assert stored["metrics"]["test/*"] == "epoch" and stored["summary"]["steps"] == summary["steps"]
    if not has_tb:
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert hparams["model.layers"] == "1,1,1" and hparams["train.batch_size"] == 16
    assert hparams["train.tracker"] == "wandb,tensorboard"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} >= {"hparam/final_accuracy", "hparam/best_accuracy"}
    final = events.Scalars("hparam/final_accuracy")
    assert [e.value for e in final] == [pytest.approx(summary["final_accuracy"])]
    assert [e.step for e in events.Scalars("test/accuracy")] and "train/loss" in events.Tags()["scalars"]
