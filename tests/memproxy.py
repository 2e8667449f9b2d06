"""The real proxy (ProxySite, ProxyChannel, Forward, UpstreamConnection) over in-memory
transports on a Clock, for fuzzing: client bytes go in, the requests it forwards come out
on the upstream side and are read by a strict HTTP/1.1 parser playing the worker, which
answers with scripted responses; what the client receives is read by a strict parser too.

A transport here behaves like a TCP one where it matters: nothing is read once it is
paused or closing, writes made before the close still go out, and connectionLost comes
on a later reactor turn."""
from __future__ import annotations

import re

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

try:
    from twisted.internet.testing import StringTransport
except ImportError:  # older Twisted
    from twisted.test.proto_helpers import StringTransport

from tqserver.config.server import default_server_config
from tqserver.proxy.front import Front
from tqserver.proxy.site import ProxyRequest, ProxySite
from tqserver.proxy.upstream import UpstreamConnection, UpstreamPool

from .test_proxy import FakeInstance, FakePool, proxy_state


class Violation(AssertionError):
    """What the strict parsers found wrong in a byte stream."""


_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_FIELD_VALUE = re.compile(rb"^[\t\x20-\x7e\x80-\xff]*$")
_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] ([1-9][0-9]{2}) [\t\x20-\x7e\x80-\xff]*$")
_REQUEST_LINE = re.compile(rb"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+) (\S+) HTTP/1\.1$")


def parse_fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    fields = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise Violation(f"bad field line {line[:80]!r}")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.match(value):
            raise Violation(f"bad field value {line[:80]!r}")
        fields.append((name.lower(), value))
    return fields


class _Body:
    """Framing of one message body: a length, chunked, or (responses) until close."""

    def __init__(self, fields, allow_close: bool) -> None:
        lengths = [v for n, v in fields if n == b"content-length"]
        codings = [v for n, v in fields if n == b"transfer-encoding"]
        if codings and lengths:
            raise Violation("both Transfer-Encoding and Content-Length")
        if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
            raise Violation(f"bad Content-Length {lengths!r}")
        if codings:
            if [c.lower() for c in codings] != [b"chunked"]:
                raise Violation(f"Transfer-Encoding {codings!r}")
            self.kind = "chunked"
        elif lengths:
            self.kind = "length"
            self.remaining = int(lengths[0])
        else:
            self.kind = "close" if allow_close else "length"
            self.remaining = 0
        self.data = b""
        self._state = "size"

    def feed(self, buf: bytes) -> tuple[bool, bytes]:
        """(complete, what is left of buf after this body)."""
        if self.kind == "close":
            self.data += buf
            return False, b""
        if self.kind == "length":
            take = buf[: self.remaining]
            self.data += take
            self.remaining -= len(take)
            return self.remaining == 0, buf[len(take):]
        while True:
            if self._state == "size":
                line, sep, rest = buf.partition(b"\r\n")
                if not sep:
                    if len(buf) > 1024:
                        raise Violation("chunk size line too long")
                    return False, buf
                size = line.split(b";", 1)[0]
                if not re.match(rb"^[0-9A-Fa-f]{1,16}$", size):
                    raise Violation(f"bad chunk size {line[:40]!r}")
                buf = rest
                self.remaining = int(size, 16)
                self._state = "data" if self.remaining else "trailer"
            elif self._state == "data":
                take = buf[: self.remaining]
                self.data += take
                self.remaining -= len(take)
                buf = buf[len(take):]
                if self.remaining:
                    return False, buf
                self._state = "crlf"
            elif self._state == "crlf":
                if len(buf) < 2:
                    return False, buf
                if buf[:2] != b"\r\n":
                    raise Violation("no CRLF after chunk data")
                buf = buf[2:]
                self._state = "size"
            else:  # trailer section
                line, sep, rest = buf.partition(b"\r\n")
                if not sep:
                    return False, buf
                buf = rest
                if not line:
                    return True, buf
                parse_fields([line])


