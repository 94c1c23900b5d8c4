"""Finished runs read back from their folders (``config.json``, ``metrics.jsonl``,
``summary.json``, as ``resnet_scale.train.run_dir`` writes them), and grouped by a config key.
Reports are built from these files only: no tracker or network is needed to compare runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json")
#: The summary.json values a report computes with: each a number or null.
SUMMARY_NUMBERS = ("final_accuracy", "best_accuracy", "final_test_loss", "wall_time_s", "images_per_s",
                   "peak_memory_bytes", "num_parameters", "weighted_layers", "epochs", "time_to_target_s")
#: The metrics.jsonl values a report plots: each a number or null (and "split" a string).
RECORD_NUMBERS = ("step", "epoch", "loss", "accuracy", "lr", "images_per_s", "time_s")


class ReportError(ValueError):
    """Input a report cannot be built from; the message names the folder or key and what to do."""


@dataclass
class Run:
    """One finished run: its folder name, the saved config payload, metrics and summary."""

    path: Path
    payload: dict[str, Any]  # config.json: {"config": {sections}, "environment": ..., ...}
    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> dict[str, Any]:
        return self.payload.get("config", {})

    def split(self, name: str) -> list[dict[str, Any]]:
        """The ``metrics.jsonl`` records of one split (``train`` or ``test``), in order."""
        return [r for r in self.records if r.get("split") == name]


def is_run_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as err:
        raise ReportError(f"{path}: cannot read it ({err.strerror}).") from None
    except UnicodeDecodeError as err:
        raise ReportError(f"{path}: not UTF-8 text (byte {err.start}); the file is damaged. Re-run the run, "
                          "or leave its folder out of the report.") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except ValueError as err:
        raise ReportError(f"{path}: cannot read it as JSON ({err}); the file is damaged. Re-run the run, or "
                          "leave its folder out of the report.") from None


def _is_number(value: Any) -> bool:
    return value is None or isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_numbers(where: str, record: Any, keys: tuple[str, ...]) -> None:
    """``record`` is a JSON object whose ``keys`` (those present) hold numbers or null."""
    if not isinstance(record, dict):
        raise ReportError(f"{where} holds {json.dumps(record)[:40]}, not a JSON object; the file is damaged. "
                          "Re-run the run, or leave its folder out of the report.")
    for key in keys:
        if not _is_number(record.get(key)):
            raise ReportError(f"{where}: {key!r} is {json.dumps(record[key])[:40]}, not a number; the file is damaged. "
                              "Re-run the run, or leave its folder out of the report.")
    if not isinstance(record.get("split", ""), str):
        raise ReportError(f"{where}: 'split' is {json.dumps(record['split'])[:40]}, not a string; the file is "
                          "damaged. Re-run the run, or leave its folder out of the report.")


def load_run(path: str | Path) -> Run:
    """Read one run folder; a folder without the run files is a ReportError that names it."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path} is not a folder; give run folders (or an --output-dir holding them).")
    missing = [name for name in RUN_FILES if not (path / name).is_file()]
    if missing:
        what = "not a run folder" if "config.json" in missing else "an unfinished or crashed run"
        raise ReportError(f"{path} is {what}: it has no {', '.join(missing)}. A run folder holds "
                          f"{', '.join(RUN_FILES)} (written by resnet-scale train).")
    records = []
    lines = _read_text(path / "metrics.jsonl").splitlines()
    last = max((i for i, line in enumerate(lines, start=1) if line.strip()), default=0)
    for number, line in enumerate(lines, start=1):
        if line.strip():
            where = f"{path / 'metrics.jsonl'} line {number}"
            try:
                record = json.loads(line)
            except ValueError as err:
                cut = " (the last line is cut: the run was killed while writing it)" if number == last else ""
                raise ReportError(f"{where} is not JSON ({err}); the file is damaged{cut}. Re-run the run, or "
                                  "leave its folder out of the report.") from None
            _check_numbers(where, record, RECORD_NUMBERS)
            records.append(record)
    payload, summary = _read_json(path / "config.json"), _read_json(path / "summary.json")
    if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict):
        raise ReportError(f"{path / 'config.json'} has no \"config\" section; is this a resnet-scale run?")
    _check_numbers(str(path / "summary.json"), summary, SUMMARY_NUMBERS)
    for (section, key), unset in UNSET_MEANS.items():  # one setting, one spelling
        fields = payload["config"].get(section)
        if isinstance(fields, dict) and fields.get(key) is None:
            fields[key] = unset
    return Run(path=path, payload=payload, summary=summary, records=records)


#: Config fields whose unset value (``null``, or absent in a run saved before the field existed)
#: means one setting: read as that setting, so such runs group with the runs that spelled it out.
UNSET_MEANS = {("memory", "activation_compression"): "none"}


