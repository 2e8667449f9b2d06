"""The public HTTP side: a twisted.web Site whose requests are routed as soon as their head
has arrived, so bodies stream to and from worker instances with backpressure.

Where a request goes: ``ProxyRequest.head_received`` asks the ``Front`` for a plan — a
reserved endpoint, a static file from public/, an error page, or a ``Forward`` to an
instance of the worker that owns the longest matching route.
"""
from __future__ import annotations

import io
import itertools
import os
import re
from typing import Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.http_headers import Headers

from . import pages, static
from .deadlines import Deadlines
from .events import live_reload_snippet
from .fastcgi import FastCGIPool
from .router import strip_prefix
from .upstream import UpstreamConnection, UpstreamPool, UpstreamSink
from .wire import write_now

log = Logger()

# Headers that describe one hop, never forwarded (RFC 9110 7.6.1), plus httpoxy's `Proxy`.
HOP_BY_HOP = frozenset([b"connection", b"keep-alive", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"transfer-encoding",
                        b"upgrade", b"proxy-connection", b"proxy"])
_FORWARDED = frozenset([b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                        b"x-forwarded-prefix", b"x-request-id", b"x-tqserver-relay"])
# Request headers never relayed as they are (Transfer-Encoding: the body is re-framed).
_NOT_RELAYED = HOP_BY_HOP | _FORWARDED
# Response headers never relayed from the worker (X-Request-ID: the proxy sets its own).
_NOT_RELAYED_BACK = HOP_BY_HOP | {b"x-request-id"}
# twisted.web.http is wrapped in a deprecation proxy whose attribute lookups are slow;
# bind the class once instead of on every call.
_HTTPChannel = http.HTTPChannel
_NO_BODY_CODES = http.NO_BODY_CODES
_SANE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:@/+=-]{1,128}$")
MAX_ATTEMPTS = 3


_ID_PREFIX = os.urandom(11).hex().encode()   # 22 hex + 10 of counter = 32, like a uuid
_id_counter = itertools.count(1)


def next_request_id() -> bytes:
    """Unique per process run: a random prefix and a counter (uuid4 per request showed
    in profiles)."""
    return b"%s%010x" % (_ID_PREFIX, next(_id_counter))


def remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 5.2.4, so '/hello/../index' is routed (and forwarded) as '/index'."""
    out = []
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


class Front:
    """Decides what each request is (the proxy's routing brain); it only reads the
    supervisor's current snapshot, never waits on it."""

    def __init__(self, supervisor, reactor) -> None:
        self.supervisor = supervisor
        self.reactor = reactor
        self.upstreams = UpstreamPool(reactor)
        self.deadlines = Deadlines(reactor)   # the per-request timeouts (read, idle, write)
        self.fastcgi = FastCGIPool(reactor)
        self.reserved = None     # set by the supervisor: reserved.Reserved
        # In a proxy process (server.proxy_processes > 1): request -> Forward that hands a
        # reserved endpoint to the supervisor, which answers those.
        self.relay: Optional[Callable[["ProxyRequest"], "Forward"]] = None
        from .fastcgi_forward import FastCGIForward
        self.forwards = {"php": FastCGIForward}   # worker type -> its Forward class

    @property
    def dev(self) -> bool:
        return self.supervisor.mode == "dev"

    def live_reload_snippet(self, worker: str) -> bytes:
        events = self.supervisor.config.admin.path.rstrip("/") + "/events"
        return live_reload_snippet(worker, events)

    def plan(self, request: "ProxyRequest") -> Optional["Forward"]:
        """Either start forwarding now (returns the Forward) or leave a renderer on the
        request for when its body is complete (returns None)."""
        cfg = self.supervisor.config
        path = request.path
        if self.reserved is not None:
            handler = self.reserved.match(path)
            if handler is not None:
                if self.relay is not None:
                    return self.relay(request)
                request.renderer = handler
                return None
        hit = self.supervisor.routes.match(path)
        if hit is None:
            request.renderer = error_renderer(404, "No worker serves this path.")
            return None
        route, pool = hit
        request.worker_pool = pool
        rest = strip_prefix(route, path)
        if request.method in (b"GET", b"HEAD") and pool.public_dir is not None:
            found = static.resolve_public_file(pool.public_dir, rest)
            if found is not None:
                request.renderer = lambda req: static.serve_file(req, found)
                return None
        if self.dev and pool.build_error:
            request.renderer = error_renderer(
                500, f"The last build of worker '{pool.name}' failed; the page reloads after "
                     "the next good build.", output=pool.build_error, title="Build failed",
                live_reload=pool.name)
            return None
        target = (rest if pool.spec.config.strip_prefix else path)
        query = request.uri.partition(b"?")
        if query[1]:
            target += b"?" + query[2]
        forward = self.forwards.get(pool.spec.type, Forward)
        return forward(self, request, pool, route, target, cfg)


def error_renderer(status: int, detail: str = "", output: Optional[str] = None,
                   title: Optional[str] = None, retry_after: Optional[int] = None,
                   live_reload: Optional[str] = None) -> Callable:
    def render(request: "ProxyRequest") -> None:
        send_error(request, status, detail, output=output, title=title,
                   retry_after=retry_after, live_reload=live_reload)
    return render


def send_error(request: "ProxyRequest", status: int, detail: str = "",
               output: Optional[str] = None, title: Optional[str] = None,
               retry_after: Optional[int] = None, live_reload: Optional[str] = None) -> None:
    """An error page; in dev, ``live_reload`` names the worker whose next swap reloads it."""
    if request.finished or request._disconnected:
        return
    if request.startedWriting:
        # Too late for a status: cut the response so the client sees it is incomplete.
        request.channel.transport.abortConnection()
        return
    front = request.front
    body = pages.error_page(status, detail, dev=front.dev, output=output, title=title)
    if front.dev and live_reload:
        body += front.live_reload_snippet(live_reload)
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"text/html; charset=utf-8"])
    request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
    request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
    request.responseHeaders.setRawHeaders(b"x-request-id", [request.request_id])
    if retry_after is not None:
        request.responseHeaders.setRawHeaders(b"retry-after", [str(retry_after).encode()])
    if request.method != b"HEAD":
        request.write(body)
    request.finish_when_read()


