"""--compile keeps one static batch shape: a compiled run that crosses an epoch boundary, whose
training split does not divide into batches and whose test split ends in a short batch, compiles ONE
graph (no recompile for the epoch's remainder, no dynamic shapes, no graph for evaluation), and the
training loader leaves out each epoch's partial batch while every test image is still counted.

The run is real (``train()`` in this process, so dynamo's counters are visible); the graphs are
compiled by a recording backend named through RESNET_SCALE_COMPILE_BACKEND (no C++ compile on CPU)."""

import argparse
import json

import pytest
import torch
from accelerate.state import AcceleratorState
from torch._dynamo import register_backend
from torch._dynamo.utils import counters

from resnet_scale.config import add_config_arguments, config_from_args
from resnet_scale.data import DeviceLoader, ImageSet
from resnet_scale.data.imageset import DataError
from resnet_scale.train import train

#: One entry per graph the recording backend compiled: the shapes of its tensor inputs.
GRAPHS: list[list[tuple]] = []


@register_backend(name="resnet_scale_test_recorder")
def _recorder(gm: torch.fx.GraphModule, example_inputs):
    GRAPHS.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
    return gm.forward  # run the captured graph as it is (autograd does the backward)


def _config(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    # 40 training images at batch 16: 2 full batches and a remainder of 8 per epoch; 2 epochs.
    # 20 test images at batch 16: a full batch and a short one of 4.
    argv = ["--data", "synthetic", "--synthetic-train-samples", "40", "--synthetic-test-samples", "20",
            "--layers", "1,1,1", "--image-size", "8", "--batch-size", "16", "--epochs", "2", "--log-every", "1",
            "--tracker", "none", "--record-samples", "--deterministic", "--output-dir", str(tmp_path),
            "--run-name", "compiled", "--compile", *extra]
    return config_from_args(parser.parse_args(argv)).validate()


@pytest.fixture
def compiled_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RESNET_SCALE_COMPILE_BACKEND", "resnet_scale_test_recorder")
    AcceleratorState._reset_state(True)
    torch._dynamo.reset()
    counters.clear()
    GRAPHS.clear()
    try:
        summary = train(_config(tmp_path))
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
        AcceleratorState._reset_state(True)
    return {"summary": summary, "graphs": graphs, "recorded": list(GRAPHS), "stderr": capsys.readouterr().err,
            "folder": tmp_path / "compiled"}


def test_a_compiled_run_across_an_epoch_boundary_compiles_one_static_graph(compiled_run):
    run = compiled_run
    # One graph for the whole run: the training-mode graph of the 16-image batch. The old code compiled
    # a second (dynamic-shape) graph for the epoch's 8-image remainder, and more for evaluation.
    assert run["graphs"] == 1, f"{run['graphs']} graphs compiled: {run['recorded']}"
    assert len(run["recorded"]) == 1 and (16, 3, 8, 8) in run["recorded"][0], run["recorded"]
    assert all(isinstance(d, int) for shape in run["recorded"][0] for d in shape), "dynamic shapes"

    # Each epoch: 2 full batches (the partial one is left out), so 2 epochs are 4 steps.
    summary = run["summary"]
    assert summary["steps"] == 4 and summary["epochs"] == 2
    samples = json.loads((run["folder"] / "samples.json").read_text())["epochs"]
    epochs = [samples[str(e)][0] for e in range(2)]
    assert [len(e) for e in epochs] == [32, 32] and all(len(set(e)) == 32 for e in epochs)
    left_out = [set(range(40)) - set(e) for e in epochs]
    assert left_out[0] != left_out[1], "the same 8 images were left out of both epochs"
    assert "each epoch leaves out 8 of the 40 training images" in run["stderr"]

    # Evaluation (eager, as a compiled run evaluates) counted every test image once, the short batch too.
    tests = [json.loads(line) for line in (run["folder"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in tests if r["split"] == "test"] == [20, 20]

    # The saved weights are the plain model's (no torch.compile "_orig_mod." key prefix): resnet-scale eval
    # builds the model from config.json, loads them and gets the run's final test accuracy.
    from resnet_scale.cli import main
    from resnet_scale.train.run_dir import load_weights

    for name in ("model.safetensors", "model_best.safetensors"):
        assert not [k for k in load_weights(run["folder"] / name) if k.startswith("_orig_mod.")], name
    assert main(["eval", str(run["folder"]), "--device", "cpu"]) == 0
    evaluated = json.loads((run["folder"] / "eval-final.json").read_text())
    assert (evaluated["accuracy"], evaluated["loss"]) == (summary["final_accuracy"], summary["final_test_loss"])


def _images(n: int) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=g),
                    torch.arange(n) % 2, ["a", "b"], (0.5,) * 3, (0.25,) * 3)


def test_drop_last_loader_yields_full_batches_on_every_rank_and_refuses_a_split_smaller_than_a_batch():
    data = _images(21)  # global batch 8 over 2 ranks: 2 full batches, 5 left out
    loaders = [DeviceLoader(data, batch_size=8, rank=r, world_size=2, seed=4, drop_last=True) for r in (0, 1)]
    for epoch in (0, 1):
        for loader in loaders:
            loader.set_epoch(epoch)
        batches = [[x.shape[0] for x, _ in loader] for loader in loaders]
        assert batches == [[4, 4], [4, 4]] and [len(loader) for loader in loaders] == [2, 2]
        seen = torch.cat([torch.cat(loader.epoch_indices()) for loader in loaders])
        assert len(set(seen.tolist())) == 16
    assert loaders[0].num_left_out() == 5
    # Evaluation keeps every sample whatever drop_last says.
    assert sum(len(b) for b in DeviceLoader(data, batch_size=8, train=False, drop_last=True).epoch_indices()) == 21
    with pytest.raises(DataError, match="fewer than one full batch of 32"):
        DeviceLoader(data, batch_size=32, drop_last=True)


def test_compile_is_a_setting_that_changes_the_run():
    """A run resumed with --compile would leave out other batches than the run it continues (and its
    saved position may lie past the end of the shorter epochs): --compile is refused on a resume like
    --batch-size, unless --override compile asks for it."""
    from resnet_scale.config import Config
    from resnet_scale.config.compare import FREE, differences

    assert "memory.compile" not in FREE
    run, now = Config(), Config()
    now.memory.compile = True
    assert [d.name for d in differences(run, now)] == ["memory.compile"]
