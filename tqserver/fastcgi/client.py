"""A FastCGI connection that carries one request at a time, with the surface of
proxy.upstream.UpstreamConnection (send, write_body, finish_body, the producer methods,
abort) so the proxy's Forward drives either; and a small pool of kept-alive connections per
php-fpm port. The response streams to an UpstreamSink with backpressure; STDERR goes to the
sink's upstream_stderr. Nothing here buffers a body."""

from __future__ import annotations

import collections

from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.python.failure import Failure

from tqserver.fastcgi.codec import (
    END_BODY,
    END_REQUEST,
    MAX_HEAD,
    PROTOCOL_STATUS,
    REQUEST_COMPLETE,
    REQUEST_ID,
    STDERR,
    STDIN,
    STDOUT,
    FastCGIError,
    Pairs,
    RecordReader,
    begin_request,
    encode_params,
    encode_records,
    parse_cgi_head,
    split_head,
)
from tqserver.proxy.upstream import ConnectionControl, Headers, UpstreamSink

IDLE_SECONDS = 5.0  # a kept connection pins a php-fpm child; give it back soon


class FastCGISink(UpstreamSink):
    """UpstreamSink plus what only FastCGI has: the application's STDERR stream."""

    def upstream_stderr(self, data: bytes) -> None: ...


_IDLE, _HEAD, _BODY = range(3)


class FastCGIConnection(ConnectionControl):
    """One connection to a FastCGI server, carrying one request at a time (php-fpm does not
    multiplex). With ``keep_conn`` the server is asked to keep it open for the next one."""

    def __init__(self, pool: FastCGIPool | None, port: int, keep_conn: bool = True) -> None:
        self.pool = pool
        self.port = port
        self.keep_conn = keep_conn
        self.sink: FastCGISink | None = None
        self.connected_d: defer.Deferred = defer.Deferred()
        self.closed = False
        self.idle_call = None
        self._reader = RecordReader()
        self._state = _IDLE
        self._head = b""
        self._no_body = False
        self._body_done = True

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.connected_d.callback(self)

    # -- sending ---------------------------------------------------------------------
    def send(
        self,
        params: list[bytes],
        sink: FastCGISink,
        head_request: bool,
        has_body: bool,
        chunked: bool = False,
    ) -> None:
        """Start a request with its PARAMS records (from encode_params()); a body
        (``has_body``) follows through write_body() and finish_body(), else STDIN is closed
        at once. ``chunked`` is accepted for UpstreamConnection's signature: FastCGI frames
        the body itself."""
        self.sink = sink
        self._state = _HEAD
        self._head = b""
        self._no_body = head_request
        self._body_done = not has_body
        out = [begin_request(self.keep_conn)] + list(params)
        if not has_body:
            out += encode_records(STDIN, b"")
        self.transport.writeSequence(out)

    def write_body(self, data: bytes) -> None:
        if data and not self.closed:
            self.transport.writeSequence(encode_records(STDIN, data))

    def finish_body(self) -> None:
        if self._body_done:
            return
        self._body_done = True
        if not self.closed:
            self.transport.writeSequence(encode_records(STDIN, b""))
        if self._state == _IDLE:
            self._release()

    def close(self) -> None:
        """Close an idle connection politely."""
        if not self.closed:
            self.closed = True
            self.transport.loseConnection()

    # -- receiving -------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        try:
            records = self._reader.feed(data)
            for i, (rtype, request_id, content) in enumerate(records):
                if self.closed:
                    return
                if request_id != REQUEST_ID:
                    continue  # management records (id 0) or stale ids: not ours
                if self._state == _IDLE:
                    raise FastCGIError("data on an idle connection")
                if rtype == STDOUT:
                    self._stdout(content)
                elif rtype == STDERR:
                    if content and self.sink is not None:
                        self.sink.upstream_stderr(content)
                elif rtype == END_REQUEST:
                    last = i == len(records) - 1 and not self._reader.pending
                    self._end_request(content, reusable=last)
                    return
        except FastCGIError as e:
            self._fail(Failure(e))

    def _stdout(self, content: bytes) -> None:
        if self._state == _BODY:
            if content and not self._no_body and self.sink is not None:
                self.sink.upstream_data(content)
            return
        self._head += content
        found = split_head(self._head)
        if found is None:
            if len(self._head) > MAX_HEAD:
                raise FastCGIError("CGI response head too large")
            return
        head, rest = found
        self._head = b""
        code, reason, headers = parse_cgi_head(head)
        self._state = _BODY
        if self.sink is None:
            return  # the request was abandoned; the rest is discarded
        self.sink.upstream_response(code, reason, headers)
        if rest and not self._no_body:
            self.sink.upstream_data(rest)

    def _end_request(self, content: bytes, reusable: bool) -> None:
        if len(content) < END_BODY.size:
            raise FastCGIError("short END_REQUEST record")
        _app_status, protocol_status = END_BODY.unpack_from(content)
        if protocol_status != REQUEST_COMPLETE:
            raise FastCGIError(
                "php-fpm refused the request: "
                + PROTOCOL_STATUS.get(protocol_status, str(protocol_status))
            )
        if self._state == _HEAD:
            raise FastCGIError(
                "the response ended before its CGI head" if self._head else "empty response"
            )
        if not reusable:
            self.keep_conn = False
        sink, self.sink = self.sink, None
        self._state = _IDLE
        if sink is not None:
            sink.upstream_done()
        if self._body_done:
            self._release()
        # else: released by finish_body() once the request body has been sent

    def _release(self) -> None:
        if self.keep_conn and not self.closed and self.sink is None and self.pool is not None:
            # The client side may have paused us just before the end: an idle connection
            # must read, or it never sees the server close it.
            self.transport.resumeProducing()
            self.pool.release(self)
        else:
            self.close()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.closed = True
        if self.pool is not None:
            self.pool.forget(self)
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.upstream_failed(reason)


