"""Prober: a small loopback HTTP/1.1 client that asks an instance its health path over a kept
connection (and a fresh one now and then, so an instance that can no longer accept() fails)."""

from __future__ import annotations

from typing import Callable

from twisted.application.service import Service
from twisted.internet import defer, tcp
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure

from tqserver.fastcgi import client as fastcgi_client
from tqserver.proxy.response_head import MAX_HEAD, UpstreamError, parse_response_head
from tqserver.runtimes import HTTP_PROBE
from tqserver.supervise.instance import Instance

REUSE = 10  # probes over one kept connection; then a fresh one proves accept() again


class _ProbeConnection(Protocol):
    """An HTTP/1.1 connection to one instance, asking one probe at a time. An answer is
    healthy when its status is 200 and the whole response arrived: Content-Length bytes,
    a chunked body's last chunk, or the close. After a healthy answer the connection is
    kept for the instance's next probe (up to REUSE probes), unless the instance said
    ``Connection: close``."""

    transport: tcp.Connection | None  # a TCP connection to 127.0.0.1

    def __init__(self, prober: Prober, port: int, made: Callable[[_ProbeConnection], None]) -> None:
        self.prober = prober
        self.port = port
        self.made = made
        self.uses = 0
        self.waiting: defer.Deferred | None = None
        self.closed: list[defer.Deferred] = []
        self._reset(reused=False)

    def _reset(self, reused: bool) -> None:
        self.reused = reused
        self.answered = False
        self.head = b""
        self.code: int | None = None
        self.left: int | None = None  # body bytes still due (Content-Length)
        self.chunked = False
        self.tail = b""  # the last bytes of a chunked body
        self.keep = True

    def connectionMade(self) -> None:
        self.prober._open.add(self)
        self.made(self)

    def ask(self, request: bytes) -> defer.Deferred:
        """Fires with True or False; or with None when a kept connection turns out to be
        closed before any answer (the instance closed it while idle): ask on a fresh one."""
        self._reset(reused=self.uses > 0)
        self.uses += 1
        waiting = self.waiting = defer.Deferred()
        assert self.transport is not None  # asked once connected
        self.transport.write(request)
        return waiting

    def dataReceived(self, data: bytes) -> None:
        if self.waiting is None:
            self.close()  # nothing was asked
            return
        self.answered = True
        while self.code is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEAD:
                    self._answer(False)
                return
            head, data, self.head = self.head[:end], self.head[end + 4 :], b""
            try:
                parsed = parse_response_head(head)
            except UpstreamError:
                self._answer(False)
                return
            if parsed.interim:
                continue  # 100 Continue, 103 Early Hints: the real answer follows
            self.code = parsed.code
            self.keep = parsed.keep_alive
            if parsed.chunked:
                self.chunked = True
            elif parsed.length is not None:
                self.left = parsed.length
            else:
                self.keep = False  # delimited by the close
        if self.left is not None:
            self.left -= len(data)
            if self.left <= 0:
                self.keep = self.keep and self.left == 0
                self._answer(self.code == 200)
        elif self.chunked:
            self.tail = (self.tail + data)[-7:]
            if self.tail.endswith(b"0\r\n\r\n"):
                self._answer(self.code == 200)

    def _answer(self, ok: bool) -> None:
        d, self.waiting = self.waiting, None
        assert d is not None  # only while a probe waits
        if ok and self.keep and self.uses < REUSE:
            self.prober._keep(self)
        else:
            self.close()
        d.callback(ok)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
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
    noisy = False  # one "Starting factory" log line per connection is noise

    def __init__(self, probe: _HttpProbe) -> None:
        self.probe = probe

    def buildProtocol(self, addr) -> _ProbeConnection:
        return _ProbeConnection(self.probe.prober, self.probe.port, self.probe.connected)

    def clientConnectionFailed(self, connector, reason) -> None:
        self.probe.settle(False)  # refused: not (yet) listening


class _HttpProbe:
    """One health probe: GET on the instance's kept connection when there is one, else
    on a fresh connection; True or False within the timeout."""

    def __init__(self, prober: Prober, port: int, request: bytes, timeout: float) -> None:
        self.prober = prober
        self.port = port
        self.request = request
        self.result: defer.Deferred = defer.Deferred()
        self.conn: _ProbeConnection | None = None
        self.connector = None
        self.timer = prober._reactor.callLater(timeout, self.expire)
        kept = prober._idle.pop(port, None)
        if kept is not None:
            self.connected(kept)
        else:
            self.connect()

    def connect(self) -> None:
        self.conn = None
        self.connector = self.prober._reactor.connectTCP(
            "127.0.0.1", self.port, _ProbeFactory(self)
        )

    def connected(self, conn: _ProbeConnection) -> None:
        if self.result.called:
            conn.close()
            return
        self.conn = conn
        conn.ask(self.request).addCallback(self.answered)

    def answered(self, ok: bool | None) -> None:
        if ok is None and not self.result.called:
            self.connect()  # the kept connection had been closed: once more, fresh
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


class Prober(Service):
    """Asks an instance whether it is healthy, the way its runtime says (``inst.probe``):
    GET <health_path> over HTTP, or a FastCGI request for php-fpm's ping path. True only
    for a 200 (with the expected body, when one is set) within the timeout.

    HTTP probes go over a connection kept per instance, and a fresh one every REUSE
    probes (so a worker that can no longer accept() still fails). Not Twisted's HTTP
    client: treq over Agent (URL parsing, agent wrappers, a Response, a body collector)
    and a TCP connection per probe made probing hundreds of instances a large share of
    the supervisor's CPU (docs/performance.md, "Scale")."""

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._idle: dict[int, _ProbeConnection] = {}  # port -> kept connection
        self._open: set[_ProbeConnection] = set()

    def __call__(self, inst: Instance, path: str, timeout: float) -> defer.Deferred:
        probe = getattr(inst, "probe", HTTP_PROBE)
        path = probe.path or path
        if probe.protocol == "fastcgi":
            return defer.ensureDeferred(self._probe_fastcgi(inst, path, probe.expect, timeout))
        request = (
            b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: tqserver-health\r\n\r\n"
            % (path.encode("utf-8"), inst.port)
        )
        return _HttpProbe(self, inst.port, request, timeout).result

    async def _probe_fastcgi(self, inst: Instance, path: str, expect, timeout: float) -> bool:
        target = path.encode()
        params = [
            (b"GATEWAY_INTERFACE", b"CGI/1.1"),
            (b"REQUEST_METHOD", b"GET"),
            (b"SCRIPT_NAME", target),
            (b"SCRIPT_FILENAME", target),
            (b"REQUEST_URI", target),
            (b"QUERY_STRING", b""),
            (b"SERVER_PROTOCOL", b"HTTP/1.1"),
            (b"HTTP_USER_AGENT", b"tqserver-health"),
        ]
        try:
            response = await fastcgi_client.request(
                self._reactor, inst.port, params, timeout=timeout
            )
        except Exception:
            return False
        return response.code == 200 and (expect is None or response.body.strip() == expect)

    def _keep(self, conn: _ProbeConnection) -> None:
        if self._idle.get(conn.port) is None:
            self._idle[conn.port] = conn
        else:
            conn.close()  # two probes of one instance at once: one connection is enough

    def _lost(self, conn: _ProbeConnection) -> None:
        self._open.discard(conn)
        if self._idle.get(conn.port) is conn:
            del self._idle[conn.port]

    def stopService(self) -> defer.Deferred:
        Service.stopService(self)
        return self.close()

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
