"""Many timeouts, one timer.

Every proxied request used to arm and cancel three ``callLater`` timers (the whole-request
read timeout, the idle timeout of the channel, the worker's write timeout): a DelayedCall
object, a heap insertion and a cancellation each. Almost none of them ever fires.
``Deadlines`` keeps a deadline per callback in a dict instead (set and cancel are a dict
store and a dict pop) and one timer sweeps them, so a timeout fires between its deadline
and one ``resolution`` later. The resolution is a quarter of the shortest timeout set so
far (at most 1 s, at least 10 ms): a 30 s timeout fires within 30 to 31 s, a 0.3 s one
within 0.3 to 0.375 s.
"""

from __future__ import annotations

from typing import Callable

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger()

MAX_RESOLUTION = 1.0
MIN_RESOLUTION = 0.01


class Deadlines(Service):
    """Timeouts by callback, swept by one timer; stopping it forgets them all."""

    name = "deadlines"  # type: ignore[assignment]  # Twisted types Service.name as None

    def __init__(self, reactor, resolution: float = MAX_RESOLUTION) -> None:
        self.reactor = reactor
        self.resolution = resolution
        self._due: dict[Callable[[], object], float] = {}
        self._call = None

    def set(self, callback: Callable[[], object], seconds: float) -> None:
        """Call ``callback()`` once ``seconds`` from now, unless cancelled or set again
        first (a callback has one deadline: setting it again moves it)."""
        self._due[callback] = self.reactor.seconds() + seconds
        if seconds < self.resolution * 4:
            self.resolution = max(MIN_RESOLUTION, seconds / 4)
            if self._call is not None and self._call.active():
                self._call.cancel()
                self._call = None
        if self._call is None:
            self._call = self.reactor.callLater(self.resolution, self._sweep)

    def reset(self, callback: Callable[[], object], seconds: float) -> None:
        """Move a pending deadline to ``seconds`` from now; nothing if there is none (it
        fired, or was cancelled)."""
        due = self._due
        if callback in due:
            due[callback] = self.reactor.seconds() + seconds

    def cancel(self, callback: Callable[[], object]) -> None:
        due = self._due
        due.pop(callback, None)
        if not due and self._call is not None:
            # Nothing left to watch (no connection open): no timer either.
            self._call.cancel()
            self._call = None

    def pending(self, callback: Callable[[], object]) -> bool:
        return callback in self._due

    def __len__(self) -> int:
        return len(self._due)

    def _sweep(self) -> None:
        self._call = None
        now = self.reactor.seconds()
        due = self._due
        for callback in [cb for cb, when in due.items() if when <= now]:
            when = due.get(callback)
            if when is not None and when <= now:  # an earlier callback may have moved it
                del due[callback]
                try:
                    callback()
                except Exception:
                    log.failure("timeout callback {callback!r} failed", callback=callback)
        if due and self._call is None:
            self._call = self.reactor.callLater(self.resolution, self._sweep)

    def stopService(self) -> None:
        Service.stopService(self)
        self.stop()

    def stop(self) -> None:
        """Forget every deadline and the timer (for shutdown and tests)."""
        self._due.clear()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
