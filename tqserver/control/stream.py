"""Live streams of the control plane, as server-sent events: the status page's (and
``tqserver top``'s) snapshots, and a worker's output for ``tqserver logs -f``.

The status stream sends a ``status`` event with a whole LiveStatus snapshot every
PUSH_SECONDS while anyone listens, and one more shortly after anything happens to a pool
(a swap, a crash, a build), so a reload shows at once rather than at the next tick. Its
subscribers and heartbeat are an EventHub's."""

from __future__ import annotations

import json

from twisted.application.service import Service
from twisted.internet import task

from tqserver.control.events import EventHub
from tqserver.control.live import LiveStatus
from tqserver.supervise.events import PoolEvent

PUSH_SECONDS = 1.0
SOON_SECONDS = 0.05  # pool events within this are one push

# What is worth an early push: what changes what the page shows.
PUSHED_EVENTS = frozenset(PoolEvent) - {PoolEvent.PROBE_OK}


def event(kind: str, data) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class StatusStream(Service):
    """The ``status`` event stream. A pool listener of the Supervisor (``pool_changed``)."""

    name = "status-stream"  # type: ignore[assignment]  # Twisted types Service.name as None

    def __init__(self, reactor, live: LiveStatus | None = None) -> None:
        self.reactor = reactor
        self.live = live  # set before it starts (tap.makeService: it listens to the pools
        # the LiveStatus reads, so it exists before the Supervisor)
        self.hub = EventHub(reactor)
        self._loop: task.LoopingCall | None = None
        self._soon = None
        self.log_streams: set[EventHub] = set()

    def subscribe(self, request) -> None:
        assert self.live is not None
        self.hub.subscribe(request)
        request.write(event("status", self.live.snapshot()))
        if self._loop is None:
            loop = self._loop = task.LoopingCall(self.push)
            loop.clock = self.reactor
            loop.start(PUSH_SECONDS, now=False)

    def push(self) -> None:
        if not self.hub.clients:
            self._stop_loop()
            return
        assert self.live is not None
        self.hub.send(event("status", self.live.snapshot()))

    def pool_changed(self, pool, what: PoolEvent) -> None:
        if what not in PUSHED_EVENTS or not self.hub.clients:
            return
        self.hub.send(event("pool", {"worker": pool.name, "event": str(what)}))
        if self._soon is None or not self._soon.active():
            self._soon = self.reactor.callLater(SOON_SECONDS, self.push)

    def _stop_loop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def stopService(self):
        Service.stopService(self)
        self._stop_loop()
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self.hub.close()
        for hub in list(self.log_streams):
            hub.close()

    def follow_log(self, pool, request, lines: int) -> None:
        """``pool``'s last ``lines`` output lines, then each new batch, as ``lines`` events
        on ``request`` until the client goes away or the server stops."""
        hub = EventHub(self.reactor)
        hub.subscribe(request)
        request.write(event("lines", pool.log_tail.last(lines)))
        stop = pool.log_tail.follow(lambda new: hub.send(event("lines", new)))
        self.log_streams.add(hub)

        def ended(_):
            stop()
            self.log_streams.discard(hub)
            hub.close()

        request.notifyFinish().addBoth(ended)
