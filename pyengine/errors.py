"""An error about one setting. It carries the setting's name, so that the command line can name
the flag (``--min-heads``) where the library names the field (``min_heads``)."""
from __future__ import annotations

__all__ = ["SettingError"]


class SettingError(ValueError):
    """A bad value of setting ``setting``; the message starts with the setting's name."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting
