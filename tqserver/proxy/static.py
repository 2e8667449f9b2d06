"""Static files under a worker's ``public/``, served by the proxy itself (docs/proxy.md).

Two calls: :func:`resolve_public_file` decides, cheaply and without caching,
whether a request path names a servable file; :func:`serve_file` answers with
the validators, conditional requests and single byte ranges that browsers and
download tools rely on, streaming the body so memory does not grow with size.
"""

from __future__ import annotations

import fnmatch
import functools
import mimetypes
import os
import re
import stat
from collections.abc import Sequence
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IPullProducer
from twisted.web import http
from zope.interface import implementer

# twisted.web.http is a deprecation proxy whose attribute lookups are slow: bind once.
_datetimeToString = http.datetimeToString
PRECONDITION_FAILED = http.PRECONDITION_FAILED
REQUESTED_RANGE_NOT_SATISFIABLE = http.REQUESTED_RANGE_NOT_SATISFIABLE
PARTIAL_CONTENT = http.PARTIAL_CONTENT
NOT_MODIFIED = http.NOT_MODIFIED


__all__ = ["resolve_public_file", "serve_file", "within"]

# PHP sources (and their usual aliases) must never leak as text, nor a copy of one under
# another suffix: index.php~, index.php.bak, #index.php#, index.php_old, index.php.1.
_PHP_RE = re.compile(r"\.(php\d*|phps|phtml|pht|phar)(?![a-z])", re.IGNORECASE)
# In a PHP worker's public/, a file whose start holds an opening PHP tag is source whatever
# its name (config.inc, lib.txt); this much of each file is read to tell.
PHP_SNIFF_BYTES = 65536
_PHP_TAG = re.compile(rb"<\?(php|=)", re.IGNORECASE)

# Web types that system mime tables get wrong or lack; checked first.
_TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".json": "application/json",
    ".map": "application/json",
    ".webmanifest": "application/manifest+json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".webp": "image/webp",
    ".avif": "image/avif",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".md": "text/markdown",
}

# mimetypes reports ``foo.tar.gz`` as a gzip-encoded tar; we serve the bytes
# as they are, so name the compressed type instead of a Content-Encoding.
_ENCODED_TYPES = {
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "br": "application/x-brotli",
    "compress": "application/x-compress",
}

_ETAG_RE = re.compile(r'(W/)?"([^"]*)"')
_RANGE_RE = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")
_CHUNK = 65536


def resolve_public_file(
    public_dir: str, subpath: str | bytes, deny: Sequence[str] = (), php: bool = False
) -> str | None:
    """Map a raw (still percent-encoded) request path to a real file inside
    ``public_dir``, or None when it is not something we may serve: a name matching a
    ``deny`` pattern (server.yaml static.deny: editor backups and swap files), a PHP
    script or a copy of one, and for a ``php`` worker any file that holds PHP source.

    Decoding happens exactly once, here, so ``%252e%252e`` stays a literal
    ``%2e%2e`` name.  A trailing ``/`` asks for the directory's index.html;
    a directory without one is left to the worker (relative links in an
    index page would break without the slash).
    """
    if isinstance(subpath, bytes) and b"%" not in subpath:
        decoded = os.fsdecode(subpath)  # nothing to unquote (the usual case)
    else:
        decoded = os.fsdecode(unquote_to_bytes(subpath))
    if "\x00" in decoded or "\\" in decoded:
        return None
    # Covers "..", "." and hidden names (.git, .env, .htaccess, .user.ini): a segment that
    # starts with a dot.
    if "/." in "/" + decoded:
        return None
    parts = [p for p in decoded.split("/") if p]
    if parts and not decoded.endswith("/"):
        # a script, a copy of one, a backup: refused before any filesystem call
        if _PHP_RE.search(parts[-1]) or (deny and _denied(tuple(deny)).match(parts[-1])):
            return None
    # Most requests under a worker's route are not files: one stat answers them before
    # the realpath() calls (an lstat per path component each) that the safe answer needs.
    candidate = os.path.join(public_dir, "/".join(parts)) if parts else public_dir
    if decoded.endswith("/"):
        candidate = os.path.join(candidate, "index.html")
    try:
        os.stat(candidate)
    except (OSError, ValueError):
        return None
    root = os.path.realpath(public_dir)
    candidate = os.path.join(root, os.path.relpath(candidate, public_dir))
    real = os.path.realpath(candidate)
    if not within(root, real):
        return None
    if _PHP_RE.search(candidate) or _PHP_RE.search(real):
        return None
    name = os.path.basename(real)
    if deny and _denied(tuple(deny)).match(name):
        return None  # a symlink's target named like a backup
    try:
        st = os.stat(real)
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    if php and _holds_php(real, st):
        return None
    return real


