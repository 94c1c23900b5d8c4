"""The package version: one place, read by setup.cfg and by every run's environment record."""

__version__ = "0.1.0"
