"""Log files named by templates with {date} (a new file each day) and {name}."""

from __future__ import annotations

import collections
import errno
import os
import time
from typing import IO, Callable


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
        view = memoryview(data)
        while view:  # an unbuffered file may take part of it (a disk filling up)
            n = self._file.write(view)  # type: ignore[union-attr]
            if not n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[n:]

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass  # what it could not flush is lost either way


# Lines dropped because their log could not be written, by log ("server", "worker:<name>"),
# since this process started (tqserver_log_lines_dropped_total).
DROPPED_LINES: collections.Counter = collections.Counter()
RETRY_SECONDS = 1.0


class FailSafeLog:
    """A DatedLogFile whose writes never raise. While it cannot be written (a full disk, a
    directory where the file should be, no permission), each line is counted in
    DROPPED_LINES and dropped, with one warning when that starts and one when writing
    resumes; it is tried again (reopened) at most every RETRY_SECONDS. Whoever feeds it
    (a worker's output pipe, the server's log observer) keeps going whatever the disk does."""

    def __init__(
        self,
        template: str,
        label: str,
        warn: Callable[[str], None],
        shown: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.file = DatedLogFile(template, clock=wall)
        self.label = label
        self.shown = shown or template  # how messages name it
        self.warn = warn
        self._clock = clock
        self.error: str | None = None  # why it cannot be written, while it cannot
        self._retry_at = 0.0
        self._dropped_now = 0

    @property
    def template(self) -> str:
        return self.file.template

    def write(self, data: bytes) -> None:
        now = self._clock()
        if self.error is not None and now < self._retry_at:
            self._drop(data)
            return
        try:
            self.file.write(data)
        except (OSError, ValueError) as e:
            self.file.close()
            self._retry_at = now + RETRY_SECONDS
            self._drop(data)
            if self.error is None:
                self.error = f"cannot write {self.shown}: {getattr(e, 'strerror', None) or e}"
                self.warn(f"{self.error}; dropping its lines until it can be written again")
            return
        if self.error is not None:
            self.warn(f"writing {self.shown} again ({self._dropped_now} lines were dropped)")
            self.error = None
            self._dropped_now = 0

    def _drop(self, data: bytes) -> None:
        lines = data.count(b"\n") or 1
        self._dropped_now += lines
        DROPPED_LINES[self.label] += lines

    def close(self) -> None:
        self.file.close()
