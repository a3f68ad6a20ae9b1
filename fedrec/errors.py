"""The error every invalid setting raises, shared by all configuration modules."""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range; the message names it."""


def check_setting(condition: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"setting '{key}': {message}")
