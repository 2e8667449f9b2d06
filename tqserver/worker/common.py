"""What every part of the worker runtime shares: limits, errors, the worker's identity,
its log line, and small HTTP helpers."""

from __future__ import annotations

import os
import select
import sys
import time

MAX_LINE = 65536  # request line / one header line
MAX_HEADERS = 200
MAX_DISCARD = 4 << 20  # unread request body we skip to keep a connection alive
MAX_BLANK_LINES = 8  # tolerated empty lines before a request line

HOP_BY_HOP = frozenset(
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
TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
HEX_BYTES = frozenset(b"0123456789abcdefABCDEF")
REASONS = {
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
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
MONTHS = ("", "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class ClientDisconnected(ConnectionError):
    """The client went away (raised by wsgi.input reads and write())."""


class BadRequestBody(ValueError):
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


def log(msg: str) -> None:
    try:
        sys.stderr.write(f"tqserver.worker[{os.getpid()}]: {msg}\n")
        sys.stderr.flush()
    except Exception:  # stderr closed: nothing sensible left to do
        pass


_date_cache = (0, b"")


def http_date() -> bytes:
    global _date_cache
    now = int(time.time())
    cached = _date_cache
    if cached[0] == now:
        return cached[1]
    t = time.gmtime(now)
    value = (
        f"{DAYS[t.tm_wday]}, {t.tm_mday:02d} {MONTHS[t.tm_mon]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    ).encode("ascii")
    _date_cache = (now, value)
    return value


def unquote(path: str) -> str:
    """Percent-decode a request path to a latin-1 "bytes as str" (PEP 3333)."""
    if "%" not in path:
        return path
    parts = path.encode("latin-1").split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        if len(part) >= 2 and part[0] in HEX_BYTES and part[1] in HEX_BYTES:
            out.append(bytes((int(part[:2], 16),)))
            out.append(part[2:])
        else:
            out.append(b"%")
            out.append(part)
    return b"".join(out).decode("latin-1")


def is_token(s: str) -> bool:
    if not s:
        return False
    if s.isascii() and s.replace("-", "").isalnum():
        return True
    return all(c in TOKEN_CHARS for c in s)


def readable(sock) -> bool:
    try:
        if hasattr(select, "poll"):
            p = select.poll()
            p.register(sock, select.POLLIN)
            return bool(p.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return False


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        raise SystemExit(f"tqserver.worker: {name}={value!r} is not a number") from None
