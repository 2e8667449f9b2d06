"""One client connection of the WSGI server: a loop of HTTP/1.1 requests (keep-alive),
each parsed into a WSGI environ and handed to the application."""

from __future__ import annotations

import _socket
import io
import time
from typing import TYPE_CHECKING, Any

from tqserver.worker.body import EMPTY, ChunkedInput, Input, SizedInput
from tqserver.worker.common import (
    MAX_BLANK_LINES,
    MAX_DISCARD,
    MAX_HEADERS,
    MAX_LINE,
    REASONS,
    BadRequestBody,
    ClientDisconnected,
    http_date,
    is_token,
    log,
    unquote,
)
from tqserver.worker.response import Response

if TYPE_CHECKING:
    from tqserver.worker.server import Server


class SockReader(io.RawIOBase):
    """Raw reader over a _socket.socket, for io.BufferedReader."""

    def __init__(self, sock) -> None:
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        return self._sock.recv_into(buf)


class ConnState:
    __slots__ = ("idle", "served", "sock")

    def __init__(self, sock) -> None:
        self.sock = sock
        self.idle = True
        self.served = 0


class Connection:
    """One client connection: a loop of HTTP/1.1 requests (keep-alive)."""

    def __init__(self, server: Server, sock, client_address, state: ConnState) -> None:
        self.server = server
        self.connection = sock
        self.client_address = client_address
        self.state = state
        self.rfile = io.BufferedReader(SockReader(sock), 65536)
        self._linger = False

    def handle(self) -> None:
        srv = self.server
        conn = self.connection
        state = self.state
        blank = 0
        while True:
            with srv.lock:
                if srv.draining and state.served:
                    return
                state.idle = True
            try:
                conn.settimeout(srv.idle_timeout)
                line = self.rfile.readline(MAX_LINE + 1)
            except OSError:
                return
            finally:
                with srv.lock:
                    state.idle = False
            if not line:
                return
            if line in (b"\r\n", b"\n"):
                blank += 1
                if blank > MAX_BLANK_LINES:
                    return
                continue
            blank = 0
            try:
                conn.settimeout(srv.read_timeout)
                keep = self.handle_request(line)
            except OSError:
                return
            state.served += 1
            if not keep:
                return

    def close(self) -> None:
        conn = self.connection
        if self._linger:
            # Unread request body: half-close and swallow what the client still
            # sends, so that our response is not destroyed by a TCP reset.
            try:
                conn.shutdown(_socket.SHUT_WR)
                conn.settimeout(0.5)
                end = time.monotonic() + 2.0
                total = 0
                while total < MAX_DISCARD and time.monotonic() < end:
                    data = conn.recv(65536)
                    if not data:
                        break
                    total += len(data)
            except OSError:
                pass
        else:
            try:
                conn.shutdown(_socket.SHUT_WR)
            except OSError:
                pass
        try:
            self.rfile.close()
        except Exception:
            pass
        conn.close()

    # -- helpers ------------------------------------------------------------

    def _send_simple(
        self,
        code: int,
        body: bytes,
        keep: bool,
        head: bool = False,
        ctype: str = "text/plain; charset=utf-8",
    ) -> bool:
        if self.server.draining:
            keep = False
        reason = "OK" if code == 200 else REASONS.get(code, "Error")
        parts = [
            b"HTTP/1.1 %d %s\r\n" % (code, reason.encode("ascii")),
            b"Content-Type: %s\r\n" % ctype.encode("latin-1"),
            b"Content-Length: %d\r\n" % len(body),
            b"Cache-Control: no-store\r\n",
            b"Date: %s\r\n" % http_date(),
        ]
        if not keep:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        if not head:
            parts.append(body)
        try:
            self.connection.sendall(b"".join(parts))
        except OSError:
            return False
        return keep

    def _error(self, code: int, detail: str = "") -> bool:
        msg = f"{code} {REASONS.get(code, 'Error')}\n"
        if detail:
            msg += detail + "\n"
        self._linger = True
        return self._send_simple(code, msg.encode("utf-8", "replace"), False)

    def _send_continue(self) -> None:
        try:
            self.connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        except OSError as e:
            raise ClientDisconnected(f"sending 100 Continue: {e}") from None

    # -- one request ----------------------------------------------------------

    def handle_request(self, line: bytes) -> bool:
        srv = self.server
        if len(line) > MAX_LINE:
            return self._error(414)
        parts = line.decode("latin-1").split()
        if len(parts) != 3:
            return self._error(400, "malformed request line")
        method, target, version = parts
        if not is_token(method):
            return self._error(400, "malformed method")
        if version == "HTTP/1.1":
            http11 = True
        elif version == "HTTP/1.0":
            http11 = False
        elif version.startswith("HTTP/1.") and version[7:].isdigit():
            http11 = True
        elif version.startswith("HTTP/") and len(version) == 8 and version[5].isdigit():
            return self._error(505)
        else:
            return self._error(400, "malformed HTTP version")

        env: dict[str, Any] = srv.base_environ.copy()
        rfile = self.rfile
        count = 0
        while True:
            h = rfile.readline(MAX_LINE + 1)
            if not h:
                return False
            if h in (b"\r\n", b"\n"):
                break
            count += 1
            if len(h) > MAX_LINE or count > MAX_HEADERS:
                return self._error(431)
            if h[0] in (32, 9):
                return self._error(400, "obsolete header line folding")
            raw_name, sep, raw_value = h.partition(b":")
            if not sep:
                return self._error(400, "malformed header line")
            name = raw_name.decode("latin-1")
            if not is_token(name):
                return self._error(400, "malformed header name")
            value = raw_value.strip().decode("latin-1")
            if "_" in name:
                continue  # ambiguous once mapped to CGI names; nginx drops them too
            key = name.upper().replace("-", "_")
            if key == "CONTENT_LENGTH":
                if env.get(key, value) != value:
                    return self._error(400, "conflicting Content-Length headers")
                env[key] = value
            elif key == "CONTENT_TYPE":
                env[key] = value
            else:
                key = "HTTP_" + key
                old = env.get(key)
                if old is None:
                    env[key] = value
                else:
                    env[key] = old + ("; " if key == "HTTP_COOKIE" else ",") + value

        # connection persistence
        tokens = env.get("HTTP_CONNECTION", "").lower()
        if http11:
            keep = "close" not in tokens
        else:
            keep = "keep-alive" in tokens
        if srv.draining:
            keep = False

        # request body
        cont = None
        expect = env.get("HTTP_EXPECT")
        if expect is not None:
            if expect.lower() == "100-continue":
                if http11:
                    cont = self._send_continue
            else:
                return self._error(417)
        inp: Input
        te = env.get("HTTP_TRANSFER_ENCODING")
        cl = env.get("CONTENT_LENGTH")
        if te is not None:
            if te.strip().lower() != "chunked":
                return self._error(501, "unsupported Transfer-Encoding")
            if cl is not None:  # RFC 7230 3.3.3: chunked wins, then close
                del env["CONTENT_LENGTH"]
                keep = False
            inp = ChunkedInput(rfile, cont)
        elif cl is not None:
            if not (cl.isascii() and cl.isdigit()):
                return self._error(400, "bad Content-Length")
            n = int(cl)
            inp = SizedInput(rfile, n, cont) if n else EMPTY
        else:
            inp = EMPTY

        # target
        if target.startswith("/"):
            pass
        elif target == "*":
            pass
        elif target.lower().startswith(("http://", "https://")):
            rest = target.split("://", 1)[1]
            slash = rest.find("/")
            target = rest[slash:] if slash >= 0 else "/"
        else:
            return self._error(400, "malformed request target")
        path, _, query = target.partition("?")

        head = method == "HEAD"
        app = srv.app
        if path == srv.health_path and method in ("GET", "HEAD"):
            if srv.draining:
                return self._send_simple(503, b"draining", False, head)
            if srv.app_health:
                app = srv.health_app  # the app's own answer, unless it has none (404)
            else:
                ok = self._send_simple(200, b"ok", keep and inp is EMPTY, head)
                if inp is not EMPTY:
                    self._linger = True
                return ok

        env["REQUEST_METHOD"] = method
        env["PATH_INFO"] = unquote(path)
        env["QUERY_STRING"] = query
        env["REQUEST_URI"] = env["RAW_URI"] = target
        prefix = env.get("HTTP_X_FORWARDED_PREFIX")
        if prefix and prefix[0] == "/" and "?" not in prefix:
            # Mounted under a route: the app generates links, redirects and cookie paths
            # under it without any setting of its own (SCRIPT_NAME + PATH_INFO).
            prefix = prefix.rstrip("/")
            env["SCRIPT_NAME"] = unquote(prefix)
            env["REQUEST_URI"] = prefix + target
        env["SERVER_PROTOCOL"] = version
        env["REMOTE_ADDR"] = self.client_address[0]
        env["REMOTE_PORT"] = str(self.client_address[1])
        env["wsgi.input"] = inp
        proto = env.get("HTTP_X_FORWARDED_PROTO")
        if proto:
            proto = proto.split(",", 1)[0].strip().lower()
            if proto in ("http", "https"):
                env["wsgi.url_scheme"] = proto
                if proto == "https":
                    env["HTTPS"] = "on"

        resp = Response(self.connection, keep, head, http11, srv)
        result = None
        try:
            result = app(env, resp.start_response)
            try:
                if hasattr(result, "__await__"):
                    result.close()
                    raise TypeError(
                        "the application returned a coroutine: it is an ASGI application "
                        "served as WSGI (name it in python.app, or give serve() the app "
                        "object itself)"
                    )
                if isinstance(result, (list, tuple)) and not resp.sent:
                    resp.send_all(result)
                else:
                    for data in result:
                        if data:
                            resp.write(data)
                    resp.finish()
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except ClientDisconnected:
            return False  # client gone (mid-body or mid-response): nobody to answer
        except BadRequestBody as e:
            if not resp.sent:
                self._error(400, str(e))
            return False
        except Exception:
            import traceback

            log(f"error in {method} {target}:\n{traceback.format_exc().rstrip()}")
            if not resp.sent and not resp.gone:
                self._linger = True
                self._send_simple(500, b"Internal Server Error\n", False)
            return False

        keep = resp.keep and not resp.gone
        if inp is not EMPTY:
            if not keep:
                self._linger = True
            elif inp.continue_pending:
                keep = False  # the client may never send the body
            else:
                try:
                    keep = inp.discard(MAX_DISCARD)
                except (ClientDisconnected, BadRequestBody):
                    return False
                if not keep:
                    self._linger = True
        return keep
