"""Health: probing instances (a LoopingCall HealthChecker, and a small loopback HTTP
prober) and the aggregated answer served at /health."""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger

from . import fastcgi
from .process import Instance
from .runtimes import HTTP_PROBE

log = Logger()

MAX_HEAD = 65536     # a probe's response head larger than this is not healthy
REUSE = 10           # probes over one kept connection; then a fresh one proves accept() again
BATCH = 25           # probes started together (one reactor turn, one burst of answers)
SPREAD = 0.5         # a round's batches start spread over this part of the interval


class _ProbeConnection(Protocol):
    """An HTTP/1.1 connection to one instance, asking one probe at a time. An answer is
    healthy when its status is 200 and the whole response arrived: Content-Length bytes,
    a chunked body's last chunk, or the close. After a healthy answer the connection is
    kept for the instance's next probe (up to REUSE probes), unless the instance said
    ``Connection: close``."""

    def __init__(self, prober: "Prober", port: int,
                 made: Callable[["_ProbeConnection"], None]) -> None:
        self.prober = prober
        self.port = port
        self.made = made
        self.uses = 0
        self.waiting: Optional[defer.Deferred] = None
        self.closed: List[defer.Deferred] = []
        self._reset(reused=False)

    def _reset(self, reused: bool) -> None:
        self.reused = reused
        self.answered = False
        self.head = b""
        self.code: Optional[int] = None
        self.left: Optional[int] = None     # body bytes still due (Content-Length)
        self.chunked = False
        self.tail = b""                     # the last bytes of a chunked body
        self.keep = True

    def connectionMade(self) -> None:
        self.prober._open.add(self)
        self.made(self)

    def ask(self, request: bytes) -> defer.Deferred:
        """Fires with True or False; or with None when a kept connection turns out to be
        closed before any answer (the instance closed it while idle): ask on a fresh one."""
        self._reset(reused=self.uses > 0)
        self.uses += 1
        self.waiting = defer.Deferred()
        self.transport.write(request)
        return self.waiting

    def dataReceived(self, data: bytes) -> None:
        if self.waiting is None:
            self.close()     # nothing was asked
            return
        self.answered = True
        if self.code is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEAD:
                    self._answer(False)
                return
            data = self.head[end + 4:]
            if not self._parse_head(self.head[:end]):
                self._answer(False)
                return
        if self.left is not None:
            self.left -= len(data)
            if self.left <= 0:
                self.keep = self.keep and self.left == 0
                self._answer(self.code == 200)
        elif self.chunked:
            self.tail = (self.tail + data)[-7:]
            if self.tail.endswith(b"0\r\n\r\n"):
                self._answer(self.code == 200)

    def _parse_head(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        parts = lines[0].split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            return False
        self.code = int(parts[1])
        self.keep = parts[0] == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                value = value.strip()
                if not value.isdigit():
                    return False
                self.left = int(value)
            elif name == b"transfer-encoding":
                self.chunked = b"chunked" in value.lower()
            elif name == b"connection" and b"close" in value.lower():
                self.keep = False
        if self.chunked:
            self.left = None
        elif self.left is None:
            self.keep = False    # delimited by the close
        return True

    def _answer(self, ok: bool) -> None:
        d, self.waiting = self.waiting, None
        if ok and self.keep and self.uses < REUSE:
            self.prober._keep(self)
        else:
            self.close()
        d.callback(ok)

    def connectionLost(self, reason) -> None:
        self.prober._lost(self)
        if self.waiting is not None:
            d, self.waiting = self.waiting, None
            if self.reused and not self.answered:
                d.callback(None)
            else:
                d.callback(self.code == 200 and self.left is None and not self.chunked)
        closed, self.closed = self.closed, []
        for d in closed:
            d.callback(None)

    def close(self) -> None:
        if self.transport is not None and self.transport.connected:
            self.transport.abortConnection()


class _ProbeFactory(ClientFactory):
    noisy = False   # one "Starting factory" log line per connection is noise

    def __init__(self, probe: "_HttpProbe") -> None:
        self.probe = probe

    def buildProtocol(self, addr) -> _ProbeConnection:
        return _ProbeConnection(self.probe.prober, self.probe.port, self.probe.connected)

    def clientConnectionFailed(self, connector, reason) -> None:
        self.probe.settle(False)   # refused: not (yet) listening


class _HttpProbe:
    """One health probe: GET on the instance's kept connection when there is one, else
    on a fresh connection; True or False within the timeout."""

    def __init__(self, prober: "Prober", port: int, request: bytes, timeout: float) -> None:
        self.prober = prober
        self.port = port
        self.request = request
        self.result: defer.Deferred = defer.Deferred()
        self.conn: Optional[_ProbeConnection] = None
        self.connector = None
        self.timer = prober._reactor.callLater(timeout, self.expire)
        kept = prober._idle.pop(port, None)
        if kept is not None:
            self.connected(kept)
        else:
            self.connect()

    def connect(self) -> None:
        self.conn = None
        self.connector = self.prober._reactor.connectTCP("127.0.0.1", self.port,
                                                         _ProbeFactory(self))

    def connected(self, conn: _ProbeConnection) -> None:
        if self.result.called:
            conn.close()
            return
        self.conn = conn
        conn.ask(self.request).addCallback(self.answered)

    def answered(self, ok: Optional[bool]) -> None:
        if ok is None and not self.result.called:
            self.connect()        # the kept connection had been closed: once more, fresh
            return
        self.settle(bool(ok))

    def settle(self, ok: bool) -> None:
        if self.result.called:
            return
        if self.timer.active():
            self.timer.cancel()
        self.result.callback(ok)

    def expire(self) -> None:
        if self.result.called:
            return
        self.result.callback(False)
        if self.conn is not None:
            self.conn.close()
        elif self.connector is not None and self.connector.state == "connecting":
            self.connector.stopConnecting()


class Prober:
    """Asks an instance whether it is healthy, the way its runtime says (``inst.probe``):
    GET <health_path> over HTTP, or a FastCGI request for php-fpm's ping path. True only
    for a 200 (with the expected body, when one is set) within the timeout.

    HTTP probes go over a connection kept per instance, and a fresh one every REUSE
    probes (so a worker that can no longer accept() still fails): Twisted's HTTP client
    (treq over Agent: URL parsing, agent wrappers, a Response, a body collector) and a
    TCP connection per probe cost ~1.1 ms of CPU per probe on CPython, a quarter of a
    core for 200 instances probed every second; this costs about a tenth of that."""

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._idle: Dict[int, _ProbeConnection] = {}    # port -> kept connection
        self._open: Set[_ProbeConnection] = set()

    def __call__(self, inst: Instance, path: str, timeout: float) -> defer.Deferred:
        probe = getattr(inst, "probe", HTTP_PROBE)
        path = probe.path or path
        if probe.protocol == "fastcgi":
            return defer.ensureDeferred(self._probe_fastcgi(inst, path, probe.expect, timeout))
        request = (b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: tqserver-health\r\n\r\n"
                   % (path.encode("utf-8"), inst.port))
        return _HttpProbe(self, inst.port, request, timeout).result

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

    def _keep(self, conn: _ProbeConnection) -> None:
        if self._idle.get(conn.port) is None:
            self._idle[conn.port] = conn
        else:
            conn.close()    # two probes of one instance at once: one connection is enough

    def _lost(self, conn: _ProbeConnection) -> None:
        self._open.discard(conn)
        if self._idle.get(conn.port) is conn:
            del self._idle[conn.port]

    def close(self) -> defer.Deferred:
        """Close every connection; fires once they are closed."""
        waits = []
        for conn in list(self._open):
            d: defer.Deferred = defer.Deferred()
            conn.closed.append(d)
            waits.append(d)
            conn.close()
        self._idle.clear()
        return defer.gatherResults(waits)


class HealthChecker(Service):
    """Every health_check_interval_ms, probe each serving instance; one that fails
    health_check_failures times in a row is replaced by its pool.

    With many instances, a round's probes start in batches of BATCH spread evenly over the
    first half of the interval rather than all at once, so that the supervisor (which
    proxies requests meanwhile) is never busy with probes for more than a few ms at a
    time. Not one by one: each reactor turn has a cost of its own, and probes spread one
    per turn cost the supervisor about twice the CPU of probes sent together."""

    def __init__(self, reactor, pools: Callable[[], Iterable], probe, settings: Callable) -> None:
        self.reactor = reactor
        self._pools = pools
        self._probe = probe
        self._settings = settings
        self._loop = None
        self._interval = None
        self.checks = {"ok": 0, "fail": 0}
        self._delayed: Set[defer.Deferred] = set()   # probes of this round yet to start
        self.on_result: Callable[[object, bool], None] = lambda pool, ok: None

    def startService(self) -> None:
        Service.startService(self)
        self._restart_loop()

    def stopService(self):
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for d in list(self._delayed):
            d.cancel()

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
        targets = [(pool, inst) for pool in pools for inst in pool.serving]
        batches = [targets[i:i + BATCH] for i in range(0, len(targets), BATCH)]
        step = (self._interval or 0) * SPREAD / max(1, len(batches))
        checks = []
        for k, batch in enumerate(batches):
            if k and step:
                checks.append(self._check_later(k * step, batch))
            else:
                checks.extend(self._check(pool, inst) for pool, inst in batch)
        return defer.gatherResults(checks, consumeErrors=True)

    def _check_later(self, delay: float, batch: List[Tuple[object, Instance]]) -> defer.Deferred:
        def start():
            self._delayed.discard(d)
            # not those that left the rotation meanwhile
            return defer.gatherResults([self._check(pool, inst) for pool, inst in batch
                                        if inst in pool.serving], consumeErrors=True)

        def cancelled(failure):
            failure.trap(defer.CancelledError)     # stopped before it started
            self._delayed.discard(d)
        d = task.deferLater(self.reactor, delay, start)
        self._delayed.add(d)
        return d.addErrback(cancelled)

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
