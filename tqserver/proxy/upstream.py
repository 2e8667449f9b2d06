"""A lean HTTP/1.1 client for talking to worker instances: pooled keep-alive connections,
streaming in both directions with backpressure, and raw access for Upgrade splicing.

The proxy hands each connection a *sink* (see ``UpstreamSink``) that receives the response
as it arrives; nothing here buffers a body.
"""

from __future__ import annotations

import re

from twisted.application.service import Service
from twisted.internet import defer, protocol, tcp
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.python.failure import Failure

from tqserver.proxy.response_head import (
    MAX_HEAD,
    Headers,
    UpstreamError,
    parse_response_head,
)
from tqserver.twisted_compat import write_now

MAX_IDLE_PER_PORT = 128

# parser states
_IDLE, _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _CLOSE, _UPGRADED = range(9)


class UpstreamSink:
    """What a connection reports to while it carries one request (the proxy implements it)."""

    upgrade_requested = False  # the request asked for an Upgrade: a 101 may answer it

    def upstream_response(self, code: int, reason: bytes, headers: Headers) -> None: ...
    def upstream_data(self, data: bytes) -> None: ...
    def upstream_done(self) -> None: ...
    def upstream_failed(self, reason: Failure) -> None:
        """The exchange broke before the response was complete (whether the request may be
        sent again is the sink's to decide: see Forward.upstream_failed)."""

    def upstream_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None: ...
    def upstream_flush(self) -> None:
        """The end of one read from the instance: what it relayed may go out now."""


_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


class ConnectionControl(protocol.Protocol):
    """What the proxy does to any connection to an instance (HTTP or FastCGI): registered
    as the producer of the client's response, it pauses and resumes reading from the
    instance; ``abort`` drops it when the client went away or time ran out."""

    closed = False
    sink: UpstreamSink | None = None
    # Set by makeConnection before anything else is called: a TCP connection to 127.0.0.1.
    transport: tcp.Connection
    flushes_sink = False  # calls sink.upstream_flush() after each read

    def pauseProducing(self) -> None:
        if not self.closed:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if not self.closed:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.abort()

    def abort(self) -> None:
        """Drop the connection: the instance sees a reset (or, for FastCGI, an abort)."""
        self.sink = None
        if not self.closed:
            self.closed = True
            self.transport.abortConnection()

    def _fail(self, reason: Failure) -> None:
        """The exchange broke: drop the connection and tell the sink."""
        sink, self.sink = self.sink, None
        self.abort()
        if sink is not None:
            sink.upstream_failed(reason)


