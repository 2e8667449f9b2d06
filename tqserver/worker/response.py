"""One WSGI response: start_response checks, the head, and the framing of the body
(Content-Length, chunked, or close-delimited for HTTP/1.0)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tqserver.worker.common import HOP_BY_HOP, ClientDisconnected, http_date, is_token, log

if TYPE_CHECKING:
    from tqserver.worker.server import Server


class Response:
    """start_response/write for one request, with framing decisions."""

    def __init__(self, sock, keep: bool, head: bool, http11: bool, server: Server) -> None:
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
            raise ValueError(f"bad WSGI status {status!r}")
        for item in headers:
            name, value = item
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(f"WSGI header {item!r}: name and value must be str")
            if not is_token(name) or "\n" in value or "\r" in value:
                raise ValueError(f"bad WSGI header {item!r}")
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
                    raise ValueError(f"bad Content-Length {value!r} from the application")
                length = int(value)
            elif lname in HOP_BY_HOP:
                if lname == "connection" and "close" in value.lower():
                    self.keep = False
                continue
            elif lname == "date":
                has_date = True
            lines += (name, ": ", value, "\r\n")
        if not has_date:
            lines += ("Date: ", http_date().decode("ascii"), "\r\n")
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
                    log("application wrote more than its Content-Length; truncated")
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
            raise ClientDisconnected(f"writing response: {e}") from None

    def write(self, data) -> None:
        if self.status is None:
            raise AssertionError("write() before start_response()")
        if not isinstance(data, bytes):
            if isinstance(data, (bytearray, memoryview)):
                data = bytes(data)
            else:
                raise TypeError(f"WSGI body chunks must be bytes, not {type(data).__name__}")
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
                raise TypeError(f"WSGI body chunks must be bytes, not {type(c).__name__}")
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
            log(
                f"application wrote {self.written} bytes of its Content-Length {self.length}; "
                "closing the connection"
            )
            self.keep = False
            self.gone = True  # the framing is broken: never reuse the connection