@functools.lru_cache(maxsize=16)
def _denied(patterns: tuple[str, ...]) -> re.Pattern:
    """One regex for a deny list of glob patterns (matched against a file name)."""
    return re.compile("|".join(fnmatch.translate(p) for p in patterns) or r"(?!)")


_sniffed: dict[tuple, bool] = {}


def _holds_php(path: str, st: os.stat_result) -> bool:
    """Whether the first PHP_SNIFF_BYTES of a file hold an opening PHP tag; remembered
    per version of the file (inode, size, mtime), so a file is read once, not per request."""
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    found = _sniffed.get(key)
    if found is None:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            try:
                head = os.read(fd, PHP_SNIFF_BYTES)
            finally:
                os.close(fd)
        except OSError:
            return True  # unreadable now: not served
        found = _PHP_TAG.search(head) is not None
        if len(_sniffed) >= 4096:
            _sniffed.clear()
        _sniffed[key] = found
    return found


def within(root: str, real: str) -> bool:
    """Whether the resolved path ``real`` lies inside the resolved directory ``root`` and
    outside its hidden directories: a symlink pointing out, or into .git, is refused."""
    prefix = root.rstrip(os.sep) + os.sep
    if not real.startswith(prefix):
        return False
    return not any(p.startswith(".") for p in real[len(prefix) :].split(os.sep))


def serve_file(request: http.Request, path: str) -> None:
    """Write the complete response for ``path`` to ``request`` and finish it
    (the body may still be streaming when this returns)."""
    try:
        # O_NONBLOCK: a FIFO swapped in after resolving must not hang the reactor.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        _plain(request, 403 if isinstance(e, PermissionError) else 404)
        return
    started = False
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            started = _respond(request, path, fd, st)
        else:
            _plain(request, 404)
    finally:
        if not started:  # otherwise the producer closes it
            os.close(fd)


def _respond(request: http.Request, path: str, fd: int, st: os.stat_result) -> bool:
    """Set status and headers; return True when a producer now owns ``fd``."""
    size = st.st_size
    mtime = int(st.st_mtime)
    etag = f'"{st.st_mtime_ns:x}-{size:x}-{st.st_ino:x}"'
    request.setHeader(b"ETag", etag.encode("ascii"))
    request.setHeader(b"Last-Modified", _datetimeToString(mtime))
    request.setHeader(b"Cache-Control", b"no-cache")  # always revalidate: dev sees new files
    request.setHeader(b"Accept-Ranges", b"bytes")

    code = _preconditions(request, etag, mtime)
    if code is not None:
        request.setResponseCode(code)
        if code == PRECONDITION_FAILED:
            request.setHeader(b"Content-Length", b"0")
        request.finish()
        return False

    offset, length = 0, size
    byte_range = _requested_range(request, etag, mtime, size)
    if byte_range == "unsatisfiable":
        request.setResponseCode(REQUESTED_RANGE_NOT_SATISFIABLE)
        request.setHeader(b"Content-Range", b"bytes */%d" % size)
        request.setHeader(b"Content-Length", b"0")
        request.finish()
        return False
    if byte_range is not None:
        offset, end = byte_range
        length = end - offset + 1
        request.setResponseCode(PARTIAL_CONTENT)
        request.setHeader(b"Content-Range", b"bytes %d-%d/%d" % (offset, end, size))
    request.setHeader(b"Content-Type", _content_type(path))
    request.setHeader(b"Content-Length", b"%d" % length)
    if request.method == b"HEAD" or length == 0:
        request.finish()
        return False
    os.lseek(fd, offset, os.SEEK_SET)
    _FileProducer(request, fd, length).start()
    return True


def _preconditions(request: http.Request, etag: str, mtime: int) -> int | None:
    """RFC 9110 §13.2.2 order; returns 304/412 or None to carry on."""
    if_match = _header_list(request, b"If-Match")
    if if_match is not None:
        if not _etag_matches(if_match, etag, weak=False):
            return PRECONDITION_FAILED
    else:
        since = _parse_date(request.getHeader(b"If-Unmodified-Since"))
        if since is not None and mtime > since:
            return PRECONDITION_FAILED
    if_none_match = _header_list(request, b"If-None-Match")
    if if_none_match is not None:
        return NOT_MODIFIED if _etag_matches(if_none_match, etag, weak=True) else None
    since = _parse_date(request.getHeader(b"If-Modified-Since"))
    if since is not None and mtime <= since:
        return NOT_MODIFIED
    return None


