"""The one error type of the config package (a ``ValueError``)."""


class ConfigError(ValueError):
    """A setting, or a combination of settings, that cannot work. The message says what to change."""
