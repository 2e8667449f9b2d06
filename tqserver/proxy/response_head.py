"""The head of an HTTP/1.x response from a worker instance: parsed once, the same way for
the proxy's upstream client and for the health prober, so an instance the proxy cannot
talk to is not reported healthy."""

from __future__ import annotations

import re

from tqserver.proxy.headers import connection_tokens

MAX_HEAD = 64 * 1024  # a response head larger than this is refused

Headers = list[tuple[bytes, bytes]]


# Control characters a response head must not carry (HTAB is allowed; a bare LF is a line
# break some servers send, which the Headers path turns into a space).
_HEAD_CTL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class UpstreamError(Exception):
    """The worker sent something that is not HTTP/1.x."""


class ResponseHead:
    """Status line and headers, and how the body is framed: ``length`` (Content-Length,
    or None), ``chunked`` (the last transfer coding is chunked: it wins over a length),
    ``keep_alive`` (HTTP/1.1 unless ``Connection: close``; HTTP/1.0 only with
    ``Connection: keep-alive``)."""

    __slots__ = ("chunked", "code", "headers", "keep_alive", "length", "reason", "version")

    def __init__(
        self,
        version: bytes,
        code: int,
        reason: bytes,
        headers: Headers,
        length: int | None,
        chunked: bool,
        keep_alive: bool,
    ) -> None:
        self.version = version
        self.code = code
        self.reason = reason
        self.headers = headers
        self.length = length
        self.chunked = chunked
        self.keep_alive = keep_alive

    @property
    def interim(self) -> bool:
        """100 Continue, 103 Early Hints...: the real response follows (101 is final)."""
        return 100 <= self.code < 200 and self.code != 101


def parse_response_head(head: bytes) -> ResponseHead:
    """The head without its final CRLFCRLF; UpstreamError when it is not HTTP/1.x. A
    control character (NUL, a bare CR...) or a field name that is not a token makes it
    invalid: the client gets a 502, never those bytes."""
    lines = head.split(b"\r\n")
    bad = _HEAD_CTL.search(b"".join(lines))
    if bad is not None:
        raise UpstreamError(f"control character {bad.group()!r} in the response head")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise UpstreamError(f"bad status line {lines[0][:80]!r}")
    try:
        code = int(parts[1])
    except ValueError:
        raise UpstreamError(f"bad status code {parts[1][:20]!r}") from None
    if not 100 <= code <= 999:
        raise UpstreamError(f"bad status code {code}")
    headers: Headers = []
    length = None
    chunked = False
    connection: list[bytes] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or _TOKEN.fullmatch(name) is None:
            raise UpstreamError(f"bad header line {line[:80]!r}")
        value = value.strip()
        headers.append((name, value))
        lname = name.lower()
        if lname == b"content-length":
            if not value.isdigit():  # int() would take "+5", " 5", "5_0"
                raise UpstreamError("bad Content-Length")
            new = int(value)
            if length is not None and new != length:
                raise UpstreamError("conflicting Content-Length")
            length = new
        elif lname == b"transfer-encoding":
            chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
        elif lname == b"connection":
            connection.append(value)
    version = parts[0]
    tokens = connection_tokens(connection) if connection else ()
    if version == b"HTTP/1.1":
        keep_alive = b"close" not in tokens
    else:
        keep_alive = b"keep-alive" in tokens
    reason = parts[2] if len(parts) > 2 else b""
    return ResponseHead(version, code, reason, headers, length, chunked, keep_alive)
