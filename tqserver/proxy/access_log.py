"""AccessLog: what the proxy records of each finished request."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from twisted.logger import Logger

if TYPE_CHECKING:
    from tqserver.proxy.state import ProxyState

access_log = Logger(namespace="tqserver.access")


class RequestCounter(Protocol):
    def observe_request(self, worker: str, code: int, seconds: float) -> None: ...


class AccessLog:
    """One access-log line per request (when server.access_log; README: "Health, status,
    metrics") and its figures for the request metrics (``stats``), from Site.log."""

    def __init__(self, state: ProxyState, stats: RequestCounter, reactor) -> None:
        self.state = state
        self.stats = stats
        self.reactor = reactor

    def __call__(self, request) -> None:
        now = self.reactor.seconds()
        started = getattr(request, "started_at", now)
        seconds = now - started
        pool = request.worker_pool
        worker = pool.name if pool is not None else "-"
        fwd = request.forward
        instance = getattr(fwd, "instance_id", None) or "-"
        code = request.code
        self.stats.observe_request(worker, code, seconds)
        if self.state.config.server.access_log:
            access_log.info(
                '{client} "{method} {path} {proto}" {code} {size} {ms:.1f}ms worker={worker} '
                "instance={instance} rid={rid}",
                client=request.client_ip,
                method=request.method.decode("latin-1"),
                path=request.uri.decode("latin-1"),
                proto=request.clientproto.decode("latin-1"),
                code=code,
                size=request.sentLength,
                ms=seconds * 1000,
                worker=worker,
                instance=instance,
                rid=request.request_id.decode("latin-1"),
            )
