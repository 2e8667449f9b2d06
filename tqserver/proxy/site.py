"""The public port's twisted.web Site: requests are routed as soon as their head has arrived,
so bodies stream to and from worker instances with backpressure."""

from __future__ import annotations

import io
import re
from typing import Callable

from twisted.internet import tcp
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from tqserver.proxy import pages
from tqserver.proxy.errors import error_renderer, send_error
from tqserver.proxy.forward import Forward, _BodyProducer
from tqserver.proxy.front import Front
from tqserver.proxy.headers import (
    _NOT_RELAYED_BACK,
    _SANE_REQUEST_ID,
    connection_tokens,
    next_request_id,
)
from tqserver.twisted_compat import HTTPChannelHooks, write_now

log = Logger()

# twisted.web.http is wrapped in a deprecation proxy whose attribute lookups are slow;
# bind the class once instead of on every call.
_HTTPChannel = http.HTTPChannel
_NO_BODY_CODES = http.NO_BODY_CODES
_FIELD_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # in a field line: all but HTAB
# A request target holds RFC 3986 characters (and []{}|\^` that browsers send unescaped in
# queries); not control or non-ASCII bytes, '"', '<', '>', '#' (no fragment in a request), nor
# a '%' without two hex digits.
_TARGET_OUTSIDE_GRAMMAR = re.compile(
    rb"[^!$&\'()*+,\-./0-9:;=?@A-Z\[\\\]^_`a-z{|}~%]|%(?![0-9A-Fa-f]{2})"
)
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(:[0-9]*)?")
_ABSOLUTE_FORM = re.compile(rb"https?://([^/?#@]+)([/?].*)?", re.IGNORECASE | re.DOTALL)


def remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 5.2.4, so '/hello/../index' is routed (and forwarded) as '/index'."""
    out: list[bytes] = []
    for segment in path.split(b"/")[1:]:
        if segment in (b".", b"%2e", b"%2E"):
            continue
        if segment.lower() in (b"..", b"%2e%2e", b".%2e", b"%2e."):
            if out:
                out.pop()
            continue
        out.append(segment)
    trailing = path.endswith((b"/.", b"/..")) and out
    return b"/" + b"/".join(out) + (b"/" if trailing else b"")


class ProxyRequest(server.Request):
    """A twisted.web Request that is routed when its head arrives (see ProxyChannel)."""

    channel: ProxyChannel
    site: ProxySite
    renderer: Callable | None = None
    worker_pool = None
    forward: Forward | None = None
    _body_read = False
    _finish_pending = False
    _reading_paused = False
    _request_id: bytes | None = None
    raw_head: list[bytes] | None = None  # see relay_head
    _raw_length = False
    disconnected = False  # the client went away

    @property
    def front(self) -> Front:
        return self.channel.site.front if self.channel else self._front

    @property
    def client_ip(self) -> str:
        addr = self.getClientAddress()
        return getattr(addr, "host", "") or ""

    @property
    def request_id(self) -> bytes:
        if self._request_id is None:
            given = self.requestHeaders.getRawHeaders(b"x-request-id")
            if given and _SANE_REQUEST_ID.match(given[0]):
                self._request_id = given[0]
            else:
                self._request_id = next_request_id()
        return self._request_id

    # -- the worker's response head, relayed ------------------------------------------
    def relay_head(self, code: int, reason: bytes, headers) -> bool:
        """Take the worker's status and headers as the response's without twisted.web's
        Headers: the names and values as the worker sent them, less the hop-by-hop ones
        and its X-Request-ID (ours is added). The head is written with the first body
        write, or by finish(), as twisted.web does. False, with nothing changed, for what
        Forward.upstream_response handles with Headers: a Connection or Transfer-Encoding
        header from the worker (more filtering), a bare CR or LF (sanitizing)."""
        lines: list[bytes] = []
        has_length = False
        n = 0
        for name, value in headers:
            lname = name.lower()
            if lname in _NOT_RELAYED_BACK:
                if lname == b"connection" or lname == b"transfer-encoding":
                    return False
                continue
            if lname == b"content-length":
                if has_length:
                    continue  # a repeat (the upstream parser checked that repeats agree)
                has_length = True
            lines += (name, b": ", value, b"\r\n")
            n += 1
        blob = b"".join(lines)
        if blob.count(b"\n") != n or blob.count(b"\r") != n:
            return False
        lines = [blob]
        for name, values in self.responseHeaders.getAllRawHeaders():  # e.g. Connection: close
            if name.lower() == b"content-length":
                has_length = True
            for value in values:
                lines += (name, b": ", value, b"\r\n")
        lines += (b"X-Request-ID: ", self.request_id, b"\r\n")
        self.setResponseCode(code, reason or None)
        self.raw_head = lines
        self._raw_length = has_length
        return True

    def write(self, data: bytes) -> None:
        lines = self.raw_head
        if lines is not None and not self.startedWriting:
            self._write_raw_head(lines)
        server.Request.write(self, data)

    def _write_raw_head(self, lines: list[bytes]) -> None:
        self.raw_head = None
        self.startedWriting = 1
        version = self.clientproto
        code = self.code
        if (
            version == b"HTTP/1.1"
            and not self._raw_length
            and self.method != b"HEAD"
            and code not in _NO_BODY_CODES
        ):
            lines.append(b"Transfer-Encoding: chunked\r\n")
            self.chunked = 1
        self.channel.write(
            b"%s %d %s\r\n%s\r\n" % (version, code, self.code_message, b"".join(lines))
        )
        if self.method == b"HEAD" or code in _NO_BODY_CODES:
            self.write = lambda data: None  # type: ignore[method-assign]  # as twisted.web does

    # -- called by ProxyChannel at the end of the head --------------------------------
    def head_received(self, command: bytes, uri: bytes, version: bytes) -> None:
        self.started_at = self.channel.site.front.reactor.seconds()
        self.site = self.channel.site
        self._front = self.site.front
        self.method, self.uri, self.clientproto = command, uri, version
        if _TARGET_OUTSIDE_GRAMMAR.search(uri) is not None:
            self.channel.reject(400)  # a byte a lax worker might read another way
            return
        hosts = self.requestHeaders.getRawHeaders(b"host")
        if (
            (hosts is None and version == b"HTTP/1.1")
            or (hosts is not None and len(hosts) > 1)
            or (hosts is not None and _HOST.fullmatch(hosts[0]) is None)
        ):
            self.channel.reject(400)  # RFC 9112 3.2: none in 1.1, two, or not a host
            return
        if uri[:1] != b"/":
            absolute = _ABSOLUTE_FORM.fullmatch(uri)
            if absolute is None or _HOST.fullmatch(absolute.group(1)) is None:
                self.renderer = error_renderer(400, "The request target must be a path.")
                return
            # RFC 9112 3.2.2: the target's authority replaces Host; the worker gets the
            # origin form.
            self.requestHeaders.setRawHeaders(b"host", [absolute.group(1)])
            rest = absolute.group(2) or b"/"
            uri = self.uri = rest if rest[:1] == b"/" else b"/" + rest
        raw_path = uri.partition(b"?")[0]
        if b"/." in raw_path or b"%2" in raw_path:
            raw_path = remove_dot_segments(raw_path)
        self.path = raw_path
        length = self.requestHeaders.getRawHeaders(b"content-length")
        max_body = self._front.state.config.server.max_body_bytes
        if length and length[0].isdigit() and int(length[0]) > max_body:
            self.channel.reject(413)
            return
        try:
            self.forward = self._front.plan(self)
        except Exception:
            log.failure("routing {uri} failed", uri=uri)
            self.renderer = error_renderer(500)
            return
        if self.forward is not None:
            self.forward.start()

    def gotLength(self, length) -> None:
        if self.forward is not None:
            # The body streams to the worker, never kept here (Twisted types .content as None).
            self.content = io.BytesIO()  # type: ignore[assignment]
            self._body_seen = 0
            return
        server.Request.gotLength(self, length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.forward is None:
            server.Request.handleContentChunk(self, data)
            return
        self._body_seen += len(data)
        if self._body_seen > self._front.state.config.server.max_body_bytes:
            self.forward.client_gone()
            self.channel.reject(413)
            return
        self.forward.body_chunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._body_read = True
        if self.forward is None:
            server.Request.requestReceived(self, command, path, version)
            return
        self.args = {}  # type: ignore[assignment]  # Twisted types Request.args as None
        self.forward.body_finished()
        if self._finish_pending:
            self.finish_when_read()

    def process(self) -> None:
        """Non-forwarded requests: reserved endpoints, static files and error pages."""
        self.site = self.channel.site
        renderer = self.renderer or error_renderer(404)
        try:
            renderer(self)
        except Exception:
            log.failure("rendering {path} failed", path=self.path)
            send_error(self, 500)

    # -- helpers for Forward ---------------------------------------------------------
    @property
    def body_producer(self) -> _BodyProducer:
        return _BodyProducer(self)

    def pause_reading(self) -> None:
        # Not guarded by _reading_paused: HTTPChannel resumes its transport by itself when
        # the response side drains, so every upstream-full signal must pause again.
        if not self._body_read and self.channel is not None and self.channel.transport:
            self._reading_paused = True
            self.channel.transport.pauseProducing()
            self.channel.suspend_read_timeout()  # our backpressure is not the client's delay

    def resume_reading(self) -> None:
        if self._reading_paused and self.channel is not None:
            self._reading_paused = False
            self.channel.transport.resumeProducing()
            self.channel.resume_read_timeout()

    def finish_when_read(self) -> None:
        """finish(), but only once the whole request body has been read: the channel cannot
        start the next request while this one's body is still arriving."""
        if self.finished or self.disconnected:
            return
        if not self._body_read:
            self._finish_pending = True
            self.resume_reading()
            return
        self.finish()

    def connectionLost(self, reason: Failure) -> None:
        if self.forward is not None:
            self.forward.client_gone()
        self.disconnected = True
        server.Request.connectionLost(self, reason)