class StrictStream:
    """Messages in one direction of one connection, parsed strictly as they arrive."""

    def __init__(self, responses: bool, methods: list[bytes] | None = None) -> None:
        self.responses = responses
        self.methods = methods  # requests' methods, in order (responses to HEAD: no body)
        self.messages: list = []  # (start line, fields, body)
        self.buf = b""
        self._current = None
        self.raw = False  # after a 101: no more HTTP

    def feed(self, data: bytes) -> list:
        """The messages completed by ``data``."""
        done = []
        self.buf += data
        while self.buf and not self.raw:
            if self._current is None:
                if self.responses is False and self.buf.startswith(b"\r\n"):
                    raise Violation("empty line before a request")
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > 1 << 20:
                        raise Violation("head without end")
                    break
                head, self.buf = self.buf[:end], self.buf[end + 4:]
                lines = head.split(b"\r\n")
                if any(b"\r" in line or b"\n" in line for line in lines):
                    raise Violation(f"bare CR or LF in {head[:120]!r}")
                start, fields = lines[0], parse_fields(lines[1:])
                self._current = self._start(start, fields)
                if self._current is None:
                    continue  # an interim response
            ok, self.buf = self._current[2].feed(self.buf)
            if not ok:
                break
            start, fields, body = self._current
            self._current = None
            message = (start, fields, body.data)
            self.messages.append(message)
            done.append(message)
            if self.responses and start.split(b" ")[1] == b"101":
                self.raw = True
        return done

    def _start(self, start: bytes, fields):
        if not self.responses:
            if not _REQUEST_LINE.match(start):
                raise Violation(f"bad request line {start[:120]!r}")
            return (start, fields, _Body(fields, allow_close=False))
        match = _STATUS_LINE.match(start)
        if not match:
            raise Violation(f"bad status line {start[:120]!r}")
        code = int(match.group(1))
        if 100 <= code < 200 and code != 101:
            return None
        index = len(self.messages)
        method = self.methods[index] if self.methods and index < len(self.methods) else b""
        body = _Body(fields, allow_close=True)
        if method == b"HEAD" or code in (101, 204, 304):
            body.kind, body.remaining = "length", 0
        return (start, fields, body)

    def finish(self, closed: bool) -> None:
        """The connection ended (``closed``) or the test did: nothing may be half-sent,
        except a body delimited by the close itself."""
        if self.raw:
            return
        if self._current is not None:
            if self._current[2].kind == "close" and closed:
                start, fields, body = self._current
                self.messages.append((start, fields, body.data))
                self._current = None
                return
            raise Violation(f"message cut short: {self._current[0][:80]!r}")
        if self.buf:
            raise Violation(f"bytes outside any message: {self.buf[:80]!r}")


class MemoryTransport(StringTransport):
    def __init__(self, clock, protocol=None) -> None:
        StringTransport.__init__(
            self,
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8080),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
            lenient=True,  # a TCP transport ignores resumeProducing once closing
        )
        self.clock = clock
        self.protocol = protocol
        self.lost = False
        self._lost_call = None

    def setTcpNoDelay(self, enabled) -> None:
        pass

    def write(self, data: bytes) -> None:
        if not self.lost:
            StringTransport.write(self, data)

    def writeSequence(self, data) -> None:
        if not self.lost:
            StringTransport.writeSequence(self, data)

    def loseConnection(self) -> None:
        StringTransport.loseConnection(self)
        self._schedule_lost(ConnectionDone)

    def abortConnection(self) -> None:
        StringTransport.abortConnection(self)
        self._schedule_lost(ConnectionAborted)

    def resumeProducing(self) -> None:
        if not self.lost:
            StringTransport.resumeProducing(self)

    def _schedule_lost(self, exc) -> None:
        if self._lost_call is None and not self.lost:
            self._lost_call = self.clock.callLater(0, self.deliver_lost, exc)

    def deliver_lost(self, exc=ConnectionDone) -> None:
        if self._lost_call is not None and self._lost_call.active():
            self._lost_call.cancel()
        if not self.lost:
            self.lost = True
            self.disconnecting = True
            self.protocol.connectionLost(Failure(exc()))

    @property
    def readable(self) -> bool:
        return not (self.lost or self.disconnecting) and self.producerState == "producing"


