"""wsgi.input: a request body delimited by Content-Length or chunked, read on demand
(sending "100 Continue" first when the client asked for it), and wsgi.file_wrapper."""

from __future__ import annotations

from tqserver.worker.common import (
    HEX_BYTES,
    MAX_HEADERS,
    MAX_LINE,
    BadRequestBody,
    ClientDisconnected,
)


class Input:
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


class EmptyInput(Input):
    def read(self, size: int = -1) -> bytes:
        return b""

    def readline(self, size: int = -1) -> bytes:
        return b""

    def discard(self, limit: int) -> bool:
        return True


EMPTY = EmptyInput()


class SizedInput(Input):
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
            raise ClientDisconnected(f"reading request body: {e}") from None
        # read() must return all it was asked for; readline() at least something
        if (len(data) < size) if not line else not data:
            self.remaining = 0
            raise ClientDisconnected("client closed the connection mid-body")
        self.remaining -= len(data)
        return data


class ChunkedInput(Input):
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
            raise ClientDisconnected(f"reading request body: {e}") from None
        if not line:
            self._done = True
            raise ClientDisconnected("client closed the connection mid-body")
        return line

    def _next_chunk(self) -> None:
        if self._after_chunk:
            if self._rl(3).rstrip(b"\r\n") != b"":
                self._done = True
                raise BadRequestBody("chunk data not followed by CRLF")
            self._after_chunk = False
        line = self._rl(1025)
        size = line.split(b";", 1)[0].strip()
        if not size or len(size) > 16 or any(c not in HEX_BYTES for c in size):
            self._done = True
            raise BadRequestBody(f"bad chunk size line {line[:40]!r}")
        n = int(size, 16)
        if n == 0:
            for _ in range(MAX_HEADERS + 1):  # trailers, ignored
                if self._rl(MAX_LINE) in (b"\r\n", b"\n"):
                    break
            else:
                raise BadRequestBody("too many trailer lines")
            self._done = True
        else:
            self._left = n
            self._after_chunk = True

    def _read_data(self, n: int, line: bool) -> bytes:
        try:
            data = self._rfile.readline(n) if line else self._rfile.read(n)
        except OSError as e:
            self._done = True
            raise ClientDisconnected(f"reading request body: {e}") from None
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


class FileWrapper:
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
