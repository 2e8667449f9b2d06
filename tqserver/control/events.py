"""Server-sent events for live reload (dev): browsers listen on /_tqserver/events and
reload a page when the worker that served it was swapped, its build failed, or a file in
its public/ changed. (The script that listens is proxy.pages.live_reload_snippet.)"""

from __future__ import annotations

import json

from twisted.application.service import Service
from twisted.internet import task

from tqserver.supervise.events import PoolEvent

HEARTBEAT_SECONDS = 15.0


class EventHub(Service):
    """The open event streams, and publishing to them. A pool listener of the Supervisor
    (``pool_changed``); stopping it ends every stream."""

    name = "events"  # type: ignore[assignment]  # Twisted types Service.name as None

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.clients: set = set()
        self._heartbeat: task.LoopingCall | None = None
        self.published = 0

    def subscribe(self, request) -> None:
        request.setResponseCode(200)
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/event-stream"])
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
        request.write(b"retry: 500\n\n")
        self.clients.add(request)
        request.notifyFinish().addBoth(lambda _: self.clients.discard(request))
        if self._heartbeat is None:
            heartbeat = self._heartbeat = task.LoopingCall(self._ping)
            heartbeat.clock = self.reactor
            heartbeat.start(HEARTBEAT_SECONDS, now=False)

    def pool_changed(self, pool, event: PoolEvent) -> None:
        """What a page served by ``pool`` reloads on."""
        if event is PoolEvent.SWAP:
            self.publish("swap", pool.name)
        elif (event is PoolEvent.ERROR and pool.build_error) or event is PoolEvent.START_FAILED:
            self.publish("build-failed", pool.name)  # the page shows the output
        elif event is PoolEvent.PUBLIC_CHANGED:
            self.publish("public", pool.name)
        elif event is PoolEvent.CONFIG_ERROR:
            self.publish("config", pool.name)  # the page shows (or drops) the banner

    def publish(self, kind: str, worker: str) -> None:
        self.published += 1
        data = b"data: " + json.dumps({"type": kind, "worker": worker}).encode() + b"\n\n"
        self.send(data)

    def _ping(self) -> None:
        if not self.clients:
            if self._heartbeat is not None:
                self._heartbeat.stop()
            self._heartbeat = None
            return
        self.send(b": ping\n\n")

    def send(self, data: bytes) -> None:
        """Write ``data`` (whole server-sent events) to every open stream."""
        for request in list(self.clients):
            if request.finished or request.disconnected:
                self.clients.discard(request)
            else:
                request.write(data)

    def stopService(self) -> None:
        Service.stopService(self)
        self.close()

    def close(self) -> None:
        """End every stream (shutdown)."""
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        self._heartbeat = None
        for request in list(self.clients):
            if not (request.finished or request.disconnected):
                request.finish()
        self.clients.clear()
