"""Health: probing instances (a LoopingCall HealthChecker, with treq) and the aggregated
answer served at /health."""
from __future__ import annotations

from typing import Callable, Iterable, Tuple

import treq
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from . import fastcgi
from .process import Instance
from .runtimes import HTTP_PROBE

log = Logger()


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False   # one "Starting factory" log line per probe is noise


class _QuietPool(HTTPConnectionPool):
    _factory = _QuietFactory


@implementer(IAgentEndpointFactory)
class _LoopbackEndpoints:
    """Plain TCP endpoints for probe URLs (always 127.0.0.1:port). Agent's default
    HostnameEndpoint resolves names in a thread and, after a refused connection, waits
    0.3 s before giving up; a starting instance refuses several probes, each of which
    would add that delay to every swap."""

    def __init__(self, reactor) -> None:
        self._reactor = reactor

    def endpointForURI(self, uri):
        return TCP4ClientEndpoint(self._reactor, uri.host.decode("ascii"), uri.port, timeout=5)


class Prober:
    """Asks an instance whether it is healthy, the way its runtime says (``inst.probe``):
    GET <health_path> over HTTP, or a FastCGI request for php-fpm's ping path. True only
    for a 200 (with the expected body, when one is set) within the timeout."""

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        # Probes are rare per instance; a fresh connection each time also proves accept() works.
        self._pool = _QuietPool(reactor, persistent=False)
        agent = Agent.usingEndpointFactory(reactor, _LoopbackEndpoints(reactor), pool=self._pool)
        self._client = HTTPClient(agent)

    def __call__(self, inst: Instance, path: str, timeout: float) -> defer.Deferred:
        probe = getattr(inst, "probe", HTTP_PROBE)
        path = probe.path or path
        if probe.protocol == "fastcgi":
            return defer.ensureDeferred(self._probe_fastcgi(inst, path, probe.expect, timeout))
        return defer.ensureDeferred(self._probe(inst, path, timeout))

    async def _probe_fastcgi(self, inst: Instance, path: str, expect, timeout: float) -> bool:
        target = path.encode()
        params = [(b"GATEWAY_INTERFACE", b"CGI/1.1"), (b"REQUEST_METHOD", b"GET"),
                  (b"SCRIPT_NAME", target), (b"SCRIPT_FILENAME", target),
                  (b"REQUEST_URI", target), (b"QUERY_STRING", b""),
                  (b"SERVER_PROTOCOL", b"HTTP/1.1"), (b"HTTP_USER_AGENT", b"tqserver-health")]
        try:
            response = await fastcgi.request(self._reactor, inst.port, params, timeout=timeout)
        except Exception:
            return False
        return response.code == 200 and (expect is None or response.body.strip() == expect)

    async def _probe(self, inst: Instance, path: str, timeout: float) -> bool:
        url = f"http://127.0.0.1:{inst.port}{path}"
        try:
            d = self._client.get(url, headers={"User-Agent": ["tqserver-health"]})
            d.addTimeout(timeout, self._reactor)
            response = await d
            body = treq.content(response)
            body.addTimeout(timeout, self._reactor)
            await body
            return response.code == 200
        except Exception:
            return False

    def close(self) -> defer.Deferred:
        return self._pool.closeCachedConnections()


class HealthChecker(Service):
    """Every health_check_interval_ms, probe each serving instance; one that fails
    health_check_failures times in a row is replaced by its pool."""

    def __init__(self, reactor, pools: Callable[[], Iterable], probe, settings: Callable) -> None:
        self.reactor = reactor
        self._pools = pools
        self._probe = probe
        self._settings = settings
        self._loop = None
        self._interval = None
        self.checks = {"ok": 0, "fail": 0}
        self.on_result: Callable[[object, bool], None] = lambda pool, ok: None

    def startService(self) -> None:
        Service.startService(self)
        self._restart_loop()

    def stopService(self):
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def reconfigure(self) -> None:
        """Pick up a changed interval from the (reloaded) configuration."""
        if self.running and self._settings().health_check_interval_ms / 1000.0 != self._interval:
            self._restart_loop()

    def _restart_loop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._interval = self._settings().health_check_interval_ms / 1000.0
        self._loop = task.LoopingCall(self.check_all)
        self._loop.clock = self.reactor
        d = self._loop.start(self._interval, now=False)
        d.addErrback(lambda f: log.failure("health checker stopped", f))

    def check_all(self) -> defer.Deferred:
        pools = list(self._pools())
        for pool in pools:
            pool.maybe_scale_down()
        checks = [self._check(pool, inst) for pool in pools for inst in pool.serving]
        return defer.gatherResults(checks, consumeErrors=True)

    def _check(self, pool, inst: Instance) -> defer.Deferred:
        s = self._settings()
        d = self._probe(inst, pool.spec.config.health_path, s.health_check_timeout_ms / 1000.0)

        def record(ok: bool) -> None:
            self.checks["ok" if ok else "fail"] += 1
            self.on_result(pool, ok)
            if ok:
                if inst.health_failures:
                    log.info("{id} is healthy again", id=inst.id)
                inst.health_failures = 0
                pool.check_memory(inst)
                return
            inst.health_failures += 1
            log.warn("{id}: health check failed ({n}/{limit})", id=inst.id,
                     n=inst.health_failures, limit=s.health_check_failures)
            if inst.health_failures >= s.health_check_failures:
                pool.replace(inst, "health")
        return d.addCallback(record)


def aggregate(pools: Iterable) -> Tuple[int, dict]:
    """(HTTP status, body) for GET /health: healthy when every worker is, unhealthy (503)
    when no worker serves at all, degraded otherwise."""
    workers = {pool.name: pool.describe() for pool in pools}
    states = [w["status"] for w in workers.values()]
    if states and all(s == "healthy" for s in states):
        status = "healthy"
    elif not states or all(s in ("failed", "stopped") for s in states):
        status = "unhealthy"
    else:
        status = "degraded"
    return (503 if status == "unhealthy" else 200), {"status": status, "workers": workers}