class MemoryUpstreams(UpstreamPool):
    """Front.upstreams whose new connections are in memory (kept ones are reused as usual)."""

    def __init__(self, clock) -> None:
        UpstreamPool.__init__(self, clock)
        self.made: list[UpstreamConnection] = []

    def acquire(self, port: int, fresh: bool = False) -> defer.Deferred:
        conn = None if fresh else self.take_idle(port)
        if conn is not None:
            return defer.succeed(conn)
        conn = UpstreamConnection(self, port)
        conn.worker = StrictStream(responses=False)
        conn.consumed = 0
        conn.pending_reply = b""
        conn.makeConnection(MemoryTransport(self.reactor, conn))
        self.made.append(conn)
        return conn.connected_d


class RecordingRequest(ProxyRequest):
    def __init__(self, channel, *args, **kw) -> None:
        ProxyRequest.__init__(self, channel, *args, **kw)
        channel.site.created.append(self)


DEFAULT_REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class MemoryProxy:
    """One client connection through the proxy to one pool of one instance."""

    def __init__(self, mode: str = "prod", config=None, replies=(), route: str = "/") -> None:
        self.clock = task.Clock()
        self.config = config or default_server_config()
        self.pool = FakePool("app", route, [FakeInstance(9, "app#1")])
        self.state = proxy_state(self.config, mode, [self.pool])
        self.front = Front(self.state, self.clock)
        self.front.upstreams = self.upstreams = MemoryUpstreams(self.clock)
        self.logged: list = []
        self.site = ProxySite(self.front, log_access=self.logged.append)
        self.site.requestFactory = RecordingRequest
        self.site.created = []
        self.channel = self.site.buildProtocol(None)
        self.channel.callLater = self.clock.callLater  # TimeoutMixin's abort timer
        self.client = MemoryTransport(self.clock, self.channel)
        self.channel.makeConnection(self.client)
        self.replies = list(replies)
        self.upstream_requests: list = []
        self.errors: list = []
        globalLogPublisher.addObserver(self._observe)

    def _observe(self, event) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            self.errors.append(event)

    def close(self) -> None:
        globalLogPublisher.removeObserver(self._observe)

    # -- driving -----------------------------------------------------------------------
    def send(self, chunks) -> int:
        """Deliver client chunks as a socket would (not while paused or closing); returns
        how many were delivered."""
        delivered = 0
        for chunk in chunks:
            self.settle()
            if not self.client.readable:
                self.settle(advance=1.0)
            if not self.client.readable:
                break
            self.channel.dataReceived(chunk)
            delivered += 1
        self.settle()
        return delivered

    def settle(self, advance: float = 0.0) -> None:
        """Run the worker side and the clock until nothing more happens."""
        for _ in range(200):
            progressed = False
            self.clock.advance(advance)
            advance = 0.0
            for conn in list(self.upstreams.made):
                progressed |= self._serve(conn)
            if not progressed and not any(c.getTime() <= self.clock.seconds()
                                          for c in self.clock.getDelayedCalls()):
                return

    def _serve(self, conn) -> bool:
        transport = conn.transport
        if transport.disconnected or conn.worker.raw:
            conn.consumed = len(transport.value())
            return False
        data = transport.value()[conn.consumed:]
        progressed = False
        if data:
            conn.consumed += len(data)
            progressed = True
            for message in conn.worker.feed(data):
                self.upstream_requests.append(message)
                conn.pending_reply += self.replies.pop(0) if self.replies else DEFAULT_REPLY
        if conn.pending_reply and transport.producerState == "producing" and not transport.lost:
            reply, conn.pending_reply = conn.pending_reply, b""
            if reply.split(b" ", 2)[1:2] == [b"101"]:
                conn.worker.raw = True
            conn.dataReceived(reply)
            head = reply.partition(b"\r\n\r\n")[0].lower()
            if b"connection: close" in head or head.startswith(b"http/1.0"):
                conn.transport.loseConnection()  # the worker closes after such a reply
            progressed = True
        return progressed

    def finish(self, timeouts: float = 400.0) -> StrictStream:
        """Let every timeout pass, close the client side, and parse what it received."""
        self.settle()
        for _ in range(int(timeouts // 10)):
            self.settle(advance=10.0)
        for conn in self.upstreams.made:  # the worker closes its side first
            if not conn.transport.lost:
                conn.transport.deliver_lost()
        self.settle(advance=1.0)
        self.client.deliver_lost()
        self.settle(advance=1.0)
        methods = [r.method for r in self.site.created]
        stream = StrictStream(responses=True, methods=methods)
        stream.feed(self.client.value())
        stream.finish(closed=True)
        return stream