class ProxyChannel(HTTPChannelHooks):
    """HTTPChannel that hands the request its method and target when the head is complete,
    enforces the whole-request read timeout, and answers 431 for oversized heads.

    A Forward may *cork* the channel while it relays one read of a response: what the
    request writes (head, body, chunk framing) collects here and leaves in one send at
    ``flush()``, which the Forward calls at the end of each read from the instance; the
    end of the request, a reject and loseConnection flush first, so nothing is reordered."""

    site: ProxySite  # set by the Site that built it
    transport: tcp.Connection  # set by makeConnection, before anything else runs
    _reading = False  # a request is being read: its read timeout is armed (unless suspended)
    _read_suspended = False  # we stopped reading its body (the worker is slower)
    _in_head = False  # between the request line and the end of the head
    _rejected = False  # reject() answered: nothing more is read or written
    _idle = False  # the idle timeout (TimeoutMixin's) is armed
    _cork: list | None = None
    _host = None
    _peer = None
    _secure = None

    # Request.__init__ asks for both on every request; a TCP connection's addresses do
    # not change (getHost is a getsockname() call each time).
    def getHost(self):
        if self._host is None:
            self._host = self.transport.getHost()
        return self._host

    def getPeer(self):
        if self._peer is None:
            self._peer = self.transport.getPeer()
        return self._peer

    def isSecure(self) -> bool:
        if self._secure is None:  # an interface adaptation each time otherwise
            self._secure = _HTTPChannel.isSecure(self)
        return self._secure

    def cork(self) -> None:
        if self._cork is None:
            self._cork = []

    def flush(self) -> None:
        cork = self._cork
        if cork is not None:
            self._cork = None
            if cork and self.transport is not None:
                write_now(self.transport, b"".join(cork))

    def write(self, data: bytes) -> None:
        if self._cork is not None:
            if data:
                self._cork.append(data)
        elif not self._rejected:
            self.transport.write(data)

    def writeSequence(self, iovec) -> None:
        if self._cork is not None:
            self._cork.extend(iovec)
        elif not self._rejected:
            self.transport.writeSequence(iovec)

    def writeHeaders(self, version, code, reason, headers) -> None:
        if self._rejected:
            return  # the connection carries the rejection and nothing after it
        if self._cork is None:
            _HTTPChannel.writeHeaders(self, version, code, reason, headers)
            return
        out = self._cork
        out += (version, b" ", code, b" ", reason, b"\r\n")
        for name, values in headers.getAllRawHeaders():
            for value in values:
                out += (name, b": ", value, b"\r\n")
        out.append(b"\r\n")

    def requestDone(self, request) -> None:
        self.flush()
        _HTTPChannel.requestDone(self, request)

    def loseConnection(self) -> None:
        self.flush()
        return _HTTPChannel.loseConnection(self)

    # -- timeouts: in the Front's Deadlines, not a DelayedCall per request ------------
    def setTimeout(self, period):
        """TimeoutMixin.setTimeout (the idle timeout, ``timeoutConnection``)."""
        prev, self.timeOut = self.timeOut, period
        if period is None:
            if self._idle:
                self._idle = False
                self.site.front.deadlines.cancel(self._idle_timed_out)
        else:
            self._idle = True
            self.site.front.deadlines.set(self._idle_timed_out, period)
        return prev

    def resetTimeout(self) -> None:
        if self._idle and self.timeOut is not None:
            self.site.front.deadlines.reset(self._idle_timed_out, self.timeOut)

    def _idle_timed_out(self) -> None:
        self._idle = False
        self.timeoutConnection()

    # -- the read timeout: the whole head within read_timeout_seconds of its first byte
    # (slowloris), then the body with no pause from the client longer than that; time the
    # proxy itself does not read (a slower worker's backpressure) does not count.
    def _arm_read_timeout(self) -> None:
        front = self.site.front
        front.deadlines.set(self._read_timed_out, front.state.config.server.read_timeout_seconds)

    def _end_read_timeout(self) -> None:
        self._read_suspended = False
        if self._reading:
            self._reading = False
            self.site.front.deadlines.cancel(self._read_timed_out)

    def suspend_read_timeout(self) -> None:
        if self._reading and not self._read_suspended:
            self._read_suspended = True
            self.site.front.deadlines.cancel(self._read_timed_out)

    def resume_read_timeout(self) -> None:
        if self._read_suspended:
            self._read_suspended = False
            if self._reading:
                self._arm_read_timeout()

    def lineReceived(self, line: bytes) -> None:
        if self._rejected:
            return
        if not self._reading and line:
            self._reading = True
            self._in_head = True
            self._arm_read_timeout()
        return _HTTPChannel.lineReceived(self, line)

    def rawDataReceived(self, data: bytes) -> None:
        if self._rejected:
            return
        if self._reading and not self._read_suspended:
            self._arm_read_timeout()  # the client is sending its body: it is not idle
        _HTTPChannel.rawDataReceived(self, data)

    def headerReceived(self, line: bytes) -> bool:
        # A field line with a control character (RFC 9110 5.5) is refused whatever the
        # Twisted version: older ones pass a bare LF through, which a lax worker would read
        # as the start of another header (X: a<LF>Content-Length: 5).
        if _FIELD_CTL.search(line) is not None:
            self.reject(400)
            return False
        return _HTTPChannel.headerReceived(self, line)

    def allHeadersReceived(self) -> None:
        self._in_head = False
        req = self.requests[-1]
        req.head_received(*self.request_line)
        if self._rejected:
            return
        if self._reading and not self._read_suspended:
            self._arm_read_timeout()  # from here on: the body, timed on the client's pauses
        _HTTPChannel.allHeadersReceived(self)

    def allContentReceived(self) -> None:
        self._end_read_timeout()
        if self._rejected:
            return  # answered already: the body's end must not start its request
        _HTTPChannel.allContentReceived(self)

    def _read_timed_out(self) -> None:
        self._reading = False
        self.reject(408)

    def lineLengthExceeded(self, line: bytes) -> None:
        # One line longer than MAX_LENGTH: LineReceiver would just drop the connection.
        # The request line itself is a 414 (RFC 9112 3), a header line a 431.
        self.reject(431 if self._in_head else 414)

    def checkPersistence(self, request, version: bytes) -> bool:
        # HTTPChannel splits Connection on spaces only: "close, te" would keep it open.
        tokens = connection_tokens(request.requestHeaders.getRawHeaders(b"connection", ()))
        if version != b"HTTP/1.1":
            return False
        if b"close" in tokens:
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return True

    def bad_request(self, head_too_large: bool) -> None:
        self.reject(431 if head_too_large else 400)

    def reject(self, status: int) -> None:
        """A minimal response for a request we will not read further; closes the connection.
        Nothing is read or written on it afterwards (a body that ends later, a worker's late
        answer): the rejection is the last response. When the response to this request has
        already begun, a status cannot be sent any more: the connection is cut."""
        if (
            self._rejected
            or self.transport is None
            or getattr(self.transport, "disconnecting", False)
        ):
            return
        self.flush()
        self._rejected = True
        self._in_head = False
        self._end_read_timeout()
        request = self.requests[-1] if self.requests else None
        if request is not None and request.startedWriting:
            self.transport.abortConnection()
            return
        reason = pages.REASONS.get(status, "Error").encode()
        body = b"%d %s\n" % (status, reason)
        if request is not None:
            self._fill_request_line(request)
        sent = b"" if request is not None and request.method == b"HEAD" else body
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d"
            b"\r\nConnection: close\r\n\r\n%s" % (status, reason, len(body), sent)
        )
        self.transport.loseConnection()
        self._log_rejection(request, status, len(sent))

    def _fill_request_line(self, request) -> None:
        """Method, target and version on a request rejected before its head was complete:
        what its request line said, or '-'."""
        for name, parsed in (("method", "_command"), ("uri", "_path"), ("clientproto", "_version")):
            if name not in vars(request):
                setattr(request, name, getattr(self, parsed, None) or b"-")

    def _log_rejection(self, request, status: int, size: int) -> None:
        """The access log line and metrics of a rejected request, as for any other."""
        if request is None:
            request = self.site.requestFactory(self, len(self.requests))
            self._fill_request_line(request)
        request.code = status
        request.sentLength = size
        self.site.log(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cork = None
        self._end_read_timeout()
        _HTTPChannel.connectionLost(self, reason)  # setTimeout(None): the idle timeout


class ProxySite(server.Site):
    """The Site for the public port; ``front`` does the routing, ``log_access`` gets each
    finished request (see AccessLog)."""

    # HTTPChannel itself, not twisted.web's protocol-negotiating wrapper around one:
    protocol = ProxyChannel  # type: ignore[assignment]
    requestFactory = ProxyRequest
    displayTracebacks = False

    def __init__(self, front: Front, log_access: Callable) -> None:
        server.Site.__init__(self, resource.Resource())
        self.front = front
        self._log_access = log_access

    def buildProtocol(self, addr):
        channel = server.Site.buildProtocol(self, addr)
        # server.idle_timeout_seconds as configured now (a reload changes new connections)
        channel.timeOut = self.front.state.config.server.idle_timeout_seconds
        return channel

    def log(self, request) -> None:
        self._log_access(request)

    def logPrefix(self) -> str:
        return "tqserver.proxy"
