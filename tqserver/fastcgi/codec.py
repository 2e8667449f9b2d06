"""FastCGI 1.0 (responder role) records and name-value pairs, and the CGI response head php-fpm
sends on STDOUT."""

from __future__ import annotations

import struct
from collections.abc import Iterable

from tqserver.proxy.response_head import Headers

VERSION = 1
(
    BEGIN_REQUEST,
    ABORT_REQUEST,
    END_REQUEST,
    PARAMS,
    STDIN,
    STDOUT,
    STDERR,
    DATA,
    GET_VALUES,
    GET_VALUES_RESULT,
    UNKNOWN_TYPE,
) = range(1, 12)
RESPONDER = 1
KEEP_CONN = 1
REQUEST_COMPLETE, CANT_MPX_CONN, OVERLOADED, UNKNOWN_ROLE = range(4)
PROTOCOL_STATUS = {
    CANT_MPX_CONN: "cannot multiplex",
    OVERLOADED: "overloaded",
    UNKNOWN_ROLE: "unknown role",
}

HEADER = struct.Struct("!BBHHBx")  # version, type, request id, content length, padding
BEGIN_BODY = struct.Struct("!HB5x")  # role, flags
END_BODY = struct.Struct("!IB3x")  # application status, protocol status
MAX_CONTENT = 0xFFFF
MAX_PAIR_LENGTH = 0x7FFFFFFF
MAX_HEAD = 64 * 1024
REQUEST_ID = 1  # one request per connection at a time: the id never varies


Pairs = Iterable[tuple[bytes, bytes]]


class FastCGIError(Exception):
    """The peer broke the FastCGI protocol or sent a response that is not CGI."""


# -- codec -------------------------------------------------------------------------------


def encode_records(rtype: int, content: bytes, request_id: int = REQUEST_ID) -> list[bytes]:
    """``content`` as records of at most 65535 bytes, each padded to a multiple of 8 (as
    nginx does), except where content and padding together would pass 65535: php-fpm
    drops a connection whose PARAMS record does. Empty content gives one empty record:
    the end of a stream."""
    if not content:
        return [HEADER.pack(VERSION, rtype, request_id, 0, 0)]
    out = []
    for start in range(0, len(content), MAX_CONTENT):
        piece = content[start : start + MAX_CONTENT]
        padding = -len(piece) % 8
        if len(piece) + padding > MAX_CONTENT:
            padding = 0
        out.append(HEADER.pack(VERSION, rtype, request_id, len(piece), padding))
        out.append(piece)
        if padding:
            out.append(b"\0" * padding)
    return out


_SHORT = [bytes((n,)) for n in range(128)]
_LONG = struct.Struct("!I")


def _length(n: int) -> bytes:
    if n < 128:
        return _SHORT[n]
    if n > MAX_PAIR_LENGTH:
        raise FastCGIError(f"a name or value of {n} bytes is too long for FastCGI")
    return _LONG.pack(n | 0x80000000)


def encode_pair(name: bytes, value: bytes) -> bytes:
    """One name-value pair: each length in 1 byte below 128, else in 4 with the top bit set."""
    return b"".join((_length(len(name)), _length(len(value)), name, value))


def encode_pairs(pairs: Pairs) -> bytes:
    return b"".join([encode_pair(name, value) for name, value in pairs])


def decode_pairs(data: bytes) -> list[tuple[bytes, bytes]]:
    pairs = []
    pos = 0
    while pos < len(data):
        lengths = []
        for _ in range(2):
            if pos >= len(data):
                raise FastCGIError("truncated name-value pair")
            if data[pos] < 128:
                lengths.append(data[pos])
                pos += 1
            else:
                if pos + 4 > len(data):
                    raise FastCGIError("truncated name-value pair")
                lengths.append(struct.unpack_from("!I", data, pos)[0] & MAX_PAIR_LENGTH)
                pos += 4
        end = pos + lengths[0] + lengths[1]
        if end > len(data):
            raise FastCGIError("truncated name-value pair")
        pairs.append((data[pos : pos + lengths[0]], data[pos + lengths[0] : end]))
        pos = end
    return pairs


