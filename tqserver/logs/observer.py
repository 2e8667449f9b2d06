"""The server's log observer: the console unless --quiet, plus the configured file."""

from __future__ import annotations

import sys
from typing import IO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEventAsClassicLogText,
)
from zope.interface import implementer

from tqserver.logs.files import DatedLogFile


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

    def __init__(
        self,
        quiet: bool,
        file_template: str | None,
        level: LogLevel = LogLevel.info,
        console: IO[str] | None = None,
        system: str | None = None,
    ) -> None:
        self._console: TextFileObserver | None = (
            None if quiet else TextFileObserver(console or sys.stdout)
        )
        self._system = system  # names the process in every line (a proxy process)
        self._file: DatedLogFile | None = None
        self._file_observer: TextFileObserver | None = None
        self.set_file(file_template)
        predicate = LogLevelFilterPredicate(defaultLogLevel=level)
        self._filtered = FilteringLogObserver(self._emit, [predicate])

    def set_file(self, template: str | None) -> None:
        if self._file is not None and template == self._file.template:
            return
        if self._file is not None:
            self._file.close()
        self._file = DatedLogFile(template) if template else None
        self._file_observer = TextFileObserver(self._file) if self._file else None

    def _emit(self, event: dict) -> None:
        for observer in self._observers():
            observer(event)

    def _observers(self) -> list[TextFileObserver]:
        return [o for o in (self._console, self._file_observer) if o is not None]

    def __call__(self, event: dict) -> None:
        if self._system is not None and event.get("log_system", "-") == "-":
            event = dict(event, log_system=self._system)
        self._filtered(event)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
