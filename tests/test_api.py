"""The public Python API: what ``import resnet_scale`` exports (and imports), what ``help()`` shows,
and docs/api.md, whose every Python code block runs here exactly as written."""

from __future__ import annotations

import inspect
import math
import pydoc
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import resnet_scale

ROOT = Path(__file__).resolve().parents[1]
API_DOC = ROOT / "docs" / "api.md"
API = ["build_resnet", "Config", "train", "plan", "apply_plan", "estimate_memory", "estimate_activation_bytes",
       "apply_activation_checkpointing", "apply_channels_last", "apply_sync_batchnorm",
       "measure_saved_activation_bytes"]
OPTIONAL = ("accelerate", "deepspeed", "fairscale", "wandb", "datasets", "sklearn", "matplotlib", "transformers")


def test_import_resnet_scale_imports_nothing_heavy():
    """Each public name is imported on first use: ``import resnet_scale`` loads neither torch nor
    Accelerate nor any optional dependency (tests/test_data.py and tests/test_train_e2e.py check
    that using the package needs no optional dependency)."""
    code = f"import sys, resnet_scale; print(sorted(m for m in ('torch', *{OPTIONAL!r}) if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_all_and_help_list_the_api_each_with_a_docstring():
    assert sorted(resnet_scale.__all__) == sorted(["__version__", *API])
    text = pydoc.render_doc(resnet_scale, renderer=pydoc.plaintext)
    for name in API:
        obj = getattr(resnet_scale, name)
        assert inspect.getdoc(obj), f"{name} has no docstring"
        if name == "train":  # the package resnet_scale.train, callable as its train() function
            assert "train (package)" in text
            assert resnet_scale.train is sys.modules["resnet_scale.train"]
            assert list(inspect.signature(resnet_scale.train).parameters)[0] == "cfg"
            assert "summary" in inspect.getdoc(resnet_scale.train.train)
        elif inspect.isclass(obj):
            assert f"class {name}(" in text, name
        else:
            assert re.search(rf"^    {name}\(", text, re.M), f"help(resnet_scale) does not show {name}()"
    star: dict = {}
    exec("from resnet_scale import *", star)  # every name of __all__ resolves
    assert set(API) <= set(star)
    from resnet_scale import train

    assert callable(train) and train is resnet_scale.train


def test_import_forms_of_the_train_package_still_work():
    import resnet_scale.train.setup as setup  # noqa: F401  (the package, not the function, is the attribute)
    from resnet_scale.train import evaluate, train

    assert setup.__name__ == "resnet_scale.train.setup" and callable(evaluate) and inspect.isfunction(train)


# ----------------------------------------------------------------------------- docs/api.md


def doc_blocks() -> dict[str, str]:
    """The ```python blocks of docs/api.md, by the heading of their section."""
    blocks, heading = {}, None
    for part in re.split(r"^(## [^\n]*|```python\n.*?^```)$", API_DOC.read_text(), flags=re.M | re.S):
        if part.startswith("## "):
            heading = part[3:].strip()
        elif part.startswith("```python"):
            assert heading not in blocks, f"two code blocks under {heading!r}"
            blocks[heading] = part[len("```python\n"):-len("```")]
    return blocks


def run_block(heading: str) -> dict:
    """Run the block of section ``heading`` exactly as written; returns its namespace."""
    code = doc_blocks()[heading]
    namespace: dict = {"__name__": "__main__"}
    exec(compile(code, f"docs/api.md ({heading})", "exec"), namespace)
    return namespace


def test_every_code_block_of_the_api_doc_is_run_here():
    assert list(doc_blocks()) == [h for h in SECTIONS]


@pytest.fixture
def fresh_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_doc_train_twice(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns = run_block(SECTIONS[0])
    for name in ("fp32", "bf16"):
        assert (tmp_path / "runs" / name / "summary.json").is_file()
        assert (tmp_path / "runs" / name / "model.safetensors").is_file()
    assert ns["summary"]["steps"] == 4 and ns["summary"]["memory"]["precision"] == "fp32"
    assert capsys.readouterr().out.splitlines()[-1] == "bf16"


def test_doc_estimate_and_plan(capsys):
    ns = run_block(SECTIONS[1])
    gib2 = 2 * 2**30
    assert ns["estimate"].total > gib2  # as given it does not fit: the plan changes something
    assert ns["p"].fits and ns["p"].predicted_peak_bytes <= gib2 and ns["p"].flags
    assert ns["cfg"].memory.precision == ns["p"].settings["precision"]
    assert "predicted peak" in capsys.readouterr().out


def test_doc_own_loop_torchvision_resnet50_accelerate_checkpointing_channels_last_bf16(fresh_accelerate, capsys):
    from resnet_scale.memory import applied_checkpointing

    ns = run_block(SECTIONS[2])
    model = ns["accelerator"].unwrap_model(ns["model"])
    assert type(model).__module__ == "torchvision.models.resnet"
    assert applied_checkpointing(model)["policy"] == "block"
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert ns["accelerator"].mixed_precision == "bf16"
    assert 0 < ns["after"] < ns["before"]
    assert model.layer1[0].bn1.num_batches_tracked.item() == ns["STEPS"] == 2  # counted once per step
    out = capsys.readouterr().out
    assert "step 1: loss" in out and math.isfinite(ns["loss"].item())
    assert out.splitlines()[-1] == "2"


def test_doc_activation_memory_of_any_model(capsys):
    run_block(SECTIONS[3])
    plain, saved, peak = [float(x) for line in capsys.readouterr().out.splitlines() for x in line.split()]
    assert plain == pytest.approx(20.5, abs=0.05)  # 81.9 MiB per image (docs/memory.md)
    assert 0 < peak < saved < plain / 2


SECTIONS = ["Train from Python: `Config` and `train()`",
            "Predict memory and plan: `estimate_memory()` and `plan()`",
            "Your own loop: torchvision's ResNet-50, Accelerate, checkpointing, channels_last, bf16",
            "Activation memory of any model: `measure_saved_activation_bytes()` and `estimate_activation_bytes()`"]
