"""Log files named by templates with {date} (daily rotation) and {name}, and the server's
log observer (console unless --quiet, plus the configured file)."""
from __future__ import annotations

import os
import sys
import time
from typing import IO, List, Optional

from twisted.logger import (FilteringLogObserver, ILogObserver, LogLevel,
                            LogLevelFilterPredicate, formatEventAsClassicLogText)
from zope.interface import implementer


def resolve_template(template: Optional[str], root: str, name: str = "") -> Optional[str]:
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
        self._file: Optional[IO[bytes]] = None
        self._path: Optional[str] = None
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


@implementer(ILogObserver)
class TextFileObserver:
    """Writes classic twistd-style lines to a DatedLogFile or a stream."""

    def __init__(self, sink) -> None:
        self._sink = sink

    def __call__(self, event: dict) -> None:
        text = formatEventAsClassicLogText(event)
        if not text:
            return
        if isinstance(self._sink, DatedLogFile):
            self._sink.write(text.encode("utf-8", "replace"))
        else:
            self._sink.write(text)
            self._sink.flush()


@implementer(ILogObserver)
class ServerLogObserver:
    """The supervisor's one log observer: console (unless quiet) and the server log file.
    Its file can be swapped when server.yaml changes."""

    def __init__(self, quiet: bool, file_template: Optional[str],
                 level: LogLevel = LogLevel.info, console: Optional[IO[str]] = None,
                 system: Optional[str] = None) -> None:
        self._console: Optional[TextFileObserver] = None if quiet else TextFileObserver(
            console or sys.stdout)
        self._system = system    # names the process in every line (a proxy process)
        self._file: Optional[DatedLogFile] = None
        self._file_observer: Optional[TextFileObserver] = None
        self.set_file(file_template)
        predicate = LogLevelFilterPredicate(defaultLogLevel=level)
        self._filtered = FilteringLogObserver(self._emit, [predicate])

    def set_file(self, template: Optional[str]) -> None:
        if self._file is not None and template == self._file.template:
            return
        if self._file is not None:
            self._file.close()
        self._file = DatedLogFile(template) if template else None
        self._file_observer = TextFileObserver(self._file) if self._file else None

    def _emit(self, event: dict) -> None:
        for observer in self._observers():
            observer(event)

    def _observers(self) -> List[TextFileObserver]:
        return [o for o in (self._console, self._file_observer) if o is not None]

    def __call__(self, event: dict) -> None:
        if self._system is not None and event.get("log_system", "-") == "-":
            event = dict(event, log_system=self._system)
        self._filtered(event)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