def _requested_range(request: http.Request, etag: str, mtime: int, size: int):
    """(first, last) inclusive, "unsatisfiable", or None for the full body.

    Only one range is honoured: several (or a malformed header) get the whole
    file with 200, which RFC 9110 §14.2 allows.
    """
    header = request.getHeader(b"Range")
    if header is None or size == 0:
        return None
    if_range = request.getHeader(b"If-Range")
    if if_range is not None and not _if_range_matches(if_range, etag, mtime):
        return None
    unit, _, spec = header.decode("latin-1").partition("=")
    if unit.strip().lower() != "bytes":
        return None
    specs = [s for s in spec.split(",") if s.strip()]
    if len(specs) != 1:
        return None
    m = _RANGE_RE.match(specs[0])
    if m is None or not (m.group(1) or m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # "-n": the final n bytes
        n = int(last)
        return "unsatisfiable" if n == 0 else (max(0, size - n), size - 1)
    start = int(first)
    if last and int(last) < start:
        return None  # invalid range-spec: ignore the header
    if start >= size:
        return "unsatisfiable"
    return (start, min(int(last), size - 1) if last else size - 1)


def _if_range_matches(value: bytes, etag: str, mtime: int) -> bool:
    """If-Range holds an entity tag (strong comparison) or an exact date."""
    text = value.decode("latin-1").strip()
    if text.startswith('"') or text.startswith("W/"):
        return text == etag
    return _parse_date(value) == mtime


def _header_list(request: http.Request, name: bytes) -> str | None:
    """All instances of a list-valued header joined, or None when absent."""
    values = request.requestHeaders.getRawHeaders(name)
    if not values:
        return None
    return ", ".join(v.decode("latin-1") for v in values)


def _etag_matches(value: str, etag: str, weak: bool) -> bool:
    if value.strip() == "*":
        return True
    for weak_prefix, opaque in _ETAG_RE.findall(value):
        if weak_prefix and not weak:
            continue  # strong comparison never matches a weak tag
        if f'"{opaque}"' == etag:
            return True
    return False


def _parse_date(value: bytes | None) -> int | None:
    if not value:
        return None
    try:
        return http.stringToDatetime(value.strip())
    except (ValueError, IndexError, KeyError, OverflowError):
        return None  # an invalid date is ignored, as RFC 9110 asks


def _content_type(path: str) -> bytes:
    ext = os.path.splitext(path)[1].lower()
    mime = _TYPES.get(ext)
    if mime is None:
        guessed, encoding = mimetypes.guess_type(path, strict=False)
        if encoding:
            mime = _ENCODED_TYPES.get(encoding, "application/octet-stream")
        else:
            mime = guessed or "application/octet-stream"
    if mime.startswith("text/") or mime.endswith(("javascript", "json")):
        mime += "; charset=utf-8"
    return mime.encode("ascii")


def _plain(request: http.Request, code: int) -> None:
    """A short text error for a file that vanished or is unreadable."""
    body = http.RESPONSES.get(code, b"Error") + b"\n"
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


@implementer(IPullProducer)
class _FileProducer:
    """Sends ``length`` bytes from ``fd``'s current offset, one chunk per pull,
    so a slow client throttles disk reads instead of filling memory."""

    def __init__(self, request: http.Request, fd: int, length: int) -> None:
        self._request: http.Request | None = request
        self._fd: int | None = fd
        self._remaining = length

    def start(self) -> None:
        request = self._request
        assert request is not None  # stopProducing forgets it; start comes first
        # The errback both closes the file on disconnect and consumes the failure.
        request.notifyFinish().addErrback(lambda _: self.stopProducing())
        request.registerProducer(self, False)

    def resumeProducing(self) -> None:
        request = self._request
        if request is None or self._fd is None:
            return
        try:
            data = os.read(self._fd, min(_CHUNK, self._remaining))
        except OSError:
            data = b""
        self._remaining -= len(data)
        if not data:
            # Truncated under us (or unreadable): Content-Length can no longer be met, so
            # drop the connection rather than let the client wait forever.
            self.stopProducing()
            request.unregisterProducer()
            request.loseConnection()
            return
        done = self._remaining <= 0
        if done:
            self.stopProducing()  # before write(): it may re-enter us
        request.write(data)
        if done:
            request.unregisterProducer()
            request.finish()

    def stopProducing(self) -> None:
        """Called by the transport when the client goes away, and by us when done."""
        fd, self._fd, self._request = self._fd, None, None
        if fd is not None:
            os.close(fd)
