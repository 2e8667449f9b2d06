"""Configuration errors and warnings, each naming file:line:column and the dotted key."""

from __future__ import annotations

import os
from typing import Optional

import attrs

Position = tuple[Optional[int], Optional[int]]


def _format(file, line, column, key, message) -> str:
    """file:line:column: key: message, leaving out what is unknown."""
    loc = [str(file)] if file else []
    if line is not None:
        loc.append(str(line))
        if column is not None:
            loc.append(str(column))
    parts = [":".join(loc)] if loc else []
    if key:
        parts.append(key)
    parts.append(message)
    return ": ".join(parts)


class ConfigError(Exception):
    """An invalid configuration; positions are 1-based so editors can jump to them."""

    def __init__(
        self,
        message: str,
        file: str | None = None,
        line: int | None = None,
        column: int | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.column = column
        self.key = key

    def __str__(self) -> str:
        return _format(self.file, self.line, self.column, self.key, self.message)

    def __repr__(self) -> str:
        return f"ConfigError({str(self)!r})"

    def relative_to(self, root: str) -> ConfigError:
        """The same error naming its file relative to ``root`` (for /health: no absolute
        paths shown to whoever asks)."""
        file = os.path.relpath(self.file, root) if self.file else None
        return ConfigError(self.message, file, self.line, self.column, self.key)


@attrs.frozen
class ConfigWarning:
    """Something that loads but is probably a mistake (an unknown key)."""

    file: str | None
    line: int | None
    column: int | None
    key: str | None
    message: str

    def __str__(self) -> str:
        return _format(self.file, self.line, self.column, self.key, self.message)
