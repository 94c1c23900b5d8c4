"""The docs match the code, and the repository stands alone.

* docs/architecture.md names every package of ``resnet_scale/`` (a folder with ``__init__.py``)
  and names no package that does not exist.
* No file a user of the package reads (the code, the docs, the README, the launch files, the
  benchmarks, the tests) points at a document or folder outside this repository. docs/results/ holds the
  files of real runs as they were written and is not checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "resnet_scale"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# Built from pieces so that this file does not contain them itself.
OUTSIDE = ("DESIGN" + ".md", "FIELD" + "_NOTES", "first" + " user", "../" + "shared")
CHECKED = ("resnet_scale", "docs", "README.md", "launch", "benchmarks", "ds_configs", "setup.cfg", "tests")
SKIPPED = (ROOT / "docs" / "results",)
TEXT_SUFFIXES = {".py", ".md", ".sh", ".sbatch", ".yaml", ".yml", ".json", ".cfg", ".toml", ".txt", ".html", ""}


def packages() -> set[str]:
    return {p.parent.name for p in PACKAGE.glob("*/__init__.py")}


def test_architecture_names_every_package():
    text = ARCHITECTURE.read_text()
    named = set(re.findall(r"resnet_scale/(\w+)/", text))
    missing = sorted(packages() - named)
    assert not missing, f"docs/architecture.md does not describe resnet_scale/{missing[0]}/ (add a paragraph)"


def test_architecture_names_no_missing_package():
    text = ARCHITECTURE.read_text()
    named = set(re.findall(r"resnet_scale/(\w+)/", text))
    gone = sorted(named - packages())
    assert not gone, f"docs/architecture.md names resnet_scale/{gone[0]}/, which is not a package"


def test_architecture_states_the_checked_import_order():
    """The order written in docs/architecture.md is the one tests/test_architecture.py enforces."""
    try:
        from test_architecture import LEVELS
    except ImportError:
        from tests.test_architecture import LEVELS

    line = next(l for l in ARCHITECTURE.read_text().splitlines() if l.startswith("models < "))
    written = {}
    for level, part in enumerate(line.split("<")):
        for name in re.findall(r"\w+", part):
            written[name] = level
    assert written == LEVELS


def _files(top: Path):
    if top.is_file():
        yield top
        return
    for path in sorted(top.rglob("*")):
        if (path.is_file() and path.suffix in TEXT_SUFFIXES and "__pycache__" not in path.parts
                and not any(path.is_relative_to(s) for s in SKIPPED)):
            yield path


def _hits(top: Path, root: Path = ROOT) -> list[str]:
    """``path:line: 'word'`` for every mention of something outside the repository under ``top``."""
    found = []
    for path in _files(top):
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            found += [f"{path.relative_to(root)}:{n}: {word!r}" for word in OUTSIDE if word in line]
    return found


@pytest.mark.parametrize("top", CHECKED)
def test_repository_is_self_contained(top):
    """Say the fact in the project's own words instead of citing a document a user does not have."""
    hits = _hits(ROOT / top)
    assert not hits, "points outside the repository (say the fact itself):\n" + "\n".join(hits)


def test_the_self_containment_check_sees_a_mention(tmp_path):
    (tmp_path / "notes.md").write_text("as " + OUTSIDE[1] + ".md says\n")
    (tmp_path / "fine.md").write_text("nothing to see\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG" + OUTSIDE[0].encode())  # not a text file: not read
    assert _hits(tmp_path, tmp_path) == [f"notes.md:1: {OUTSIDE[1]!r}"]
