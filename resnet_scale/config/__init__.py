"""The typed config: one schema of nested dataclasses, the command-line flags derived from it,
the checks that refuse settings which cannot work, and the run-name rule.

* ``schema.py`` -- :class:`Config` and its sections (model, data, optim, memory, distributed,
  train), one docstring per field; ``load_config_file`` reads a YAML/JSON config or a run's
  ``config.json``.
* ``args.py`` -- every field becomes one flag (``--batch-size``), so nothing is listed twice.
* ``checks.py`` -- ``Config.validate()``: each refusal names the numbers and what to change.
* ``values.py`` -- one value read from a flag or a file, typed by its field.
* ``compare.py`` -- which settings a resumed run may change (the run's config is the resume's config).
* ``names.py`` -- what a run folder may be called and the name a run gets by default.
* ``errors.py`` -- :class:`ConfigError`.

This package sits just above ``models`` (it reads the depth table to validate ``--depth``) and
imports nothing else of the package: everything else imports it.
"""

from resnet_scale.config.errors import ConfigError
from resnet_scale.config.schema import (
    AUGMENTS,
    BLOCKS,
    DEVICES,
    NATIVE_IMAGE_SIZE,
    SCHEDULES,
    SOURCES,
    STEMS,
    Config,
    DataConfig,
    DistributedConfig,
    MemoryConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)
from resnet_scale.config.files import load_config_file
from resnet_scale.config.args import add_config_arguments, config_from_args, config_to_argv, flag_name, given_fields
from resnet_scale.config.names import check_run_name, default_run_name
from resnet_scale.config.values import coerce_value

__all__ = [
    "AUGMENTS",
    "BLOCKS",
    "DEVICES",
    "NATIVE_IMAGE_SIZE",
    "SCHEDULES",
    "SOURCES",
    "STEMS",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "MemoryConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "add_config_arguments",
    "check_run_name",
    "coerce_value",
    "config_from_args",
    "config_to_argv",
    "default_run_name",
    "flag_name",
    "given_fields",
    "load_config_file",
]