class Forward(UpstreamSink):
    """One request on its way to an instance and its response on the way back."""

    decorate = True    # dev mode: X-TQServer-Worker-* headers and the live-reload script

    def __init__(self, front: Front, request: "ProxyRequest", pool, route: str,
                 target: bytes, cfg) -> None:
        self.front = front
        self.request = request
        self.channel = getattr(request, "channel", None)   # a finished request forgets it
        self.pool = pool
        self.route = route
        self.target = target
        self.cfg = cfg
        self.instance = None
        self.instance_id: Optional[str] = None
        self.conn: Optional[UpstreamConnection] = None
        self.attempts = 0
        self.tried = set()
        self.pending_body: list = []
        self.body_complete = False
        self.response_started = False
        self.done = False
        self.timing = False   # the write timeout is armed (in front.deadlines)
        self.head: Optional[bytes] = None
        self.upgrade_head = None
        self.live_reload = False
        self.has_body = False
        self.chunked = False

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
        conn = self._idle_connection(inst)
        if conn is not None:   # the usual case: no Deferred, no pause
            self._connected(conn)
            return
        self.request.pause_reading()
        d = self._acquire(inst)
        d.addCallbacks(self._connected, self._connect_failed)

    def _idle_connection(self, inst) -> Optional[UpstreamConnection]:
        """A kept-alive connection to ``inst`` ready now, if there is one."""
        return self.front.upstreams.take_idle(inst.port)

    def _acquire(self, inst) -> defer.Deferred:
        """A connection to ``inst`` (pooled HTTP/1.1 here; FastCGI in FastCGIForward)."""
        return self.front.upstreams.acquire(inst.port)

    def _give_back(self, conn) -> None:
        """An unused connection back to its pool."""
        self.front.upstreams.release(conn)

    def _connect_failed(self, failure: Failure) -> None:
        inst, self.instance = self.instance, None
        if self.done:   # the client left while we connected: client_gone() did the accounting
            return
        inst.request_finished()
        self.tried.add(inst)
        log.warn("{worker}: cannot connect to {id} on port {port}: {why}",
                 worker=self.pool.name, id=inst.id, port=inst.port,
                 why=failure.getErrorMessage())
        if self.attempts < MAX_ATTEMPTS:
            self._connect()
        else:
            self._bad_gateway("could not connect to any instance")

    def _connected(self, conn: UpstreamConnection) -> None:
        if self.done:
            self._give_back(conn) if not conn.closed else None
            return
        self.conn = conn
        conn.send(self.head, self, self.request.method == b"HEAD", self.has_body, self.chunked)
        if self.has_body:
            for chunk in self.pending_body:
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
            return   # answered already (503, 502...): the rest of the body is discarded
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
        if request._disconnected:
            return
        self.response_started = True
        if code != 101 and not self.front.dev and request.relay_head(code, reason, headers):
            # prod: the worker's head relayed as raw lines (no Headers object work)
            request.registerProducer(self.conn, True)
            if self.conn.flushes_sink:
                self.channel.cork()
            return
        request.defaultContentType = None   # relay the worker's Content-Type, never invent one
        request.setResponseCode(code, reason or None)
        out = request.responseHeaders
        connection_tokens = [v.strip().lower() for n, vs in headers if n.lower() == b"connection"
                             for v in vs.split(b",")] if code != 101 else []
        # Transfer-Encoding overrides Content-Length (RFC 9112 6.3): the body is relayed
        # de-chunked, so the worker's length would misframe it for the client.
        framed_by_te = any(n.lower() == b"transfer-encoding" for n, _ in headers)
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-length" and framed_by_te:
                continue
            if lname in HOP_BY_HOP or lname in connection_tokens:
                if not (code == 101 and lname in (b"upgrade", b"connection")):
                    continue
            out.addRawHeader(name, value)
        if self.front.dev and self.decorate:
            inst = self.instance
            spec = self.pool.spec
            out.setRawHeaders(b"x-tqserver-worker-name", [spec.name.encode()])
            out.setRawHeaders(b"x-tqserver-worker-type", [spec.type.encode()])
            out.setRawHeaders(b"x-tqserver-worker-route", [spec.route.encode()])
            out.setRawHeaders(b"x-tqserver-worker-port", [str(inst.port).encode()])
            out.setRawHeaders(b"x-tqserver-worker-instance", [inst.id.encode()])
            self.live_reload = self._wants_live_reload(code, out)
        request.setHeader(b"x-request-id", request.request_id)
        if code == 101:
            self.upgrade_head = (code, reason, headers)
        else:
            request.registerProducer(self.conn, True)
            if self.conn.flushes_sink:
                # The head and what follows of the body in this read go out in one send.
                self.channel.cork()

    def _wants_live_reload(self, code: int, out) -> bool:
        """Dev: a full HTML page gets the live-reload script appended (browsers run a
        script after </html> as part of the body); its length changes, so the response
        is re-framed by chunking."""
        ctype = (out.getRawHeaders(b"content-type") or [b""])[0].lower()
        if (code != 200 or self.request.method == b"HEAD" or not ctype.startswith(b"text/html")
                or out.hasHeader(b"content-encoding") or out.hasHeader(b"content-range")):
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
        if request._disconnected:
            return
        if request.producer is not None:
            request.unregisterProducer()
        if self.live_reload:
            request.write(self.front.live_reload_snippet(self.pool.name))
        request.finish_when_read()
        self.upstream_flush()

    def upstream_failed(self, reason: Failure, retryable: bool) -> None:
        conn, self.conn = self.conn, None
        if self.done:
            return
        inst = self.instance
        self._finish_instance()
        if (retryable and self.attempts < MAX_ATTEMPTS and not self.response_started
                and not self.has_body):
            # A pooled connection the instance had already closed: try a fresh one.
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
        log.warn("{worker}: request to {id} failed: {why}", worker=self.pool.name,
                 id=inst.id if inst else "?", why=why)
        self._bad_gateway(f"the worker closed the connection ({why})")

    def upstream_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        from .splice import splice_upgrade
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
        connection_tokens = ()
        connection = headers.getRawHeaders(b"connection")
        if connection:
            connection_tokens = {t.strip().lower() for value in connection
                                 for t in value.split(b",")}
        has_body = False
        chunked = False
        upgrade = b"upgrade" in connection_tokens and headers.hasHeader(b"upgrade")
        for name, values in headers.getAllRawHeaders():
            lname = name.lower()
            if lname in _NOT_RELAYED:
                if lname == b"transfer-encoding":
                    chunked = any(b"chunked" in v.lower() for v in values)
                continue
            if lname in connection_tokens:
                continue
            if lname == b"content-length":
                has_body = values[0].strip() not in (b"0", b"")
            for value in values:
                out += (name, b": ", value, b"\r\n")
        if chunked:
            has_body = True
            out.append(b"Transfer-Encoding: chunked\r\n")
        if upgrade:
            out.append(b"Connection: upgrade\r\n")
            for value in headers.getRawHeaders(b"upgrade"):
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
        host = headers.getRawHeaders(b"host")
        host = host[0] if host else b""
        fhost = None
        trusted = self.cfg.server.trusted_proxies
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

    def __init__(self, request: "ProxyRequest") -> None:
        self.request = request

    def pauseProducing(self) -> None:
        self.request.pause_reading()

    def resumeProducing(self) -> None:
        self.request.resume_reading()

    def stopProducing(self) -> None:
        pass


