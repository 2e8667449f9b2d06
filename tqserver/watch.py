"""Where reloads come from: SIGHUP (both modes). The dev-mode inotify watcher joins it here."""
from __future__ import annotations

import signal
from typing import Callable

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger()


class HangupReload(Service):
    """SIGHUP → ``reload("SIGHUP")`` on the reactor thread. Signals arriving while a
    reload runs are not lost: the pools queue and coalesce the deploys they cause."""

    def __init__(self, reactor, reload: Callable[[str], None]) -> None:
        self.reactor = reactor
        self.reload = reload
        self._previous = None

    def startService(self) -> None:
        Service.startService(self)
        self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self):
        Service.stopService(self)
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _on_signal(self, signum, frame) -> None:
        self.reactor.callFromThread(self.reload, "SIGHUP")
