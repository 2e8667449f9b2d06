"""Server-sent events for live reload (dev): browsers listen on /_tqserver/events and
reload a page when the worker that served it was swapped, its build failed, or a file in
its public/ changed."""

from __future__ import annotations

import json

from twisted.internet import task

HEARTBEAT_SECONDS = 15.0


def live_reload_snippet(worker: str, events_url: str) -> bytes:
    """The script added to dev-mode HTML pages."""
    return (
        "<script>/* TQServer live reload */(function(){if(!window.EventSource)return;"
        f"var w={json.dumps(worker)},s=new EventSource({json.dumps(events_url)});"
        "s.onmessage=function(m){var e;try{e=JSON.parse(m.data)}catch(x){return}"
        "if(e.worker===w||e.worker==='*'){s.close();location.reload()}}})();</script>\n"
    ).encode()


class EventHub:
    """The open event streams, and publishing to them."""

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.clients: set = set()
        self._heartbeat = None
        self.published = 0

    def subscribe(self, request) -> None:
        request.setResponseCode(200)
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/event-stream"])
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
        request.write(b"retry: 500\n\n")
        self.clients.add(request)
        request.notifyFinish().addBoth(lambda _: self.clients.discard(request))
        if self._heartbeat is None:
            self._heartbeat = task.LoopingCall(self._ping)
            self._heartbeat.clock = self.reactor
            self._heartbeat.start(HEARTBEAT_SECONDS, now=False)

    def publish(self, kind: str, worker: str) -> None:
        self.published += 1
        data = b"data: " + json.dumps({"type": kind, "worker": worker}).encode() + b"\n\n"
        self._send(data)

    def _ping(self) -> None:
        if not self.clients:
            self._heartbeat.stop()
            self._heartbeat = None
            return
        self._send(b": ping\n\n")

    def _send(self, data: bytes) -> None:
        for request in list(self.clients):
            if request.finished or request._disconnected:
                self.clients.discard(request)
            else:
                request.write(data)

    def close(self) -> None:
        """End every stream (shutdown)."""
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        self._heartbeat = None
        for request in list(self.clients):
            if not (request.finished or request._disconnected):
                request.finish()
        self.clients.clear()
