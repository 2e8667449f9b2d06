"""Forward: one request on its way to a worker instance, and its response on the way back."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from tqserver.proxy.access_log import trusted as trusted_proxies
from tqserver.proxy.errors import send_error
from tqserver.proxy.headers import _NOT_RELAYED, HOP_BY_HOP, named_in_connection
from tqserver.proxy.upstream import UpstreamConnection, UpstreamSink

if TYPE_CHECKING:
    from tqserver.proxy.front import Front
    from tqserver.proxy.site import ProxyChannel, ProxyRequest

log = Logger()

MAX_ATTEMPTS = 3  # connection attempts; a refused one provably never reached the worker
# RFC 9110 9.2.2: sending one of these twice has the effect of sending it once.
IDEMPOTENT = frozenset([b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"])


class Instance(Protocol):
    """What a Forward uses of a worker instance: the supervisor's (supervise.Instance) or
    a proxy process's mirror of one (fleet.child.MirrorInstance)."""

    id: str
    port: int
    inflight: int

    def request_started(self) -> None: ...
    def request_finished(self) -> None: ...
    def log_lines(self, data: bytes) -> None: ...


class Forward(UpstreamSink):
    """One request on its way to an instance and its response on the way back."""

    decorate = True  # dev mode: X-TQServer-Worker-* headers and the live-reload script

    def __init__(
        self, front: Front, request: ProxyRequest, pool, route: str, target: bytes, cfg
    ) -> None:
        self.front = front
        self.request = request
        # a finished request forgets it
        self.channel: ProxyChannel | None = getattr(request, "channel", None)
        self.pool = pool
        self.route = route
        self.target = target
        self.cfg = cfg
        self.instance: Instance | None = None
        self.instance_id: str | None = None
        self.conn: UpstreamConnection | None = None
        self.attempts = 0
        self.resent = False  # sent once more after an exchange that broke (_may_send_again)
        self.tried: set[Instance] = set()
        self.pending_body: list[bytes] | None = []  # until connected
        self.body_complete = False
        self.response_started = False
        self.done = False
        self.timing = False  # the write timeout is armed (in front.deadlines)
        # What the upstream connection sends first: the HTTP request head (bytes), or for
        # FastCGI the PARAMS records (list of bytes).
        self.head: Any = None
        self.upgrade_head: tuple[int, bytes, list[tuple[bytes, bytes]]] | None = None
        self.live_reload = False
        self.has_body = False
        self.chunked = False
        # when the request went to the instance (its last attempt), and how long it took
        self.sent_at: float | None = None
        self.upstream_seconds: float | None = None

    # -- request side ----------------------------------------------------------------
    def start(self) -> None:
        self.head, self.has_body, self.chunked = self._build_head()
        self._connect()

    def _connect(self) -> None:
        inst = self.pool.pick()
        if inst is not None and inst in self.tried:
            others = [i for i in self.pool.serving if i not in self.tried]
            inst = others[0] if others else None
        if inst is None:
            if not self.pool.serving and self.attempts < MAX_ATTEMPTS:
                # Nothing serving yet (starting, or restarting): hold the request.
                self.request.pause_reading()
                timeout = self.cfg.workers.startup_timeout_ms / 1000.0
                self.pool.wait_serving(timeout).addCallback(self._got_instance)
                return
            self._unavailable()
            return
        self._got_instance(inst)

    def _got_instance(self, inst) -> None:
        if self.done:
            return
        if inst is None:
            self._unavailable()
            return
        self.instance = inst
        self.instance_id = inst.id
        self.attempts += 1
        inst.request_started()
        # Sent again: on a fresh connection (the instance's kept ones may be as dead).
        conn = None if self.resent else self._idle_connection(inst)
        if conn is not None:  # the usual case: no Deferred, no pause
            self._connected(conn)
            return
        self.request.pause_reading()
        d = self._acquire(inst)
        d.addCallbacks(self._connected, self._connect_failed)

    def _idle_connection(self, inst) -> UpstreamConnection | None:
        """A kept-alive connection to ``inst`` ready now, if there is one."""
        return self.front.upstreams.take_idle(inst.port)

    def _acquire(self, inst) -> defer.Deferred:
        """A connection to ``inst`` (pooled HTTP/1.1 here; FastCGI in FastCGIForward); a
        new one when sending again: the instance's other kept ones may be as dead."""
        return self.front.upstreams.acquire(inst.port, fresh=self.resent)

    def _give_back(self, conn) -> None:
        """An unused connection back to its pool."""
        self.front.upstreams.release(conn)

    def _connect_failed(self, failure: Failure) -> None:
        inst, self.instance = self.instance, None
        if self.done:  # the client left while we connected: client_gone() did the accounting
            return
        assert inst is not None  # picked before connecting
        inst.request_finished()
        self.tried.add(inst)
        log.warn(
            "{worker}: cannot connect to {id} on port {port}: {why}",
            worker=self.pool.name,
            id=inst.id,
            port=inst.port,
            why=failure.getErrorMessage(),
        )
        if self.attempts < MAX_ATTEMPTS:
            self._connect()
        else:
            self._bad_gateway("could not connect to any instance")

    def _connected(self, conn: UpstreamConnection) -> None:
        if self.done:
            self._give_back(conn) if not conn.closed else None
            return
        self.conn = conn
        self.sent_at = self.front.reactor.seconds()
        head = self.head
        assert head is not None  # built by start()
        conn.send(head, self, self.request.method == b"HEAD", self.has_body, self.chunked)
        if self.has_body:
            for chunk in self.pending_body or ():
                conn.write_body(chunk)
            self.pending_body = None
            if self.body_complete:
                conn.finish_body()
                self._arm_timeout()
            else:
                conn.transport.registerProducer(self.request.body_producer, True)
        else:
            self._arm_timeout()
        self.request.resume_reading()

    def body_chunk(self, data: bytes) -> None:
        if self.done:
            return  # answered already (503, 502...): the rest of the body is discarded
        if self.conn is not None and self.pending_body is None:
            self.conn.write_body(data)
        elif self.pending_body is not None:
            self.pending_body.append(data)
            if self.conn is None and self.has_body:
                self.request.pause_reading()

    def body_finished(self) -> None:
        self.body_complete = True
        if self.conn is not None and not self.done:
            try:
                self.conn.transport.unregisterProducer()
            except Exception:
                pass
            self.conn.finish_body()
            self._arm_timeout()
        if self.done:
            self.request.finish_when_read()

    def _arm_timeout(self) -> None:
        if not self.timing and not self.response_started:
            self.timing = True
            self.front.deadlines.set(self._timed_out, self._write_timeout())

    def _write_timeout(self) -> float:
        """worker.yaml's timeouts.write_timeout_seconds when it sets one, else the server's."""
        config = self.pool.spec.config
        if "timeouts.write_timeout_seconds" in config.positions:
            return config.timeouts.write_timeout_seconds
        return self.cfg.server.write_timeout_seconds

    def _timed_out(self) -> None:
        self.timing = False
        if self.response_started or self.done:
            return
        self._abandon()
        send_error(self.request, 504, f"Worker '{self.pool.name}' did not answer in time.")

    # -- response side (UpstreamSink) ------------------------------------------------
    def upstream_response(self, code: int, reason: bytes, headers) -> None:
        if self.timing:
            self.timing = False
            self.front.deadlines.cancel(self._timed_out)
        request = self.request
        if request.disconnected:
            return
        conn, channel = self.conn, self.channel
        assert conn is not None and channel is not None  # the response comes from conn
        self.response_started = True
        if code != 101 and not self.front.dev and request.relay_head(code, reason, headers):
            # prod: the worker's head relayed as raw lines (no Headers object work)
            request.registerProducer(conn, True)
            if conn.flushes_sink:
                channel.cork()
            return
        request.defaultContentType = None  # relay the worker's Content-Type, never invent one
        request.setResponseCode(code, reason or None)
        out = request.responseHeaders
        named = (
            named_in_connection(v for n, v in headers if n.lower() == b"connection")
            if code != 101
            else ()
        )
        # Transfer-Encoding overrides Content-Length (RFC 9112 6.3): the body is relayed
        # de-chunked, so the worker's length would misframe it for the client.
        framed_by_te = any(n.lower() == b"transfer-encoding" for n, _ in headers)
        kept = []
        length_seen = False
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-length":
                # One length only (the upstream parser checked that repeats agree); none
                # when the body is re-framed, or after a 101.
                if framed_by_te or length_seen or code == 101:
                    continue
                length_seen = True
            if lname in HOP_BY_HOP or lname in named:
                if not (code == 101 and lname in (b"upgrade", b"connection")):
                    continue
            out.addRawHeader(name, value)
            kept.append((name, value))
        if self.front.dev and self.decorate:
            inst = self.instance
            assert inst is not None  # answering
            spec = self.pool.spec
            out.setRawHeaders(b"x-tqserver-worker-name", [spec.name.encode()])
            out.setRawHeaders(b"x-tqserver-worker-type", [spec.type.encode()])
            out.setRawHeaders(b"x-tqserver-worker-route", [spec.route.encode()])
            out.setRawHeaders(b"x-tqserver-worker-port", [str(inst.port).encode()])
            out.setRawHeaders(b"x-tqserver-worker-instance", [inst.id.encode()])
            self.live_reload = self._wants_live_reload(code, out)
        request.setHeader(b"x-request-id", request.request_id)
        if code == 101:
            self.upgrade_head = (code, reason, kept)
        else:
            request.registerProducer(conn, True)
            if conn.flushes_sink:
                # The head and what follows of the body in this read go out in one send.
                channel.cork()

    def _wants_live_reload(self, code: int, out) -> bool:
        """Dev: a full HTML page gets the live-reload script appended (browsers run a
        script after </html> as part of the body); its length changes, so the response
        is re-framed by chunking."""
        ctype = (out.getRawHeaders(b"content-type") or [b""])[0].lower()
        if (
            code != 200
            or self.request.method == b"HEAD"
            or not ctype.startswith(b"text/html")
            or out.hasHeader(b"content-encoding")
            or out.hasHeader(b"content-range")
        ):
            return False
        out.removeHeader(b"content-length")
        return True

    def upstream_data(self, data: bytes) -> None:
        self.request.write(data)

    def upstream_flush(self) -> None:
        channel = self.channel
        if channel is not None:
            channel.flush()

    def upstream_done(self) -> None:
        if self.has_body and not self.body_complete and self.conn is not None:
            # The worker answered before the whole request body was sent (an early 413, 401...):
            # the rest of the body is discarded, so that connection can carry nothing more.
            conn, self.conn = self.conn, None
            conn.abort()
        self._finish_instance()
        self._end()
        request = self.request
        if request.disconnected:
            return
        if request.producer is not None:
            request.unregisterProducer()
        if self.live_reload:
            request.write(
                self.front.live_reload_snippet(self.pool.name, self.pool.config_error_text)
            )
        request.finish_when_read()
        self.upstream_flush()

    def upstream_failed(self, reason: Failure) -> None:
        self.conn = None
        if self.done:
            return
        inst = self.instance
        self._finish_instance()
        if self._may_send_again(reason):
            self.resent = True
            self._connect()
            return
        self._end()
        request = self.request
        if request.producer is not None:
            request.unregisterProducer()
        if self.response_started and not request.startedWriting:
            # The worker's head came, but not one byte of body: the 502 must not carry its
            # headers (Content-Encoding, Set-Cookie, ETag...).
            connection = request.responseHeaders.getRawHeaders(b"connection")
            request.responseHeaders = Headers()
            request.raw_head = None
            if connection:
                request.responseHeaders.setRawHeaders(b"connection", connection)
        why = reason.getErrorMessage()
        log.warn(
            "{worker}: request to {id} failed: {why}",
            worker=self.pool.name,
            id=inst.id if inst else "?",
            why=why,
        )
        self._bad_gateway(f"the worker closed the connection ({why})")

    def _may_send_again(self, reason: Failure) -> bool:
        """After the request went out, the connection was lost with nothing relayed to the
        client: send it once more (to the least busy instance, on a fresh connection) only
        if its method is idempotent (RFC 9110 9.2.2) and it has no body (a streamed body is
        not kept). The worker may have acted on it already — the instance died, or closed
        a kept connection just as the request arrived — and a POST, PATCH or unknown method
        must never run twice: those get a 502, as does an invalid response (the worker did
        answer). A request that never reached an instance (the connection was refused) is
        retried whatever its method: see _connect_failed."""
        return (
            reason.check(ConnectionDone, ConnectionLost) is not None
            and not self.resent
            and not self.response_started
            and not self.has_body
            and self.request.method in IDEMPOTENT
        )

    def upstream_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        from tqserver.proxy.splice import splice_upgrade

        assert self.upgrade_head is not None  # upstream_response kept it
        code, reason, headers = self.upgrade_head
        splice_upgrade(self.request, conn, rest, code, reason, headers)

    # -- endings ---------------------------------------------------------------------
    def _unavailable(self) -> None:
        self._end()
        detail = f"Worker '{self.pool.name}' has no healthy instance"
        if self.pool.error:
            detail += f": {self.pool.error}"
        send_error(self.request, 503, detail + ".", retry_after=5, live_reload=self.pool.name)

    def _bad_gateway(self, why: str) -> None:
        self._end()
        send_error(self.request, 502, f"Worker '{self.pool.name}': {why}.")

    def _finish_instance(self) -> None:
        inst, self.instance = self.instance, None
        if inst is not None:
            inst.request_finished()

    def _end(self) -> None:
        self.done = True
        if self.sent_at is not None:
            self.upstream_seconds = self.front.reactor.seconds() - self.sent_at
        if self.timing:
            self.timing = False
            self.front.deadlines.cancel(self._timed_out)

    def client_gone(self) -> None:
        """The client disconnected: cancel the upstream request."""
        if not self.done:
            self._abandon()

    def _abandon(self) -> None:
        """Drop the upstream request (its connection is reset, never reused)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()
        self._finish_instance()
        self._end()

    # -- the upstream request head ---------------------------------------------------
    def _build_head(self):
        request = self.request
        headers = request.requestHeaders
        out = [request.method, b" ", self.target, b" HTTP/1.1\r\n"]
        named: frozenset[bytes] | tuple = ()
        connection = headers.getRawHeaders(b"connection")
        if connection:
            named = named_in_connection(connection)
        has_body = False
        chunked = False
        upgrade = b"upgrade" in named and headers.hasHeader(b"upgrade")
        for name, values in headers.getAllRawHeaders():
            lname = name.lower()
            if lname in _NOT_RELAYED:
                if lname == b"transfer-encoding":
                    chunked = any(b"chunked" in v.lower() for v in values)
                continue
            if lname in named:
                continue
            if lname == b"content-length":
                has_body = values[0].strip() not in (b"0", b"")
            for value in values:
                out += (name, b": ", value, b"\r\n")
        if chunked:
            has_body = True
            out.append(b"Transfer-Encoding: chunked\r\n")
        self.upgrade_requested = upgrade
        if upgrade:
            out.append(b"Connection: upgrade\r\n")
            for value in headers.getRawHeaders(b"upgrade", ()):
                out += (b"Upgrade: ", value, b"\r\n")
        for name, value in self.forwarded_headers():
            out += (name, b": ", value, b"\r\n")
        out.append(b"\r\n")
        return b"".join(out), has_body, chunked

    def forwarded_headers(self):
        """X-Forwarded-For/-Proto/-Host/-Prefix and X-Request-ID as this proxy sets them: the
        client's own values count only from server.trusted_proxies."""
        request = self.request
        client = request.client_ip
        headers = request.requestHeaders
        client_b = client.encode()
        proto = b"https" if request.isSecure() else b"http"
        hosts = headers.getRawHeaders(b"host")
        host = hosts[0] if hosts else b""
        fhost = None
        trusted = trusted_proxies(self.cfg.server.trusted_proxies)
        if trusted and client in trusted:
            xff = headers.getRawHeaders(b"x-forwarded-for")
            if xff:
                client_b = b", ".join(xff) + b", " + client_b
            given = headers.getRawHeaders(b"x-forwarded-proto")
            if given:
                proto = given[0]
            fhost = headers.getRawHeaders(b"x-forwarded-host")
        out = [(b"X-Forwarded-For", client_b), (b"X-Forwarded-Proto", proto)]
        if fhost or host:
            out.append((b"X-Forwarded-Host", fhost[0] if fhost else host))
        if self.pool.spec.config.strip_prefix and self.route != "/":
            out.append((b"X-Forwarded-Prefix", self.route.encode()))
        out.append((b"X-Request-ID", request.request_id))
        return out


class _BodyProducer:
    """Registered on the upstream transport while a request body streams to it: a full
    upstream send buffer pauses reading from the client."""

    def __init__(self, request: ProxyRequest) -> None:
        self.request = request

    def pauseProducing(self) -> None:
        self.request.pause_reading()

    def resumeProducing(self) -> None:
        self.request.resume_reading()

    def stopProducing(self) -> None:
        pass