# -- the pool ----------------------------------------------------------------------------


class _Factory(protocol.Factory):
    noisy = False

    def __init__(self, pool: FastCGIPool, port: int, keep_conn: bool) -> None:
        self.pool, self.port, self.keep_conn = pool, port, keep_conn

    def buildProtocol(self, addr):
        return FastCGIConnection(self.pool, self.port, self.keep_conn)


class _OneShot(protocol.Factory):
    noisy = False  # probes connect every few seconds: no "Starting factory" lines

    def __init__(self, conn: FastCGIConnection) -> None:
        self.conn = conn

    def buildProtocol(self, addr):
        return self.conn


class _Port:
    """The connections to one port: how many are open, the idle ones, who waits."""

    def __init__(self) -> None:
        self.open = 0
        self.limit = 1
        self.keep_conn = True
        self.idle: list[FastCGIConnection] = []
        self.waiters: collections.deque[tuple[defer.Deferred, bool]] = (
            collections.deque()
        )  # (d, fresh)


class FastCGIPool(Service):
    """At most ``limit`` connections per port, kept alive and reused (the warmest first).

    php-fpm binds a child to each kept connection, so more connections than it has
    children would wait in its backlog behind idle ones forever; requests beyond the
    limit wait here for a connection instead, and idle ones are closed after
    ``idle_timeout`` (a pinned child also counts against request_terminate_timeout).

    php-fpm may close a kept connection at any moment (after a child's last request under
    pm.max_requests, or when it stops an idle child); a request that then got no answer
    is retried, but only one without a body can be. So a request with a body asks for a
    ``fresh`` connection: an idle one is closed to make room for it.

    Stopped, it closes its idle connections and keeps no more.
    """

    name = "fastcgi"  # type: ignore[assignment]  # Twisted types Service.name as None
    _stopped = False

    def __init__(
        self, reactor, connect_timeout: float = 5.0, idle_timeout: float = IDLE_SECONDS
    ) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._ports: dict[int, _Port] = {}

    def acquire(
        self, port: int, limit: int = 1, keep_conn: bool = True, fresh: bool = False
    ) -> defer.Deferred:
        """Fires with a connection to 127.0.0.1:port: an idle one (unless ``fresh``), a new
        one while fewer than ``limit`` are open or in place of an idle one, else the next
        one released."""
        slot = self._ports.setdefault(port, _Port())
        slot.limit = max(1, limit)
        slot.keep_conn = keep_conn
        while slot.idle:
            conn = slot.idle.pop()
            self._stop_idle_timer(conn)
            if conn.closed:
                continue
            if not fresh:
                return defer.succeed(conn)
            conn.close()  # its php-fpm child is free again for the new connection
            return self._connect(port, slot)
        if slot.open < slot.limit:
            return self._connect(port, slot)

        def cancel(d: defer.Deferred) -> None:
            if (d, fresh) in slot.waiters:
                slot.waiters.remove((d, fresh))

        d: defer.Deferred = defer.Deferred(cancel)
        slot.waiters.append((d, fresh))
        return d

    def _connect(self, port: int, slot: _Port) -> defer.Deferred:
        slot.open += 1
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", port, timeout=self.connect_timeout)
        d = endpoint.connect(_Factory(self, port, slot.keep_conn))

        def failed(failure: Failure) -> Failure:
            slot.open -= 1
            self._serve_waiters(port, slot)
            return failure

        d.addCallbacks(lambda conn: conn.connected_d, failed)
        return d

    def release(self, conn: FastCGIConnection) -> None:
        """A connection whose request is complete: to the next waiter, else idle."""
        slot = self._ports.get(conn.port)
        if slot is None or conn.closed:
            return
        if slot.waiters:
            waiter, fresh = slot.waiters.popleft()
            if fresh:
                conn.close()
                self._connect(conn.port, slot).chainDeferred(waiter)
            else:
                waiter.callback(conn)
            return
        if self._stopped:
            conn.close()
            return
        slot.idle.append(conn)
        conn.idle_call = self.reactor.callLater(self.idle_timeout, self._expire, conn)

    def forget(self, conn: FastCGIConnection) -> None:
        """A connection closed: its slot may serve a waiter."""
        self._stop_idle_timer(conn)
        slot = self._ports.get(conn.port)
        if slot is None:
            return
        if conn in slot.idle:
            slot.idle.remove(conn)
        slot.open -= 1
        self._serve_waiters(conn.port, slot)
        if not slot.open and not slot.waiters:
            del self._ports[conn.port]

    def _serve_waiters(self, port: int, slot: _Port) -> None:
        if slot.waiters and slot.open < slot.limit:
            waiter, _ = slot.waiters.popleft()
            self._connect(port, slot).chainDeferred(waiter)

    def _expire(self, conn: FastCGIConnection) -> None:
        conn.idle_call = None
        conn.close()

    def _stop_idle_timer(self, conn: FastCGIConnection) -> None:
        if conn.idle_call is not None and conn.idle_call.active():
            conn.idle_call.cancel()
        conn.idle_call = None

    def close_port(self, port: int) -> None:
        slot = self._ports.get(port)
        for conn in list(slot.idle) if slot else ():
            conn.close()

    def close_all(self) -> None:
        for port in list(self._ports):
            self.close_port(port)

    def stopService(self) -> None:
        Service.stopService(self)
        self._stopped = True
        self.close_all()

    def idle_count(self, port: int | None = None) -> int:
        slots = [self._ports.get(port)] if port is not None else list(self._ports.values())
        return sum(len(s.idle) for s in slots if s is not None)

    def open_count(self, port: int) -> int:
        slot = self._ports.get(port)
        return slot.open if slot else 0


