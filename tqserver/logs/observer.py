"""The server's log observer: the console unless --quiet, plus the configured file."""

from __future__ import annotations

import sys
from typing import IO, cast

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEventAsClassicLogText,
)
from zope.interface import implementer

from tqserver.logs.files import FailSafeLog


@implementer(ILogObserver)
class TextFileObserver:
    """Writes classic twistd-style lines to a log file or a stream."""

    def __init__(self, sink) -> None:
        self._sink = sink

    def __call__(self, event: dict) -> None:
        text = formatEventAsClassicLogText(event)
        if not text:
            return
        if isinstance(self._sink, FailSafeLog):
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
        self._file: FailSafeLog | None = None
        self._file_observer: TextFileObserver | None = None
        self.set_file(file_template)
        predicate = LogLevelFilterPredicate(defaultLogLevel=level)
        # A plain callable is an ILogObserver to Twisted, not to the type checker.
        self._filtered = FilteringLogObserver(cast(ILogObserver, self._emit), [predicate])

    def set_file(self, template: str | None) -> None:
        if self._file is not None and template == self._file.template:
            return
        if self._file is not None:
            self._file.close()
        # A log file that cannot be written never stops the server, nor is it dropped in
        # silence: the console (or stderr) says so, the lines are counted (tqserver_log_
        # lines_dropped_total{log="server"}), and writing resumes when it can.
        self._file = FailSafeLog(template, "server", self._say) if template else None
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

    @property
    def file_error(self) -> str | None:
        return None if self._file is None else self._file.error

    def _say(self, message: str) -> None:
        """A problem of the log file itself: not through the log (it is what is broken)."""
        stream = self._console._sink if self._console is not None else sys.stderr
        try:
            stream.write(f"tqserver: server log: {message}\n")
            stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
