"""Reading a config file: YAML or JSON, nested by section, or a run's ``config.json``."""

from __future__ import annotations

import json
from pathlib import Path

from resnet_scale.config.errors import ConfigError
from resnet_scale.config.schema import Config


def load_config_file(path: str | Path, base: Config | None = None) -> Config:
    """Read a YAML or JSON config (nested by section, as ``config.json`` of a run). Every problem
    with the file is one ConfigError line that names it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file.")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise ConfigError(f"--config {path}: cannot read it ({reason}).") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            raw = json.loads(text)
    except Exception as err:  # the parser's own message says where; on one line
        kind = path.suffix.lstrip(".").upper() or "JSON"
        raise ConfigError(f"--config {path} is not valid {kind}: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path} must hold a mapping of sections (model, data, optim, train).")
    if "config" in raw:  # a run's config.json wraps it (beside the environment, memory plan ...)
        raw = raw["config"]
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {path}: 'config' must be a mapping of sections, got {raw!r}.")
    try:
        return Config.from_dict(raw, base)
    except ConfigError as err:
        raise ConfigError(f"--config {path}: {err}") from None