# -- one-off requests (health probes, tests) ---------------------------------------------


class Response(FastCGISink):
    """A whole response, collected: for probes and tests, never for proxied traffic."""

    def __init__(self) -> None:
        self.code: int | None = None
        self.reason = b""
        self.headers: Headers = []
        self.chunks: list[bytes] = []
        self.stderr: list[bytes] = []
        self.done: defer.Deferred = defer.Deferred()

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def upstream_response(self, code: int, reason: bytes, headers: Headers) -> None:
        self.code, self.reason, self.headers = code, reason, headers

    def upstream_data(self, data: bytes) -> None:
        self.chunks.append(data)

    def upstream_stderr(self, data: bytes) -> None:
        self.stderr.append(data)

    def upstream_done(self) -> None:
        self.done.callback(self)

    def upstream_failed(self, reason: Failure) -> None:
        self.done.errback(reason)


def request(
    reactor, port: int, params: Pairs, body: bytes = b"", timeout: float = 10.0
) -> defer.Deferred:
    """One request on a fresh connection (not kept alive); fires with its Response, or
    fails (refused, broken response, ``timeout`` seconds passed: the connection is cut)."""
    params = list(params)
    if body and not any(name == b"CONTENT_LENGTH" for name, _ in params):
        params.append((b"CONTENT_LENGTH", b"%d" % len(body)))
    records = encode_params(params)
    d = defer.ensureDeferred(_request(reactor, port, records, body, timeout))
    d.addTimeout(timeout, reactor)
    return d


async def _request(
    reactor, port: int, params: list[bytes], body: bytes, timeout: float
) -> Response:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=timeout)
    conn = FastCGIConnection(None, port, keep_conn=False)
    await endpoint.connect(_OneShot(conn))
    response = Response()
    try:
        conn.send(params, response, False, bool(body))
        if body:
            conn.write_body(body)
            conn.finish_body()
        return await response.done
    finally:
        if conn.sink is not None:
            conn.abort()  # cancelled (timed out) mid-response
        else:
            conn.close()
