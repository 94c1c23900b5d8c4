"""The run-name rule: what a run folder may be called, and the name a run gets when none is given.

Both the config checks (``--run-name`` is refused before anything starts) and the run folder
(``train/run_dir.py``) use it, so it lives here, below both.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

from resnet_scale.config.errors import ConfigError

if TYPE_CHECKING:
    from resnet_scale.config.schema import Config

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,127}$")


def check_run_name(name: str) -> str:
    """A run name is one path component: it cannot escape ``--output-dir``."""
    if not _RUN_NAME.match(name) or name in (".", ".."):
        raise ConfigError(
            f"--run-name {name!r} is not allowed: use 1-128 letters, digits and . _ + = - "
            "(no slashes, no leading dot), so the run stays inside --output-dir."
        )
    return name


def default_run_name(cfg: Config, suffix: str | None = None) -> str:
    """``<arch>-<data>-s<seed>-<suffix>``; the suffix is the start time unless one is given."""
    layers = cfg.model.layers
    arch = f"{cfg.model.block}-{'x'.join(map(str, layers))}" if layers else f"{cfg.model.block}{cfg.model.depth}"
    return f"{arch}-{cfg.data.source}-s{cfg.train.seed}-{suffix or time.strftime('%Y%m%d-%H%M%S')}"
