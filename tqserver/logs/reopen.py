"""SIGUSR1 reopens every log file, twistd's convention for log rotation: logrotate moves
the files away (``create`` makes new empty ones), its ``postrotate`` sends SIGUSR1, and
the next line goes to a file of the configured name. Lines written between the move and
the signal are in the moved file: none is lost."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import Callable

from twisted.logger import Logger

from tqserver.logs.files import LOG_FILES, LogFiles
from tqserver.signals import SignalService

log = Logger()


class ReopenLogs(SignalService):
    """Handles SIGUSR1 (without a handler the signal's default action would kill the
    process and orphan its workers). ``also`` are told too: the supervisor passes the
    signal on to its proxy processes, which write the server log themselves."""

    name = "reopen-logs"  # type: ignore[assignment]  # Twisted types Service.name as None
    signum = signal.SIGUSR1

    def __init__(
        self,
        reactor,
        files: LogFiles = LOG_FILES,
        also: Sequence[Callable[[], object]] = (),
    ) -> None:
        super().__init__(reactor)
        self.files = files
        self.also = list(also)

    def received(self) -> None:
        self.reopen()

    def reopen(self) -> None:
        count = self.files.reopen()
        for tell in self.also:
            tell()
        # The first line of the new server log (the file reopens for it).
        log.info("SIGUSR1: reopened {count} log files", count=count)