class ProxyRequest(server.Request):
    """A twisted.web Request that is routed when its head arrives (see ProxyChannel)."""

    renderer: Optional[Callable] = None
    worker_pool = None
    forward: Optional[Forward] = None
    _body_read = False
    _finish_pending = False
    _reading_paused = False
    _request_id: Optional[bytes] = None
    raw_head: Optional[list] = None   # see relay_head
    _raw_length = False

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
        lines = []
        has_length = False
        n = 0
        for name, value in headers:
            lname = name.lower()
            if lname in _NOT_RELAYED_BACK:
                if lname == b"connection" or lname == b"transfer-encoding":
                    return False
                continue
            if lname == b"content-length":
                has_length = True
            lines += (name, b": ", value, b"\r\n")
            n += 1
        blob = b"".join(lines)
        if blob.count(b"\n") != n or blob.count(b"\r") != n:
            return False
        lines = [blob]
        for name, values in self.responseHeaders.getAllRawHeaders():   # e.g. Connection: close
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
        if self.raw_head is not None and not self.startedWriting:
            self._write_raw_head()
        server.Request.write(self, data)

    def _write_raw_head(self) -> None:
        lines, self.raw_head = self.raw_head, None
        self.startedWriting = 1
        version = self.clientproto
        code = self.code
        if (version == b"HTTP/1.1" and not self._raw_length and self.method != b"HEAD"
                and code not in _NO_BODY_CODES):
            lines.append(b"Transfer-Encoding: chunked\r\n")
            self.chunked = 1
        self.channel.write(b"%s %d %s\r\n%s\r\n" % (version, code, self.code_message,
                                                   b"".join(lines)))
        if self.method == b"HEAD" or code in _NO_BODY_CODES:
            self.write = lambda data: None   # as twisted.web does

    # -- called by ProxyChannel at the end of the head --------------------------------
    def head_received(self, command: bytes, uri: bytes, version: bytes) -> None:
        self.started_at = self.channel.site.front.reactor.seconds()
        self.site = self.channel.site
        self._front = self.site.front
        self.method, self.uri, self.clientproto = command, uri, version
        raw_path = uri.partition(b"?")[0]
        if raw_path[:1] != b"/":
            if raw_path.startswith((b"http://", b"https://")):   # absolute-form
                raw_path = b"/" + raw_path.split(b"/", 3)[-1] if raw_path.count(b"/") >= 3 else b"/"
            else:
                self.renderer = error_renderer(400, "The request target must be a path.")
                return
        if b"/." in raw_path or b"%2" in raw_path:
            raw_path = remove_dot_segments(raw_path)
        self.path = raw_path
        length = self.requestHeaders.getRawHeaders(b"content-length")
        max_body = self._front.supervisor.config.server.max_body_bytes
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
            self.content = io.BytesIO()   # the body streams to the worker, never kept here
            self._body_seen = 0
            return
        server.Request.gotLength(self, length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.forward is None:
            server.Request.handleContentChunk(self, data)
            return
        self._body_seen += len(data)
        if self._body_seen > self._front.supervisor.config.server.max_body_bytes:
            self.forward.client_gone()
            self.channel.reject(413)
            return
        self.forward.body_chunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._body_read = True
        if self.forward is None:
            server.Request.requestReceived(self, command, path, version)
            return
        self.args = {}
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

    def resume_reading(self) -> None:
        if self._reading_paused and self.channel is not None:
            self._reading_paused = False
            self.channel.transport.resumeProducing()

    def finish_when_read(self) -> None:
        """finish(), but only once the whole request body has been read: the channel cannot
        start the next request while this one's body is still arriving."""
        if self.finished or self._disconnected:
            return
        if not self._body_read:
            self._finish_pending = True
            self.resume_reading()
            return
        self.finish()

    def connectionLost(self, reason) -> None:
        if self.forward is not None:
            self.forward.client_gone()
        server.Request.connectionLost(self, reason)


class ProxyChannel(_HTTPChannel):
    """HTTPChannel that hands the request its method and target when the head is complete,
    enforces the whole-request read timeout, and answers 431 for oversized heads.

    A Forward may *cork* the channel while it relays one read of a response: what the
    request writes (head, body, chunk framing) collects here and leaves in one send at
    ``flush()``, which the Forward calls at the end of each read from the instance; the
    end of the request, a reject and loseConnection flush first, so nothing is reordered."""

    _reading = False      # a request is being read: its read timeout is armed
    _idle = False         # the idle timeout (TimeoutMixin's) is armed
    _cork: Optional[list] = None
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
        if self._secure is None:   # an interface adaptation each time otherwise
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
        else:
            self.transport.write(data)

    def writeSequence(self, iovec) -> None:
        if self._cork is not None:
            self._cork.extend(iovec)
        else:
            self.transport.writeSequence(iovec)

    def writeHeaders(self, version, code, reason, headers) -> None:
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

    def lineReceived(self, line: bytes) -> None:
        if not self._reading and line:
            front = self.site.front
            self._reading = True
            front.deadlines.set(self._read_timed_out,
                                front.supervisor.config.server.read_timeout_seconds)
        return _HTTPChannel.lineReceived(self, line)

    def allHeadersReceived(self) -> None:
        req = self.requests[-1]
        req.head_received(self._command, self._path, self._version)
        _HTTPChannel.allHeadersReceived(self)

    def _finishRequestBody(self, data: bytes) -> None:
        # What Twisted >= 23 does; older ones called allContentReceived() first, so a request
        # finished at once (an early answer, an error page) lost the pipelined request that
        # arrived in the same read as the end of its body.
        self._dataBuffer.append(data)
        self.allContentReceived()

    def allContentReceived(self) -> None:
        if self._reading:
            self._reading = False
            self.site.front.deadlines.cancel(self._read_timed_out)
        _HTTPChannel.allContentReceived(self)

    def _read_timed_out(self) -> None:
        self._reading = False
        self.reject(408)

    def lineLengthExceeded(self, line: bytes) -> None:
        # One line longer than MAX_LENGTH: LineReceiver would just drop the connection.
        self.reject(431 if self.requests else 400)

    def checkPersistence(self, request, version: bytes) -> bool:
        # HTTPChannel splits Connection on spaces only: "close, te" would keep it open.
        tokens = {t.strip().lower() for v in request.requestHeaders.getRawHeaders(b"connection", ())
                  for t in v.split(b",")}
        if version != b"HTTP/1.1":
            return False
        if b"close" in tokens:
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return True

    def _respondToBadRequestAndDisconnect(self) -> None:
        too_big = getattr(self, "_receivedHeaderSize", 0) > self.totalHeadersSize or \
            getattr(self, "_receivedHeaderCount", 0) > self.maxHeaders
        self.reject(431 if too_big else 400)

    def reject(self, status: int) -> None:
        """A minimal response for a request we will not read further; closes the connection."""
        if self.transport is None or getattr(self.transport, "disconnecting", False):
            return
        self.flush()
        reason = pages.REASONS.get(status, "Error").encode()
        body = b"%d %s\n" % (status, reason)
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d"
                             b"\r\nConnection: close\r\n\r\n%s" % (status, reason, len(body), body))
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self._cork = None
        if self._reading:
            self._reading = False
            self.site.front.deadlines.cancel(self._read_timed_out)
        _HTTPChannel.connectionLost(self, reason)   # setTimeout(None): the idle timeout


class ProxySite(server.Site):
    """The Site for the public port; ``front`` does the routing."""

    protocol = ProxyChannel
    requestFactory = ProxyRequest
    displayTracebacks = False

    def __init__(self, front: Front, timeout: float, log_access: Callable) -> None:
        server.Site.__init__(self, resource.Resource(), timeout=timeout)
        self.front = front
        self._log_access = log_access

    def log(self, request) -> None:
        self._log_access(request)

    def logPrefix(self) -> str:
        return "tqserver.proxy"
