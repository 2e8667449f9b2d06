"""Requests to PHP workers: the CGI environment of a public/ script, sent to php-fpm over
FastCGI.

``FastCGIForward`` is ``proxy.Forward`` with a FastCGI connection in place of an HTTP one.
Picking an instance, holding a request while one starts, retrying a refused connection,
the write timeout (504), 502/503 pages, dev-mode headers and streaming both ways with
backpressure all stay Forward's; this adds the script mapping and the CGI params.
"""

from __future__ import annotations

import functools

from twisted.internet import defer

from tqserver.fastcgi.cgi import cgi_params, resolve_script
from tqserver.fastcgi.client import FastCGIPool
from tqserver.fastcgi.codec import FastCGIError, encode_params
from tqserver.proxy import static
from tqserver.proxy.errors import send_error
from tqserver.proxy.forward import IDEMPOTENT, Forward
from tqserver.proxy.headers import _FORWARDED, HOP_BY_HOP, named_in_connection
from tqserver.proxy.router import strip_prefix
from tqserver.runtimes.php import connection_limit

MAX_STDERR_LINE = 8192
# A chunked upload is buffered to learn its length (PHP reads exactly CONTENT_LENGTH bytes),
# in memory: up to this much, or server.max_body_bytes if smaller; more is answered 413.
MAX_BUFFERED_BODY = 16 * 1024 * 1024


class FastCGIForward(Forward):
    """One request to a PHP worker and its response on the way back, over a connection
    from ``connections``. The Front makes it with ``forwarding(connections)``."""

    _stderr = b""  # a STDERR line still waiting for its end
    buffering = False  # a chunked body being collected before anything is sent
    _buffered = 0

    def __init__(self, connections: FastCGIPool, *args) -> None:
        Forward.__init__(self, *args)
        self.connections = connections

    def start(self) -> None:
        request = self.request
        headers = request.requestHeaders
        self.buffering = any(
            b"chunked" in v.lower() for v in headers.getRawHeaders(b"transfer-encoding", ())
        )
        public = self.pool.public_dir
        rest = strip_prefix(self.route, request.path)
        if (
            request.method not in (b"GET", b"HEAD")
            and public
            and static.resolve_public_file(public, rest, self.cfg.static.deny, php=True) is not None
        ):
            # A static file (GET and HEAD got it already): never the front controller.
            request.setHeader(b"allow", b"GET, HEAD")
            self._refuse(405, "Static files take GET and HEAD only.")
            return
        script = resolve_script(public, rest) if public else None
        if script is None:
            self._refuse(
                404,
                f"Worker '{self.pool.name}' has no PHP script for this path "
                "(and no public/index.php to handle it).",
            )
            return
        self.script = script
        if self.buffering:
            return  # body_finished() sends it, with its length
        self._send()

    def _send(self) -> None:
        length = self.request.requestHeaders.getRawHeaders(b"content-length")
        self.has_body = length is not None and bool(length) and length[0].strip() not in (b"0", b"")
        params = cgi_params(
            self.request, self.script, self.route, self.forwarded_headers(), self._not_passed()
        )
        try:
            self.head = encode_params(params)
        except FastCGIError:
            self._refuse(431, "A request header is too large for FastCGI.")
            return
        self._connect()

    # -- a chunked body: collected, then sent with a Content-Length ---------------------
    def body_chunk(self, data: bytes) -> None:
        if not self.buffering:
            Forward.body_chunk(self, data)
            return
        if self.done:
            return
        self._buffered += len(data)
        limit = min(MAX_BUFFERED_BODY, self.cfg.server.max_body_bytes)
        if self._buffered > limit:
            self._end()
            self.request.channel.reject(413)
            return
        assert self.pending_body is not None  # collected before anything is sent
        self.pending_body.append(data)

    def body_finished(self) -> None:
        if not self.buffering or self.done:
            Forward.body_finished(self)
            return
        self.buffering = False
        self.body_complete = True
        headers = self.request.requestHeaders
        headers.removeHeader(b"transfer-encoding")
        headers.setRawHeaders(b"content-length", [b"%d" % self._buffered])
        self._send()

    def _not_passed(self) -> frozenset:
        """Request headers that never become HTTP_* params: hop-by-hop ones (Proxy among
        them: no HTTP_PROXY), those named in Connection, and the client's X-Forwarded-*."""
        tokens = named_in_connection(self.request.requestHeaders.getRawHeaders(b"connection", ()))
        return HOP_BY_HOP | _FORWARDED | tokens

    def _refuse(self, status: int, detail: str) -> None:
        self._end()
        send_error(self.request, status, detail)

    def _idle_connection(self, inst):
        return None  # FastCGIPool.acquire decides (connection limits, fresh for bodies)

    def _acquire(self, inst) -> defer.Deferred:
        limit, keep_conn = connection_limit(self.pool.spec.config.php.pool)
        # A request that is never sent twice (a body streams through once; a method that
        # is not idempotent: see Forward._may_send_again) never goes on a kept connection
        # php-fpm may be closing (see FastCGIPool). A retry (the kept connection was closed
        # by a recycled php-fpm child) takes a fresh one too: other kept ones may be as stale.
        fresh = self.has_body or self.attempts > 1 or self.request.method not in IDEMPOTENT
        d = self.connections.acquire(inst.port, limit, keep_conn, fresh=fresh)
        if not d.called:
            # Waiting for a connection while every one is busy counts as waiting for an
            # answer.
            d.addTimeout(self._write_timeout(), self.front.reactor)
        return d

    def _connect_failed(self, failure) -> None:
        if self.done or not failure.check(defer.TimeoutError):
            Forward._connect_failed(self, failure)
            return
        inst, self.instance = self.instance, None
        assert inst is not None  # picked before connecting
        inst.request_finished()
        self._end()
        send_error(
            self.request,
            504,
            f"Worker '{self.pool.name}' did not answer in time: "
            "every connection to it stayed busy.",
        )

    def _give_back(self, conn) -> None:
        self.connections.release(conn)

    # -- STDERR: whole lines into the instance's log, tagged with the request ---------
    def upstream_stderr(self, data: bytes) -> None:
        data = self._stderr + data
        lines, _, self._stderr = data.rpartition(b"\n")
        if len(self._stderr) > MAX_STDERR_LINE:
            lines, self._stderr = data, b""
        if lines:
            self._log_stderr(lines)

    def _log_stderr(self, lines: bytes) -> None:
        inst = self.instance
        if inst is None:
            return
        tag = self.request.method + b" " + self.request.uri + b": "
        text = b"".join(
            tag + line.rstrip(b"\r") + b"\n" for line in lines.split(b"\n") if line.strip()
        )
        if text:
            inst.log_lines(text)

    def _flush_stderr(self) -> None:
        rest, self._stderr = self._stderr, b""
        if rest.strip():
            self._log_stderr(rest)

    def upstream_done(self) -> None:
        self._flush_stderr()
        Forward.upstream_done(self)

    def upstream_failed(self, reason) -> None:
        self._flush_stderr()
        Forward.upstream_failed(self, reason)


def forwarding(connections: FastCGIPool):
    """What the Front makes a PHP worker's requests with (a ``Front(forwards=...)`` entry)."""
    return functools.partial(FastCGIForward, connections)