def encode_params(pairs: Pairs) -> list[bytes]:
    """The PARAMS stream, ended by its empty record. Records hold whole pairs: php-fpm
    decodes each record on its own and drops the connection when a pair spans two, so a
    pair that does not fit one record (65535 bytes) is refused here."""
    out: list[bytes] = []
    chunk: list[bytes] = []
    size = 0
    short, long_ = _SHORT, _LONG.pack
    for name, value in pairs:  # encode_pair() inlined: this runs for every request
        n, v = len(name), len(value)
        head = (short[n] if n < 128 else long_(n | 0x80000000)) + (
            short[v] if v < 128 else long_(v | 0x80000000)
        )
        length = len(head) + n + v
        if length > MAX_CONTENT:
            raise FastCGIError(
                f"the CGI param {name[:40]!r} ({length} bytes) does not fit one FastCGI record"
            )
        if size + length > MAX_CONTENT:
            out += encode_records(PARAMS, b"".join(chunk))
            chunk, size = [], 0
        chunk += (head, name, value)
        size += length
    if chunk:
        out += encode_records(PARAMS, b"".join(chunk))
    return out + encode_records(PARAMS, b"")


def begin_request(keep_conn: bool, request_id: int = REQUEST_ID) -> bytes:
    body = BEGIN_BODY.pack(RESPONDER, KEEP_CONN if keep_conn else 0)
    return HEADER.pack(VERSION, BEGIN_REQUEST, request_id, len(body), 0) + body


class RecordReader:
    """Cuts a byte stream into (type, request id, content) records."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buf = self._buf
        buf += data
        records = []
        pos = 0
        size = len(buf)
        while size - pos >= HEADER.size:
            version, rtype, request_id, length, padding = HEADER.unpack_from(buf, pos)
            if version != VERSION:
                raise FastCGIError(f"FastCGI version {version} (expected 1)")
            end = pos + HEADER.size + length + padding
            if end > size:
                break
            records.append((rtype, request_id, bytes(buf[pos + HEADER.size : end - padding])))
            pos = end
        del buf[:pos]
        return records

    @property
    def pending(self) -> int:
        return len(self._buf)


def split_head(data: bytes) -> tuple[bytes, bytes] | None:
    """(head, rest) at the blank line ending a CGI head (CRLF or bare LF), or None."""
    ends = [(i, 4) for i in (data.find(b"\r\n\r\n"),) if i >= 0]
    ends += [(i, 2) for i in (data.find(b"\n\n"),) if i >= 0]
    ends += [(i, 3) for i in (data.find(b"\n\r\n"),) if i >= 0]
    if not ends:
        return None
    at, size = min(ends)
    return data[:at], data[at + size :]


def parse_cgi_head(head: bytes) -> tuple[int, bytes, Headers]:
    """(status, reason, headers) of a CGI response head (RFC 3875 6.3): ``Status:`` sets the
    code and is not passed on, ``Location:`` without one means 302, repeated headers (several
    Set-Cookie) stay separate."""
    status: int | None = None
    reason = b""
    location = False
    headers: Headers = []
    for line in head.split(b"\n"):
        line = line.rstrip(b"\r")
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b" " in name:
            raise FastCGIError(f"bad CGI header line {line[:80]!r}")
        value = value.strip()
        lname = name.lower()
        if lname == b"status":
            code, _, reason = value.partition(b" ")
            if not code.isdigit() or not 200 <= int(code) <= 999:
                raise FastCGIError(f"bad CGI Status {value[:40]!r}")
            status = int(code)
            reason = reason.strip()
            continue
        if lname == b"location":
            location = True
        headers.append((name, value))
    if status is None:
        status = 302 if location else 200
    return status, reason, headers


# -- the connection ----------------------------------------------------------------------
