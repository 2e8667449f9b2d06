"""Runtime for Python workers.

A worker script hands its application to :func:`serve`::

    from tqserver.worker import serve

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hello\\n"]

    serve(app)                  # a WSGI application ...
    # serve(resource)           # ... or a twisted.web IResource

``serve`` listens on ``WORKER_HOST:WORKER_PORT`` (the worker contract in the
README), answers the health probe itself and shuts down gracefully on
SIGTERM/SIGINT: it stops accepting, closes idle keep-alive connections, lets
in-flight requests finish (at most ``WORKER_DRAIN_SECONDS``) and returns, so
the script exits 0. A second signal while draining exits at once with status 1.

Environment (all optional):

``WORKER_PORT`` / ``PORT``       port to listen on (default 8000)
``WORKER_HOST``                  address to listen on (default 127.0.0.1)
``WORKER_HEALTH_PATH``           health probe path (default ``/health``)
``WORKER_DRAIN_SECONDS``         shutdown drain bound (default 30)
``WORKER_IDLE_TIMEOUT_SECONDS``  keep-alive idle timeout (default 300)
``WORKER_READ_TIMEOUT_SECONDS``  socket timeout inside a request (default 60)

Start-up time is part of the dev loop (save -> new code served), so the WSGI
server is a small HTTP/1.1 implementation on the interpreter's C modules
(``_socket``, ``_thread``, ``_signal``, ``select``, ``io``): it does not import
``http.server`` (it pulls in http.client, email and ssl), nor
``socket``/``threading``/``signal``/``socketserver`` (their enum set-up is slow
on PyPy), nor Twisted (docs/performance.md has the import times).  Twisted is imported only to serve a
Twisted resource.  A thread per connection; keep-alive; chunked both ways.
"""

from __future__ import annotations

import _socket
import _thread
import io
import os
import select
import sys
import time

try:
    import _signal as _sig  # the C module: ``signal`` builds enums (slow on PyPy)
except ImportError:  # pragma: no cover
    import signal as _sig

__all__ = ["ClientDisconnected", "serve", "worker_info"]

_MAX_LINE = 65536  # request line / one header line
_MAX_HEADERS = 200
_MAX_DISCARD = 4 << 20  # unread request body we skip to keep a connection alive
_MAX_BLANK_LINES = 8  # tolerated empty lines before a request line

_HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    )
)
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_HEX_BYTES = frozenset(b"0123456789abcdefABCDEF")
_REASONS = {
    400: "Bad Request",
    404: "Not Found",
    414: "URI Too Long",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("", "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class ClientDisconnected(ConnectionError):
    """The client went away (raised by wsgi.input reads and write())."""


class _BadRequestBody(ValueError):
    """Malformed chunked request body."""


# --------------------------------------------------------------------------
# helpers


def worker_info() -> dict:
    """The worker's identity as set by the supervisor (README: "The worker contract").

    Keys: name, route, port (int or None), host, mode, type, dir, root, instance.
    Values are None when the variable is not set (e.g. run by hand).
    """
    env = os.environ
    port = env.get("WORKER_PORT") or env.get("PORT")
    try:
        port_num = int(port) if port else None
    except ValueError:
        port_num = None
    return {
        "name": env.get("WORKER_NAME"),
        "route": env.get("WORKER_ROUTE") or env.get("WORKER_PATH"),
        "port": port_num,
        "host": env.get("WORKER_HOST") or "127.0.0.1",
        "mode": env.get("WORKER_MODE"),
        "type": env.get("WORKER_TYPE"),
        "dir": env.get("WORKER_DIR"),
        "root": env.get("TQSERVER_ROOT"),
        "instance": env.get("WORKER_INSTANCE"),
    }


def _log(msg: str) -> None:
    try:
        sys.stderr.write("tqserver.worker[%d]: %s\n" % (os.getpid(), msg))
        sys.stderr.flush()
    except Exception:  # stderr closed: nothing sensible left to do
        pass


_date_cache = (0, b"")


def _http_date() -> bytes:
    global _date_cache
    now = int(time.time())
    cached = _date_cache
    if cached[0] == now:
        return cached[1]
    t = time.gmtime(now)
    value = (
        "%s, %02d %s %04d %02d:%02d:%02d GMT"
        % (_DAYS[t.tm_wday], t.tm_mday, _MONTHS[t.tm_mon], t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)
    ).encode("ascii")
    _date_cache = (now, value)
    return value


def _unquote(path: str) -> str:
    """Percent-decode a request path to a latin-1 "bytes as str" (PEP 3333)."""
    if "%" not in path:
        return path
    parts = path.encode("latin-1").split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        if len(part) >= 2 and part[0] in _HEX_BYTES and part[1] in _HEX_BYTES:
            out.append(bytes((int(part[:2], 16),)))
            out.append(part[2:])
        else:
            out.append(b"%")
            out.append(part)
    return b"".join(out).decode("latin-1")


def _is_token(s: str) -> bool:
    if not s:
        return False
    if s.isascii() and s.replace("-", "").isalnum():
        return True
    return all(c in _TOKEN_CHARS for c in s)


def _readable(sock) -> bool:
    try:
        if hasattr(select, "poll"):
            p = select.poll()
            p.register(sock, select.POLLIN)
            return bool(p.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return False


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        raise SystemExit("tqserver.worker: %s=%r is not a number" % (name, value))


# --------------------------------------------------------------------------
# wsgi.input


class _Input:
    """Common file-like surface of wsgi.input."""

    _cont = None  # callable sending "100 Continue" on first read, or None

    def _continue(self) -> None:
        cont = self._cont
        if cont is not None:
            self._cont = None
            cont()

    @property
    def continue_pending(self) -> bool:
        return self._cont is not None

    def read(self, size: int = -1) -> bytes:  # pragma: no cover - overridden
        return b""

    def readline(self, size: int = -1) -> bytes:  # pragma: no cover
        return b""

    def readlines(self, hint: int = -1) -> list:
        lines = []
        total = 0
        while True:
            line = self.readline()
            if not line:
                break
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self):
        while True:
            line = self.readline()
            if not line:
                return
            yield line

    def discard(self, limit: int) -> bool:
        """Skip the rest of the body; True if it ended within ``limit``."""
        while limit > 0:
            data = self.read(min(limit, 65536))
            if not data:
                return True
            limit -= len(data)
        return not self.read(1)


class _EmptyInput(_Input):
    def read(self, size: int = -1) -> bytes:
        return b""

    def readline(self, size: int = -1) -> bytes:
        return b""

    def discard(self, limit: int) -> bool:
        return True


_EMPTY = _EmptyInput()


class _SizedInput(_Input):
    """A body delimited by Content-Length."""

    def __init__(self, rfile, length: int, cont) -> None:
        self._rfile = rfile
        self.remaining = length
        self._cont = cont

    def read(self, size: int = -1) -> bytes:
        return self._read(size, line=False)

    def readline(self, size: int = -1) -> bytes:
        return self._read(size, line=True)

    def _read(self, size, line: bool) -> bytes:
        if self.remaining <= 0:
            return b""
        self._continue()
        if size is None or size < 0 or size > self.remaining:
            size = self.remaining
        try:
            data = (self._rfile.readline if line else self._rfile.read)(size)
        except OSError as e:
            self.remaining = 0
            raise ClientDisconnected("reading request body: %s" % e) from None
        # read() must return all it was asked for; readline() at least something
        if (len(data) < size) if not line else not data:
            self.remaining = 0
            raise ClientDisconnected("client closed the connection mid-body")
        self.remaining -= len(data)
        return data


class _ChunkedInput(_Input):
    """A body in Transfer-Encoding: chunked, decoded."""

    def __init__(self, rfile, cont) -> None:
        self._rfile = rfile
        self._cont = cont
        self._left = 0  # bytes left in the current chunk
        self._after_chunk = False
        self._done = False

    def _rl(self, limit: int) -> bytes:
        try:
            line = self._rfile.readline(limit)
        except OSError as e:
            self._done = True
            raise ClientDisconnected("reading request body: %s" % e) from None
        if not line:
            self._done = True
            raise ClientDisconnected("client closed the connection mid-body")
        return line

    def _next_chunk(self) -> None:
        if self._after_chunk:
            if self._rl(3).rstrip(b"\r\n") != b"":
                self._done = True
                raise _BadRequestBody("chunk data not followed by CRLF")
            self._after_chunk = False
        line = self._rl(1025)
        size = line.split(b";", 1)[0].strip()
        if not size or len(size) > 16 or any(c not in _HEX_BYTES for c in size):
            self._done = True
            raise _BadRequestBody("bad chunk size line %r" % line[:40])
        n = int(size, 16)
        if n == 0:
            for _ in range(_MAX_HEADERS + 1):  # trailers, ignored
                if self._rl(_MAX_LINE) in (b"\r\n", b"\n"):
                    break
            else:
                raise _BadRequestBody("too many trailer lines")
            self._done = True
        else:
            self._left = n
            self._after_chunk = True

    def _read_data(self, n: int, line: bool) -> bytes:
        try:
            data = self._rfile.readline(n) if line else self._rfile.read(n)
        except OSError as e:
            self._done = True
            raise ClientDisconnected("reading request body: %s" % e) from None
        if not data or (not line and len(data) < n):
            self._done = True
            raise ClientDisconnected("client closed the connection mid-body")
        self._left -= len(data)
        return data

    def read(self, size: int = -1) -> bytes:
        return self._read(size, line=False)

    def readline(self, size: int = -1) -> bytes:
        return self._read(size, line=True)

    def _read(self, size, line: bool) -> bytes:
        if size is None:
            size = -1
        self._continue()
        out = []
        got = 0
        while not self._done and (size < 0 or got < size):
            if self._left == 0:
                self._next_chunk()
                continue
            want = self._left if size < 0 else min(self._left, size - got)
            data = self._read_data(want, line)
            out.append(data)
            got += len(data)
            if line and data.endswith(b"\n"):
                break
        return b"".join(out)


class _FileWrapper:
    """wsgi.file_wrapper: iterate a file in blocks."""

    def __init__(self, filelike, blksize: int = 65536) -> None:
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self):
        read = self.filelike.read
        size = self.blksize
        while True:
            data = read(size)
            if not data:
                return
            yield data


# --------------------------------------------------------------------------
# response


class _Response:
    """start_response/write for one request, with framing decisions."""

    def __init__(self, sock, keep: bool, head: bool, http11: bool, server: _Server) -> None:
        self.sock = sock
        self.keep = keep
        self.head = head
        self.http11 = http11
        self.server = server
        self.status = None
        self.headers = None
        self.sent = False
        self.gone = False
        self.nobody = False
        self.chunked = False
        self.length = None
        self.written = 0

    def start_response(self, status, headers, exc_info=None):
        if exc_info:
            try:
                if self.sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response() called twice without exc_info")
        if (
            not isinstance(status, str)
            or len(status) < 3
            or not status[:3].isdigit()
            or (len(status) > 3 and status[3] != " ")
            or "\n" in status
            or "\r" in status
        ):
            raise ValueError("bad WSGI status %r" % (status,))
        for item in headers:
            name, value = item
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError("WSGI header %r: name and value must be str" % (item,))
            if not _is_token(name) or "\n" in value or "\r" in value:
                raise ValueError("bad WSGI header %r" % (item,))
        self.status = status
        self.headers = headers
        return self.write

    def _head(self, known_length) -> bytes:
        if self.status is None:
            raise AssertionError("the application did not call start_response()")
        status = self.status
        code = int(status[:3])
        lines = ["HTTP/1.1 ", status if len(status) > 3 else status + " ", "\r\n"]
        length = None
        has_date = False
        for name, value in self.headers:
            lname = name.lower()
            if lname == "content-length":
                value = value.strip()
                if not value.isdigit() or length is not None:
                    raise ValueError("bad Content-Length %r from the application" % value)
                length = int(value)
            elif lname in _HOP_BY_HOP:
                if lname == "connection" and "close" in value.lower():
                    self.keep = False
                continue
            elif lname == "date":
                has_date = True
            lines += (name, ": ", value, "\r\n")
        if not has_date:
            lines += ("Date: ", _http_date().decode("ascii"), "\r\n")
        if code < 200 or code in (204, 304):
            self.nobody = True
        elif length is not None:
            self.length = length
        elif known_length is not None:
            self.length = known_length
            lines += ("Content-Length: ", str(known_length), "\r\n")
        elif self.http11:
            self.chunked = True
            lines.append("Transfer-Encoding: chunked\r\n")
        else:
            self.keep = False  # HTTP/1.0 without a length: delimited by close
        if self.server.draining:
            self.keep = False
        if not self.keep:
            lines.append("Connection: close\r\n")
        elif not self.http11:
            lines.append("Connection: keep-alive\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    def _frame(self, data: bytes) -> bytes:
        if self.nobody or self.head or not data:
            return b""
        if self.length is not None:
            room = self.length - self.written
            if len(data) > room:
                if room >= 0:
                    _log("application wrote more than its Content-Length; truncated")
                data = data[: max(room, 0)]
            self.written += len(data)
            return data
        self.written += len(data)
        if self.chunked:
            return b"%x\r\n%s\r\n" % (len(data), data)
        return data

    def _send(self, data: bytes) -> None:
        if self.gone:
            raise ClientDisconnected("client disconnected")
        if not data:
            return
        try:
            self.sock.sendall(data)
        except OSError as e:
            self.gone = True
            raise ClientDisconnected("writing response: %s" % e) from None

    def write(self, data) -> None:
        if self.status is None:
            raise AssertionError("write() before start_response()")
        if not isinstance(data, bytes):
            if isinstance(data, (bytearray, memoryview)):
                data = bytes(data)
            else:
                raise TypeError("WSGI body chunks must be bytes, not %s" % type(data).__name__)
        if not self.sent:
            if not data:
                return
            head = self._head(None)
            self.sent = True
            self._send(head + self._frame(data))
        else:
            self._send(self._frame(data))

    def send_all(self, chunks) -> None:
        """The app returned a list/tuple: the whole body is known."""
        for c in chunks:
            if not isinstance(c, bytes):
                raise TypeError("WSGI body chunks must be bytes, not %s" % type(c).__name__)
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        head = self._head(len(body))
        self.sent = True
        self._send(head + self._frame(body))
        self._check_length()

    def finish(self) -> None:
        if not self.sent:
            head = self._head(0)
            self.sent = True
            self._send(head)
        elif self.chunked and not self.head:
            self._send(b"0\r\n\r\n")
        self._check_length()

    def _check_length(self) -> None:
        if (
            self.length is not None
            and not self.head
            and not self.nobody
            and self.written < self.length
        ):
            _log(
                "application wrote %d bytes of its Content-Length %d; closing the connection"
                % (self.written, self.length)
            )
            self.keep = False
            self.gone = True  # the framing is broken: never reuse the connection


# --------------------------------------------------------------------------
# connection handler


class _SockReader(io.RawIOBase):
    """Raw reader over a _socket.socket, for io.BufferedReader."""

    def __init__(self, sock) -> None:
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        return self._sock.recv_into(buf)


class _ConnState:
    __slots__ = ("idle", "served", "sock")

    def __init__(self, sock) -> None:
        self.sock = sock
        self.idle = True
        self.served = 0


class _Connection:
    """One client connection: a loop of HTTP/1.1 requests (keep-alive)."""

    def __init__(self, server: _Server, sock, client_address, state: _ConnState) -> None:
        self.server = server
        self.connection = sock
        self.client_address = client_address
        self.state = state
        self.rfile = io.BufferedReader(_SockReader(sock), 65536)
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
                line = self.rfile.readline(_MAX_LINE + 1)
            except OSError:
                return
            finally:
                with srv.lock:
                    state.idle = False
            if not line:
                return
            if line in (b"\r\n", b"\n"):
                blank += 1
                if blank > _MAX_BLANK_LINES:
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
                while total < _MAX_DISCARD and time.monotonic() < end:
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
        reason = "OK" if code == 200 else _REASONS.get(code, "Error")
        parts = [
            b"HTTP/1.1 %d %s\r\n" % (code, reason.encode("ascii")),
            b"Content-Type: %s\r\n" % ctype.encode("latin-1"),
            b"Content-Length: %d\r\n" % len(body),
            b"Cache-Control: no-store\r\n",
            b"Date: %s\r\n" % _http_date(),
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
        msg = "%d %s\n" % (code, _REASONS.get(code, "Error"))
        if detail:
            msg += detail + "\n"
        self._linger = True
        return self._send_simple(code, msg.encode("utf-8", "replace"), False)

    def _send_continue(self) -> None:
        try:
            self.connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        except OSError as e:
            raise ClientDisconnected("sending 100 Continue: %s" % e) from None

    # -- one request ----------------------------------------------------------

    def handle_request(self, line: bytes) -> bool:
        srv = self.server
        if len(line) > _MAX_LINE:
            return self._error(414)
        parts = line.decode("latin-1").split()
        if len(parts) != 3:
            return self._error(400, "malformed request line")
        method, target, version = parts
        if not _is_token(method):
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

        env = srv.base_environ.copy()
        rfile = self.rfile
        count = 0
        while True:
            h = rfile.readline(_MAX_LINE + 1)
            if not h:
                return False
            if h in (b"\r\n", b"\n"):
                break
            count += 1
            if len(h) > _MAX_LINE or count > _MAX_HEADERS:
                return self._error(431)
            if h[0] in (32, 9):
                return self._error(400, "obsolete header line folding")
            name, sep, value = h.partition(b":")
            if not sep:
                return self._error(400, "malformed header line")
            name = name.decode("latin-1")
            if not _is_token(name):
                return self._error(400, "malformed header name")
            value = value.strip().decode("latin-1")
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
        te = env.get("HTTP_TRANSFER_ENCODING")
        cl = env.get("CONTENT_LENGTH")
        if te is not None:
            if te.strip().lower() != "chunked":
                return self._error(501, "unsupported Transfer-Encoding")
            if cl is not None:  # RFC 7230 3.3.3: chunked wins, then close
                del env["CONTENT_LENGTH"]
                keep = False
            inp = _ChunkedInput(rfile, cont)
        elif cl is not None:
            if not (cl.isascii() and cl.isdigit()):
                return self._error(400, "bad Content-Length")
            n = int(cl)
            inp = _SizedInput(rfile, n, cont) if n else _EMPTY
        else:
            inp = _EMPTY

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
        if path == srv.health_path and method in ("GET", "HEAD"):
            if srv.draining:
                return self._send_simple(503, b"draining", False, head)
            ok = self._send_simple(200, b"ok", keep and inp is _EMPTY, head)
            if inp is not _EMPTY:
                self._linger = True
            return ok

        env["REQUEST_METHOD"] = method
        env["PATH_INFO"] = _unquote(path)
        env["QUERY_STRING"] = query
        env["REQUEST_URI"] = env["RAW_URI"] = target
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

        resp = _Response(self.connection, keep, head, http11, srv)
        result = None
        try:
            result = srv.app(env, resp.start_response)
            try:
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
        except _BadRequestBody as e:
            if not resp.sent:
                self._error(400, str(e))
            return False
        except Exception:
            import traceback

            _log("error in %s %s:\n%s" % (method, target, traceback.format_exc().rstrip()))
            if not resp.sent and not resp.gone:
                self._linger = True
                self._send_simple(500, b"Internal Server Error\n", False)
            return False

        keep = resp.keep and not resp.gone
        if inp is not _EMPTY:
            if not keep:
                self._linger = True
            elif inp.continue_pending:
                keep = False  # the client may never send the body
            else:
                try:
                    keep = inp.discard(_MAX_DISCARD)
                except (ClientDisconnected, _BadRequestBody):
                    return False
                if not keep:
                    self._linger = True
        return keep


# --------------------------------------------------------------------------
# server


class _Server:
    """Listening socket, accept loop, connection threads, graceful drain."""

    def __init__(
        self, host: str, port: int, app, health_path: str, idle_timeout: float, read_timeout: float
    ) -> None:
        self.family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
        sock = _socket.socket(self.family, _socket.SOCK_STREAM)
        try:
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.host = host
        self.port = sock.getsockname()[1]
        self.app = app
        self.health_path = health_path
        self.idle_timeout = idle_timeout
        self.read_timeout = read_timeout
        self.draining = False
        self.lock = _thread.allocate_lock()
        self.conns = set()
        self._changed = _thread.allocate_lock()  # released when conns changes
        self._changed.acquire()
        self._stop = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.base_environ = {
            "SCRIPT_NAME": "",
            "SERVER_NAME": host,
            "SERVER_PORT": str(self.port),
            "SERVER_SOFTWARE": "tqserver.worker",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
            "wsgi.file_wrapper": _FileWrapper,
        }

    # -- connections ------------------------------------------------------------

    def _start(self, fd: int, addr) -> None:
        conn = _socket.socket(self.family, _socket.SOCK_STREAM, 0, fd)
        state = _ConnState(conn)
        with self.lock:
            self.conns.add(state)
        try:
            _thread.start_new_thread(self._serve_connection, (conn, addr, state))
        except Exception as e:  # can't start new thread
            _log("cannot serve a connection: %s" % e)
            conn.close()
            self._forget(state)

    def _serve_connection(self, conn, addr, state: _ConnState) -> None:
        handler = None
        try:
            try:
                conn.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            except OSError:
                pass
            handler = _Connection(self, conn, addr, state)
            handler.handle()
        except OSError:
            pass
        except BaseException:
            try:
                import traceback

                _log("connection from %s failed:\n%s" % (addr, traceback.format_exc().rstrip()))
            except BaseException:
                pass
        finally:
            try:
                if handler is not None:
                    handler.close()
                else:
                    conn.close()
            except BaseException:
                pass
            self._forget(state)

    def _forget(self, state: _ConnState) -> None:
        with self.lock:
            self.conns.discard(state)
            if self._changed.locked():
                self._changed.release()

    # -- accept loop ------------------------------------------------------------

    def request_stop(self) -> bool:
        """Async-signal friendly; returns False if a stop was already requested."""
        if self._stop:
            return False
        self._stop = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        return True

    def _accept_pending(self) -> None:
        while True:
            try:
                fd, addr = self.sock._accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:  # EMFILE and friends: back off a little
                _log("accept failed: %s" % e)
                time.sleep(0.05)
                return
            self._start(fd, addr)

    def run(self) -> None:
        lfd = self.sock.fileno()
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(lfd, select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            wait = lambda: [fd for fd, _ in poller.poll()]  # noqa: E731
        else:  # pragma: no cover - no poll() on this platform
            wait = lambda: select.select([lfd, self._wake_r], [], [])[0]  # noqa: E731
        while not self._stop:
            for fd in wait():
                if fd == lfd and not self._stop:
                    self._accept_pending()

    def drain(self, seconds: float) -> int:
        """Stop accepting, close idle connections, wait for the busy ones."""
        # Connections the kernel has already completed are ours to serve.
        self._accept_pending()
        self.close()
        with self.lock:
            self.draining = True
            for state in list(self.conns):
                # An idle keep-alive connection is closed, unless a request is
                # arriving on it right now (then it is served, then closed).
                if state.idle and not _readable(state.sock):
                    try:
                        state.sock.shutdown(_socket.SHUT_RD)  # wakes its reader
                    except OSError:
                        pass
        end = time.monotonic() + seconds
        while True:
            with self.lock:
                left_over = len(self.conns)
            left = end - time.monotonic()
            if not left_over or left <= 0:
                return left_over
            self._changed.acquire(True, min(left, 1.0))

    def close(self) -> None:
        self.sock.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1


def _serve_wsgi(app, host: str, port: int, health_path: str, drain_seconds: float) -> None:
    try:
        server = _Server(
            host,
            port,
            app,
            health_path,
            _env_float("WORKER_IDLE_TIMEOUT_SECONDS", 300.0),
            _env_float("WORKER_READ_TIMEOUT_SECONDS", 60.0),
        )
    except OSError as e:
        raise SystemExit(
            "tqserver.worker: cannot listen on %s:%s: %s" % (host, port, e.strerror or e)
        )

    def on_signal(signum, frame):
        if not server.request_stop():
            _log("second signal: exiting without waiting for in-flight requests")
            os._exit(1)

    installed = []
    try:
        for sig in (_sig.SIGTERM, _sig.SIGINT):
            installed.append((sig, _sig.signal(sig, on_signal)))
    except ValueError:
        _log("serve() not called from the main thread: no SIGTERM handling")

    info = worker_info()
    _log(
        "%s listening on http://%s:%d (WSGI)"
        % (info["name"] or "worker", host if ":" not in host else "[%s]" % host, server.port)
    )
    try:
        server.run()
        _log(
            "stopping: draining %d connection(s) (at most %gs)" % (len(server.conns), drain_seconds)
        )
        left = server.drain(drain_seconds)
        if left:
            _log("drain timed out with %d connection(s) still busy" % left)
        _log("stopped")
    finally:
        if server._wake_r != -1:
            server.close()
        for sig, old in installed:
            try:
                _sig.signal(sig, old)
            except (TypeError, ValueError):
                pass


# --------------------------------------------------------------------------
# Twisted resources


def _is_twisted_resource(obj) -> bool:
    mod = sys.modules.get("twisted.web.resource")
    if mod is None:
        return False
    try:
        return bool(mod.IResource.providedBy(obj))
    except Exception:
        return False


def _serve_resource(root, host: str, port: int, health_path: str, drain_seconds: float) -> None:
    from twisted.internet import reactor
    from twisted.internet.defer import maybeDeferred
    from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.python.failure import Failure
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    state = {"draining": False, "stopping": False}
    health_b = health_path.encode("latin-1")

    class HealthResource(Resource):
        isLeaf = True

        def render(self, request):
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.setHeader(b"cache-control", b"no-store")
            if state["draining"]:
                request.setResponseCode(503)
                return b"draining"
            return b"ok"

    health = HealthResource()

    class WorkerSite(Site):
        noisy = False
        displayTracebacks = False

        def __init__(self, resource):
            Site.__init__(self, resource)
            self.protocols = set()

        def log(self, request):  # the supervisor writes the access log
            pass

        def buildProtocol(self, addr):
            proto = Site.buildProtocol(self, addr)
            protocols = self.protocols
            protocols.add(proto)
            orig = proto.connectionLost

            def connectionLost(reason, _orig=orig, _proto=proto):
                protocols.discard(_proto)
                return _orig(reason)

            proto.connectionLost = connectionLost
            return proto

        def getResourceFor(self, request):
            if request.path == health_b and request.method in (b"GET", b"HEAD"):
                request.site = self
                request.sitepath = []
                return health
            return Site.getResourceFor(self, request)

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)

    site = WorkerSite(root)
    if ":" in host:
        endpoint = TCP6ServerEndpoint(reactor, port, backlog=1024, interface=host)
    else:
        endpoint = TCP4ServerEndpoint(reactor, port, backlog=1024, interface=host)
    outcome = []
    endpoint.listen(site).addBoth(outcome.append)  # TCP listen completes synchronously
    if not outcome or isinstance(outcome[0], Failure):
        err = outcome[0].value if outcome else "listen did not complete"
        raise SystemExit("tqserver.worker: cannot listen on %s:%s: %s" % (host, port, err))
    listening = outcome[0]

    def idle_and_busy():
        """Close idle connections; count the ones with a request in progress."""
        busy = 0
        for proto in list(site.protocols):
            # Site builds a _GenericHTTPChannelProtocol proxy around the HTTPChannel.
            channel = getattr(proto, "_channel", proto)
            transport = getattr(channel, "transport", None)
            if getattr(channel, "requests", None):
                busy += 1
            elif transport is not None:
                transport.loseConnection()
        return busy

    def begin_drain():
        state["draining"] = True
        _log(
            "stopping: draining %d connection(s) (at most %gs)"
            % (len(site.protocols), drain_seconds)
        )
        end = reactor.seconds() + drain_seconds

        def tick(_=None):
            try:
                busy = idle_and_busy()
            except Exception:
                import traceback

                _log("drain failed:\n%s" % traceback.format_exc().rstrip())
                busy = 0
            if busy and reactor.seconds() < end:
                reactor.callLater(0.02, tick)
                return
            if busy:
                _log("drain timed out with %d connection(s) still busy" % busy)
            _log("stopped")
            reactor.stop()

        maybeDeferred(listening.stopListening).addBoth(tick)

    def on_signal(signum, frame):
        if state["stopping"]:
            _log("second signal: exiting without waiting for in-flight requests")
            os._exit(1)
        state["stopping"] = True
        reactor.callFromThread(begin_drain)

    def install_handlers():
        for sig in (_sig.SIGTERM, _sig.SIGINT):
            _sig.signal(sig, on_signal)

    reactor.callWhenRunning(install_handlers)
    info = worker_info()
    _log(
        "%s listening on http://%s:%d (Twisted resource)"
        % (
            info["name"] or "worker",
            host if ":" not in host else "[%s]" % host,
            listening.getHost().port,
        )
    )
    reactor.run()


# --------------------------------------------------------------------------


def serve(app_or_resource, port=None, host=None) -> None:
    """Serve a WSGI application or a twisted.web resource until SIGTERM/SIGINT.

    ``port`` defaults to ``$WORKER_PORT`` (or ``$PORT``, else 8000), ``host``
    to ``$WORKER_HOST`` (else 127.0.0.1).  Returns after a graceful shutdown.
    """
    env = os.environ
    if host is None:
        host = env.get("WORKER_HOST") or "127.0.0.1"
    if port is None:
        raw = env.get("WORKER_PORT") or env.get("PORT") or "8000"
        try:
            port = int(raw)
        except ValueError:
            raise SystemExit("tqserver.worker: WORKER_PORT=%r is not a port number" % raw)
    port = int(port)
    health_path = (env.get("WORKER_HEALTH_PATH") or "/health").split("?", 1)[0]
    if not health_path.startswith("/"):
        health_path = "/" + health_path
    drain_seconds = max(0.0, _env_float("WORKER_DRAIN_SECONDS", 30.0))

    if _is_twisted_resource(app_or_resource):
        return _serve_resource(app_or_resource, host, port, health_path, drain_seconds)
    if not callable(app_or_resource):
        raise TypeError(
            "serve() needs a WSGI application (a callable) or a "
            "twisted.web IResource, not %r" % (app_or_resource,)
        )
    return _serve_wsgi(app_or_resource, host, port, health_path, drain_seconds)
