"""What supervising a child process takes, for worker instances (Instance, WorkerPool) and
proxy processes (fleet.parent) alike: stopping it (a graceful signal, SIGKILL if it does
not go in time) and starting another after it died, not too soon (Backoff)."""

from __future__ import annotations

import signal
from typing import Any, Callable, Union

from twisted.logger import Logger

log = Logger()

STABLE_SECONDS = 10.0  # a run this long resets the backoff

Signal = Union[int, str]  # what the sender takes: a number, or a name ("TERM")


class Stopper:
    """Stops one process: ``stop`` sends the graceful signal, then SIGKILL after the
    timeout unless ``ended`` is called first (the process exited). Stopping twice sends
    nothing more. ``send(signal)`` signals the process (or its process group)."""

    def __init__(self, reactor, send: Callable[[Any], object], what: str) -> None:
        self.reactor = reactor
        self.send = send
        self.what = what  # for the log line: "instance app#1 of app"
        self._kill_call = None

    def stop(self, graceful: Signal, timeout: float) -> None:
        if self._kill_call is None:
            self.send(graceful)
            self._kill_call = self.reactor.callLater(timeout, self.kill)

    def kill(self) -> None:
        """SIGKILL now (the timeout ran out)."""
        self._kill_call = None
        log.warn("{what} did not stop in time: SIGKILL", what=self.what)
        self.send(signal.SIGKILL)

    def ended(self) -> None:
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._kill_call = None


class Backoff:
    """How long to wait before starting again what died: doubling from ``low`` up to
    ``high`` with each death in a row, from ``low`` again after a run of STABLE_SECONDS,
    so a crash loop neither spins nor leaves a one-off crash waiting long."""

    def __init__(self, stable_seconds: float = STABLE_SECONDS) -> None:
        self.stable_seconds = stable_seconds
        self.delay = 0.0

    def died(self, ran_for: float | None) -> None:
        """It died after running ``ran_for`` seconds (None: it never became ready)."""
        if ran_for is not None and ran_for >= self.stable_seconds:
            self.delay = 0.0

    def next(self, low: float, high: float) -> float:
        """The delay before the next start, in seconds."""
        self.delay = min(high, max(low, self.delay * 2))
        return self.delay