def expand_run_dirs(paths: list[str | Path], *, warn=None) -> list[Path]:
    """Run folders as given, an output folder standing for its finished run sub-folders (sorted
    by name; unfinished ones are skipped with a warning). Duplicates are dropped."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise ReportError(f"{path}: no such folder.")
        if is_run_dir(path):
            found = [path]
        else:
            children = sorted(p for p in path.iterdir() if p.is_dir() and is_run_dir(p))
            found = [p for p in children if (p / "summary.json").is_file()]
            for skipped in sorted(set(children) - set(found)):
                if warn:
                    warn(f"skipping {skipped}: no summary.json (unfinished or crashed run)")
            if not found:
                raise ReportError(f"{path} is not a run folder and holds no finished runs "
                                  f"(a run folder holds {', '.join(RUN_FILES)}).")
        out.extend(p for p in found if p.resolve() not in {q.resolve() for q in out})
    if not out:
        raise ReportError("no run folders given.")
    return out


_MISSING = object()


def _walk(tree: Any, parts: list[str]) -> Any:
    for part in parts:
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def config_value(run: Run, key: str) -> Any:
    """The value of ``key`` in a run's config: dotted (``model.block``, ``environment.gpu``) or a
    field name searched across the config sections (``block``, ``depth``, ``precision``). A
    field left unset (``None``) takes its resolved value when the run saved one (e.g. the
    precision that ``--low-memory`` picked)."""
    if "." in key:
        parts = key.split(".")
        value = _walk(run.config, parts)
        if value is _MISSING:
            value = _walk(run.payload, parts)
    else:
        value = _MISSING
        for section in run.config.values():
            if isinstance(section, dict) and key in section:
                value = section[key]
                break
        if value is _MISSING:
            value = run.payload.get(key, _MISSING)
    resolved, last = run.payload.get("memory"), key.split(".")[-1]
    if value is None and isinstance(resolved, dict) and resolved.get(last) is not None:
        value = resolved[last]
    if value is _MISSING:
        fields = sorted(k for s in run.config.values() if isinstance(s, dict) for k in s)
        raise ReportError(f"--group-by {key!r}: run {run.path} has no such config key. Use a field name "
                          f"({', '.join(fields)}) or a dotted path such as model.block.")
    return value


def group_label(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


#: Config fields that name, place or log a run rather than define its experiment: never a
#: reason to put two runs in different groups (the seed above all: groups are over seeds).
RUN_SPECIFIC = frozenset({"seed", "run_name", "output_dir", "tags", "resume", "tracker", "wandb_project",
                          "wandb_entity", "run_group", "log_every", "checkpoint_every", "keep_checkpoints",
                          "num_workers", "download", "data_dir"})


def varying_keys(runs: list[Run]) -> list[str]:
    """The dotted config keys (``model.block``) whose values differ between runs, less the seed
    and the other run-specific fields: what defines the groups by default."""
    keys = sorted({(s, k) for r in runs for s, d in r.config.items() if isinstance(d, dict) for k in d})
    return [f"{s}.{k}" for s, k in keys if k not in RUN_SPECIFIC
            and len({repr(r.config.get(s, {}).get(k)) for r in runs}) > 1]


def group_title(runs: list[Run], key: str | None) -> str:
    """What the groups are by: ``key``, or (``None``) the short names of the varying keys."""
    if key is not None:
        return key
    return ", ".join(k.split(".")[-1] for k in varying_keys(runs)) or "all runs"


def group_runs(runs: list[Run], key: str | None) -> dict[str, list[Run]]:
    """Runs by the value of ``key``, groups in the order they first appear. ``None``: by the whole
    config less the seed (and other run-specific fields), each group labelled by the settings that
    differ between groups only (``basic``; ``max_steps=5`` for a value that is not a name;
    ``block=basic depth=50`` when several settings differ)."""
    keys = [key] if key is not None else varying_keys(runs)
    groups: dict[str, list[Run]] = {}
    for run in runs:
        if not keys:
            label = "all"
        elif len(keys) == 1 and (key is not None or isinstance(config_value(run, keys[0]), str)):
            label = group_label(config_value(run, keys[0]))
        else:
            label = " ".join(f"{k.split('.')[-1]}={group_label(config_value(run, k))}" for k in keys)
        groups.setdefault(label, []).append(run)
    return groups


def measure_time_to_target(run: Run, target: float) -> float | None:
    """Seconds from the start until the first evaluation at or above ``target`` accuracy."""
    for record in run.split("test"):
        if record.get("accuracy") is not None and record["accuracy"] >= target:
            return record.get("time_s")
    return None
