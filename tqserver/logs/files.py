"""Log files named by templates with {date} (a new file each day) and {name}."""

from __future__ import annotations

import collections
import errno
import glob
import os
import re
import time
import weakref
from typing import IO, Callable

DEFAULT_MODE = 0o640  # server.log_file_mode: owner writes, the group (a log shipper) reads


class LogFiles:
    """Every log file this process writes, and the rules they share: the mode a new file
    gets (whatever the umask: twistd's daemon mode sets 077) and how many days of {date}
    files are kept. ``reopen`` closes them all so that each reopens its path at its next
    line (SIGUSR1, after logrotate moved the files away)."""

    def __init__(self) -> None:
        self._open: weakref.WeakSet[DatedLogFile] = weakref.WeakSet()
        self.mode = DEFAULT_MODE
        self.retention_days = 0  # 0: keep every file

    def configure(self, mode: int, retention_days: int) -> None:
        self.mode = mode
        self.retention_days = retention_days

    def add(self, file: DatedLogFile) -> None:
        self._open.add(file)

    def reopen(self) -> int:
        """Close every log file (the next line reopens it by name); how many there are."""
        files = list(self._open)
        for file in files:
            file.close()
        return len(files)


LOG_FILES = LogFiles()


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

    def __init__(self, template: str, clock=time.time, files: LogFiles = LOG_FILES) -> None:
        self.template = template
        self._clock = clock
        self._files = files
        self._file: IO[bytes] | None = None
        self._path: str | None = None
        self._rollover_at = 0.0
        files.add(self)

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
            self._file = open_log(path, self._files.mode)
            if path != self._path and self._files.retention_days:
                prune_dated(self.template, self._files.retention_days, now)
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


def open_log(path: str, mode: int) -> IO[bytes]:
    """``path`` for appending, unbuffered; created with exactly ``mode`` if it is new (an
    existing file keeps its mode: logrotate's ``create`` decides it then)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    try:
        fd = os.open(path, flags | os.O_EXCL, mode)
        os.fchmod(fd, mode)  # not what the umask leaves of it
    except FileExistsError:
        fd = os.open(path, flags, mode)
    return os.fdopen(fd, "ab", buffering=0)


_DATE = "[0-9]" * 4 + "-" + "[0-9]" * 2 + "-" + "[0-9]" * 2


def prune_dated(template: str, days: int, now: float) -> list[str]:
    """Delete the files of a {date} template dated ``days`` or more days before ``now``'s
    date (days=7 keeps today's file and the six before); the paths deleted."""
    if "{date}" not in template or days <= 0:
        return []
    pattern = re.compile(
        re.escape(template).replace(re.escape("{date}"), r"(\d{4}-\d{2}-\d{2})") + r"\Z"
    )
    local = time.localtime(now)
    oldest_kept = time.strftime(
        "%Y-%m-%d",
        time.localtime(
            time.mktime((local.tm_year, local.tm_mon, local.tm_mday - days + 1, 12, 0, 0, 0, 0, -1))
        ),
    )
    deleted = []
    for path in glob.glob(glob.escape(template).replace("{date}", _DATE)):
        match = pattern.match(path)
        if match and match.group(1) < oldest_kept:
            try:
                os.unlink(path)
            except OSError:
                continue  # gone already, or not ours to delete
            deleted.append(path)
    return deleted


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
