"""The control plane's live parts, under the admin path: the status page (``/``), its
stream (``api/stream``), the status snapshot (``api/status``) and a worker's output
(``api/logs/<worker>``). Reserved hands them the requests it has authorized."""

from __future__ import annotations

from tqserver.control import status_page
from tqserver.control.live import LiveStatus
from tqserver.control.reserved import respond, respond_json
from tqserver.control.stream import StatusStream
from tqserver.logs.tail import TAIL_LINES

DEFAULT_LOG_LINES = 100


class LiveAPI:
    def __init__(self, live: LiveStatus, stream: StatusStream) -> None:
        self.live = live
        self.stream = stream

    def answer(self, request, base: str, sub: bytes) -> bool:
        """Answer ``request`` (for ``sub``, its path under the admin ``base``) when it is
        one of these; False for the other admin endpoints."""
        method = request.method
        if sub in (b"", b"index.html") and method in (b"GET", b"HEAD"):
            page = status_page.render(base, self.live.snapshot())
            respond(request, 200, page, b"text/html; charset=utf-8")
        elif sub == b"api/stream" and method == b"GET":
            self.stream.subscribe(request)
        elif sub == b"api/status" and method in (b"GET", b"HEAD"):
            respond_json(request, 200, self.live.snapshot())
        elif sub.startswith(b"api/logs/") and method in (b"GET", b"HEAD"):
            self.logs(request, sub[len(b"api/logs/") :].decode("utf-8", "replace"))
        else:
            return False
        return True

    def logs(self, request, name: str) -> None:
        """A worker's last output lines (``?lines=N``, default 100, at most TAIL_LINES),
        followed as server-sent ``lines`` events with ``?follow=1``."""
        pool = self.live.supervisor.pools.get(name)
        if pool is None:
            respond_json(request, 404, {"error": f"no worker named {name!r}"})
            return
        arg = request.args.get(b"lines", [str(DEFAULT_LOG_LINES).encode()])[0]
        try:
            lines = max(0, min(int(arg), TAIL_LINES))
        except ValueError:
            respond_json(request, 400, {"error": "lines: expected a number"})
            return
        if request.args.get(b"follow", [b""])[0] in (b"1", b"true", b"yes"):
            self.stream.follow_log(pool, request, lines)
        else:
            respond_json(request, 200, {"worker": name, "lines": pool.log_tail.last(lines)})
