"""Read an offline W&B run (``<run_dir>/wandb/offline-run-*/run-<id>.wandb``) without the network:
what config, summary and history ``wandb sync`` would upload. Used to check what a run sends
(tests, and anyone who wants to look before syncing).

The ``.wandb`` file is W&B's record log: a 7-byte header (``:W&B``, magic, version), then
32 KiB blocks of chunks, each with a 7-byte header (CRC32, length, type: full/first/middle/last),
holding serialised ``wandb_internal_pb2.Record`` messages (the LevelDB log format).
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def find_offline_runs(run_dir: str | Path) -> list[Path]:
    """The offline W&B runs under ``<run_dir>/wandb`` (folders ``offline-run-<time>-<id>``)."""
    return sorted(p for p in (Path(run_dir) / "wandb").glob("offline-run-*") if p.is_dir())


def _records(data: bytes):
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (no :W&B header)")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        pos += _HEADER
        chunk, pos = data[pos:pos + length], pos + length
        if kind in (_FULL, _FIRST):
            pending = chunk
        elif kind in (_MIDDLE, _LAST):
            pending += chunk
        else:
            continue
        if kind in (_FULL, _LAST):
            yield pending
            pending = b""


def _apply(target: dict[str, Any], item) -> None:
    keys = list(item.nested_key) or [item.key]
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = json.loads(item.value_json)


def read_offline_run(path: str | Path) -> dict[str, Any]:
    """``{"run_id", "project", "group", "name", "tags", "config", "summary", "history", "metrics",
    "artifacts"}`` of one offline run folder (or its ``.wandb`` file). ``metrics``: the
    ``define_metric`` calls, ``{name or glob: step_metric}``. ``artifacts``: each logged artifact as
    ``{"name", "type", "aliases", "metadata", "files"}``, ``files`` mapping each entry's name to
    ``{"size", "md5"`` (hex)``, "local_path"}`` (the file ``wandb sync`` uploads)."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("run-*.wandb"))
        if not files:
            raise FileNotFoundError(f"{path} holds no run-*.wandb file")
        path = files[0]
    out: dict[str, Any] = {"config": {}, "summary": {}, "history": [], "metrics": {}, "artifacts": []}
    for raw in _records(path.read_bytes()):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(run_id=run.run_id, project=run.project, group=run.run_group,
                       name=run.display_name, tags=list(run.tags))
            for item in run.config.update:
                _apply(out["config"], item)
        elif kind == "config":
            for item in record.config.update:
                _apply(out["config"], item)
        elif kind == "summary":
            for item in record.summary.update:
                _apply(out["summary"], item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _apply(row, item)
            out["history"].append(row)
        elif kind == "metric":
            metric = record.metric
            out["metrics"][metric.name or metric.glob_name] = metric.step_metric or None
        elif kind == "artifact":
            out["artifacts"].append(_artifact(record.artifact))
    out["config"].pop("_wandb", None)
    return out


def _artifact(artifact) -> dict[str, Any]:
    files = {entry.path: {"size": entry.size, "md5": base64.b64decode(entry.digest).hex(),
                          "local_path": entry.local_path or None}
             for entry in artifact.manifest.contents}
    return {"name": artifact.name, "type": artifact.type, "aliases": list(artifact.aliases),
            "metadata": json.loads(artifact.metadata) if artifact.metadata else {}, "files": files}