class UpstreamConnection(ConnectionControl):
    """One keep-alive connection to one instance; carries one request at a time."""

    flushes_sink = True

    def __init__(self, pool: UpstreamPool, port: int) -> None:
        self.pool = pool
        self.port = port
        self.sink: UpstreamSink | None = None
        self.connected_d: defer.Deferred[UpstreamConnection] = defer.Deferred()
        self.closed = False
        self._state = _IDLE
        self._buf = b""
        self._remaining = 0
        self._no_body = False
        self._keep_alive = False
        self._chunked_request = False
        self._body_done = True

    # -- sending ---------------------------------------------------------------------
    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.connected_d.callback(self)

    def send(
        self, head: bytes, sink: UpstreamSink, head_request: bool, has_body: bool, chunked: bool
    ) -> None:
        """Write a request head; the body (if ``has_body``) follows via write_body()."""
        self.sink = sink
        self._state = _HEAD
        self._no_body = head_request
        self._body_done = not has_body
        self._chunked_request = chunked
        write_now(self.transport, head)

    def write_body(self, data: bytes) -> None:
        if not data or self.closed:
            return
        if self._chunked_request:
            self.transport.writeSequence([b"%x\r\n" % len(data), data, b"\r\n"])
        else:
            self.transport.write(data)

    def finish_body(self) -> None:
        if self._body_done:
            return
        self._body_done = True
        if self._chunked_request and not self.closed:
            self.transport.write(b"0\r\n\r\n")
        if self._state == _IDLE:
            self._release()

    # -- receiving -------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            # Idle (a request has a sink until its response is complete): an idle
            # connection must be silent; anything here means it is not reusable.
            self.abort()
            return
        state = self._state
        if state == _LENGTH and not self._buf:  # the hot path: body bytes of known length
            n = len(data)
            if n < self._remaining:
                self._remaining -= n
                sink.upstream_data(data)
                sink.upstream_flush()
                return
        elif state == _UPGRADED:
            sink.upstream_data(data)
            return
        self._buf += data
        try:
            self._parse()
        except UpstreamError as e:
            self._fail(Failure(e))
        # The end of one read: what the sink relayed of it may leave in one send.
        sink.upstream_flush()

    def _parse(self) -> None:
        while self._buf:
            sink = self.sink
            if sink is None:
                return  # aborted (the client went away) or complete: nothing more to relay
            state = self._state
            if state == _HEAD:
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buf) > MAX_HEAD:
                        raise UpstreamError("response head too large")
                    return
                head, self._buf = self._buf[:end], self._buf[end + 4 :]
                if not self._start_response(head):
                    return
            elif state == _LENGTH:
                take = self._buf[: self._remaining]
                self._buf = self._buf[len(take) :]
                self._remaining -= len(take)
                if take:
                    sink.upstream_data(take)
                if self._remaining == 0:
                    self._complete()
                    return
            elif state == _CHUNK_SIZE:
                end = self._buf.find(b"\r\n")
                if end < 0:
                    if len(self._buf) > 1024:
                        raise UpstreamError("chunk size line too long")
                    return
                line, self._buf = self._buf[:end], self._buf[end + 2 :]
                digits = line.split(b";", 1)[0].rstrip(b" \t")
                if _HEX.fullmatch(digits) is None:  # int() would take "0x5", "+5", "5_0"
                    raise UpstreamError(f"bad chunk size {line[:40]!r}")
                size = int(digits, 16)
                if size == 0:
                    self._state = _TRAILER
                else:
                    self._remaining = size
                    self._state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                take = self._buf[: self._remaining]
                self._buf = self._buf[len(take) :]
                self._remaining -= len(take)
                sink.upstream_data(take)
                if self._remaining == 0:
                    self._state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                if len(self._buf) < 2:
                    return
                if self._buf[:2] != b"\r\n":
                    raise UpstreamError("missing CRLF after chunk")
                self._buf = self._buf[2:]
                self._state = _CHUNK_SIZE
            elif state == _TRAILER:
                end = self._buf.find(b"\r\n")
                if end < 0:
                    return
                line, self._buf = self._buf[:end], self._buf[end + 2 :]
                if not line:
                    self._complete()
                    return
            elif state == _CLOSE:
                data, self._buf = self._buf, b""
                sink.upstream_data(data)
            elif state == _UPGRADED:
                data, self._buf = self._buf, b""
                sink.upstream_data(data)
            else:  # _IDLE with a sink: cannot be (a complete response drops its sink)
                raise UpstreamError("unexpected data after the response")

    def _start_response(self, head: bytes) -> bool:
        """Handle a parsed head; False when parsing must stop (upgrade handed over)."""
        parsed = parse_response_head(head)
        sink = self.sink
        assert sink is not None  # a head is parsed only while a request waits for it
        if parsed.interim:
            return True  # 100 Continue, 103 Early Hints: wait for the real one
        code, reason, headers = parsed.code, parsed.reason, parsed.headers
        self._keep_alive = parsed.keep_alive
        chunked, length = parsed.chunked, parsed.length
        if code == 101:
            if not sink.upgrade_requested:
                raise UpstreamError("101 Switching Protocols to a request without Upgrade")
            self._state = _UPGRADED
            self._keep_alive = False
            rest, self._buf = self._buf, b""
            sink.upstream_response(code, reason, headers)
            sink.upstream_upgraded(self, rest)
            return False
        sink.upstream_response(code, reason, headers)
        if self.sink is None:  # the client went away while we delivered the head
            return False
        if self._no_body or code in (204, 304):
            self._complete()
            return False
        if chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            self._state = _LENGTH
            self._remaining = length
            if length == 0:
                self._complete()
                return False
        else:
            self._state = _CLOSE
            self._keep_alive = False
        return True

    def _complete(self) -> None:
        sink, self.sink = self.sink, None
        self._state = _IDLE
        if self._buf:
            self._keep_alive = False
            self._buf = b""
        if sink is not None:
            sink.upstream_done()
        if self._body_done:
            self._release()
        # else: released by finish_body() once the request body has been sent

    def _release(self) -> None:
        if self._keep_alive and not self.closed and self.sink is None:
            # The client side may have paused us (slow reader) just before the end: an idle
            # connection must read, or it never sees its next response nor the worker's FIN.
            self.transport.resumeProducing()
            self.pool.release(self)
        else:
            self.abort()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.closed = True
        self.pool.forget(self)
        sink, self.sink = self.sink, None
        if sink is None:
            return
        if self._state in (_CLOSE, _UPGRADED):
            self._state = _IDLE
            sink.upstream_done()
        else:
            sink.upstream_failed(reason)


def _when_connected(conn) -> defer.Deferred[UpstreamConnection]:
    """The endpoint connected: the connection is usable once connectionMade ran."""
    assert isinstance(conn, UpstreamConnection)
    return conn.connected_d


class _Factory(protocol.Factory):
    noisy = False

    def __init__(self, pool: UpstreamPool, port: int) -> None:
        self.pool, self.port = pool, port

    def buildProtocol(self, addr):
        return UpstreamConnection(self.pool, self.port)


class UpstreamPool(Service):
    """Idle keep-alive connections per instance port (LIFO: the warmest first). Stopped,
    it closes the idle ones and keeps no more."""

    name = "upstreams"  # type: ignore[assignment]  # Twisted types Service.name as None
    _stopped = False

    def __init__(self, reactor, connect_timeout: float = 5.0) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self._idle: dict[int, list[UpstreamConnection]] = {}

    def take_idle(self, port: int) -> UpstreamConnection | None:
        """An idle kept-alive connection to 127.0.0.1:port (the warmest), or None."""
        idle = self._idle.get(port)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def acquire(self, port: int, fresh: bool = False) -> defer.Deferred:
        """Fires with a connection to 127.0.0.1:port, reused when one is idle (unless
        ``fresh``)."""
        conn = None if fresh else self.take_idle(port)
        if conn is not None:
            return defer.succeed(conn)
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", port, timeout=self.connect_timeout)
        d = endpoint.connect(_Factory(self, port))
        return d.addCallback(_when_connected)

    def release(self, conn: UpstreamConnection) -> None:
        idle = self._idle.setdefault(conn.port, [])
        if len(idle) >= MAX_IDLE_PER_PORT or self._stopped:
            conn.abort()
        else:
            idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn.port)
        if idle and conn in idle:
            idle.remove(conn)

    def close_port(self, port: int) -> None:
        """Close idle connections to an instance that is going away."""
        for conn in self._idle.pop(port, []):
            conn.transport.loseConnection()

    def close_all(self) -> None:
        for port in list(self._idle):
            self.close_port(port)

    def stopService(self) -> None:
        Service.stopService(self)
        self._stopped = True
        self.close_all()

    def idle_count(self, port: int | None = None) -> int:
        if port is not None:
            return len(self._idle.get(port, ()))
        return sum(len(v) for v in self._idle.values())
