"""A Service that owns one signal while it runs: the work runs on the reactor thread (a
signal handler may interrupt anything), and the handler before it is back once it stops."""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.service import Service


class SignalService(Service):
    """``signum`` arrives as ``received()``, called on the reactor thread."""

    signum: int

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self._previous: Any = None  # the handler before ours (signal.signal's answer)

    def startService(self) -> None:
        Service.startService(self)
        self._previous = signal.signal(self.signum, self._on_signal)

    def stopService(self):
        Service.stopService(self)
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def _on_signal(self, signum, frame) -> None:
        self.reactor.callFromThread(self.received)

    def received(self) -> None:
        raise NotImplementedError


def take_over(reactor, signums, call) -> None:
    """From now on ``signums`` call ``call(name)`` on the reactor thread instead of their
    handler. (Once shutdown began, twistd's own would stop the reactor a second time and
    log a traceback.)"""

    def handler(signum, frame) -> None:
        reactor.callFromThread(call, signal.Signals(signum).name)

    for signum in signums:
        signal.signal(signum, handler)
