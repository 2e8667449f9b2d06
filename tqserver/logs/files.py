"""Log files named by templates with {date} (a new file each day) and {name}."""

from __future__ import annotations

import os
import time
from typing import IO


def resolve_template(template: str | None, root: str, name: str = "") -> str | None:
    """Absolute path template for a log file, or None when logging to a file is off."""
    if template is None or template in ("", "~"):
        return None
    safe_name = name.replace("/", "_") or "root"
    path = template.replace("{name}", safe_name)
    return path if os.path.isabs(path) else os.path.join(root, path)


class DatedLogFile:
    """An append-only file whose name carries today's date; at midnight the next write
    opens tomorrow's file. Writes are line-sized and go to the OS page cache."""

    def __init__(self, template: str, clock=time.time) -> None:
        self.template = template
        self._clock = clock
        self._file: IO[bytes] | None = None
        self._path: str | None = None
        self._rollover_at = 0.0

    @property
    def path(self) -> str:
        self._maybe_rotate()
        return self._path  # type: ignore[return-value]

    def _maybe_rotate(self) -> None:
        now = self._clock()
        if self._file is not None and now < self._rollover_at:
            return
        local = time.localtime(now)
        path = self.template.replace("{date}", time.strftime("%Y-%m-%d", local))
        midnight = time.mktime((local.tm_year, local.tm_mon, local.tm_mday + 1, 0, 0, 0, 0, 0, -1))
        self._rollover_at = midnight if "{date}" in self.template else float("inf")
        if path != self._path or self._file is None:
            self.close()
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._file = open(path, "ab", buffering=0)
            self._path = path

    def write(self, data: bytes) -> None:
        self._maybe_rotate()
        self._file.write(data)  # type: ignore[union-attr]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
