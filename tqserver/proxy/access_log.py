"""AccessLog: what the proxy records of each finished request.

One line per request in ``server.access_log_format``: ``combined`` (the default), ``common``
or ``json``. common/combined are the NCSA lines, followed by TQServer's own fields
(``host="..." upstream_ms=... ms=... worker=... instance=... rid=...``); what the client
sent is escaped the way nginx does it (``"``, ``\\``, control and non-ASCII bytes as
``\\xHH``), JSON lines by the JSON rules, so no header value can forge a line. The client
is the TCP peer, or the address X-Forwarded-For names when that peer is one of
``server.trusted_proxies`` (see real_client). Lines go to ``server.access_log_file`` when
it is set (a log file like the others: {date}, log_file_mode, retention, SIGUSR1), else to
the server log."""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Callable, Protocol

from twisted.logger import Logger

from tqserver.logs.files import FailSafeLog, resolve_template

if TYPE_CHECKING:
    from tqserver.proxy.state import ProxyState

access_log = Logger(namespace="tqserver.access")
log = Logger()

FORMATS = ("combined", "common", "json")

# What nginx escapes in a log line (ngx_http_log_escape): '"', '\\', control bytes, and
# bytes >= 0x7f, each as \xHH.
_UNSAFE = re.compile(rb'[\x00-\x1f"\\\x7f-\xff]')


def _hex(match: re.Match) -> bytes:
    return b"\\x%02X" % match.group()[0]


def escape(value: bytes) -> str:
    """``value`` for a common/combined line: printable ASCII as is, the rest \\xHH."""
    if _UNSAFE.search(value) is not None:
        value = _UNSAFE.sub(_hex, value)
    return value.decode("ascii")


class Trusted:
    """``server.trusted_proxies``: addresses and networks (CIDR) whose X-Forwarded-For is
    believed. ``in`` answers for one address (a string); what is not an address is not in."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.addresses: set[str] = set()
        self.networks: list = []
        for entry in entries:
            if "/" in entry:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            else:
                self.addresses.add(str(ipaddress.ip_address(entry)))
        self._seen: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.addresses or self.networks)

    def __contains__(self, address: str) -> bool:
        if address in self.addresses:
            return True
        if not self.networks:
            return False
        known = self._seen.get(address)
        if known is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                known = False
            else:
                if ip.version == 6 and ip.ipv4_mapped is not None:
                    ip = ip.ipv4_mapped
                known = any(ip in network for network in self.networks)
            if len(self._seen) > 4096:
                self._seen.clear()
            self._seen[address] = known
        return known


_TRUSTED: dict[tuple[str, ...], Trusted] = {}


def trusted(entries: tuple[str, ...]) -> Trusted:
    """The Trusted of a configuration's trusted_proxies (built once per distinct tuple)."""
    found = _TRUSTED.get(entries)
    if found is None:
        if len(_TRUSTED) > 16:
            _TRUSTED.clear()
        found = _TRUSTED[entries] = Trusted(entries)
    return found


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def real_client(peer: str, forwarded_for: Sequence[bytes] | None, proxies: Trusted) -> str:
    """The client's address: the TCP ``peer``, unless it is a trusted proxy; then
    X-Forwarded-For is walked right to left past the trusted proxies (nginx's
    ``real_ip_recursive on``): the first address that is not one is the client. What is not
    an address stops the walk (the hop to its right, a trusted proxy, is the client then:
    nothing a client writes there is taken for an address); all trusted: the leftmost."""
    if not forwarded_for or not proxies or peer not in proxies:
        return peer
    client = peer
    for value in reversed(forwarded_for):
        for hop in reversed(value.split(b",")):
            text = hop.strip().decode("latin-1")
            if not text:
                continue
            if not _is_address(text):
                return client
            client = text
            if text not in proxies:
                return client
    return client


class RequestCounter(Protocol):
    def observe_request(self, worker: str, code: int, seconds: float) -> None: ...


class _Clock:
    """The [10/Oct/2000:13:55:36 +0000] and ISO 8601 times of a second, made once a second."""

    def __init__(self) -> None:
        self._second = -1
        self.clf = ""
        self.iso = ""

    def at(self, now: float) -> _Clock:
        second = int(now)
        if second != self._second:
            self._second = second
            local = time.localtime(second)
            self.clf = time.strftime("%d/%b/%Y:%H:%M:%S %z", local)
            iso = time.strftime("%Y-%m-%dT%H:%M:%S%z", local)
            self.iso = iso[:-2] + ":" + iso[-2:]
        return self


def _header(request, name: bytes) -> bytes | None:
    values = request.requestHeaders.getRawHeaders(name)
    return values[0] if values else None


def _fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


class AccessLog:
    """One access-log line per request (when server.access_log; docs/operations.md, "Logs")
    and its figures for the request metrics (``stats``), from Site.log."""

    def __init__(
        self,
        state: ProxyState,
        stats: RequestCounter,
        reactor,
        root: str = "",
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.state = state
        self.stats = stats
        self.reactor = reactor
        self.root = root
        self._warn = warn or (lambda message: log.warn("access log: {message}", message=message))
        self._clock = _Clock()
        self._server = None  # the server section the settings below are from
        self._file: FailSafeLog | None = None
        self._format = "combined"
        self._trusted = Trusted(())
        self._skip: tuple[str, ...] = ()

    def _configure(self, config) -> None:
        server = self._server = config.server
        self._format = server.access_log_format
        self._trusted = trusted(server.trusted_proxies)
        exclude = server.access_log_exclude_health
        self._skip = (config.health.path,) if exclude else ()
        template = resolve_template(server.access_log_file, self.root)
        if self._file is not None and self._file.template != template:
            self._file.close()
            self._file = None
        if template is not None and self._file is None:
            self._file = FailSafeLog(template, "access", self._warn)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __call__(self, request) -> None:
        now = self.reactor.seconds()
        started = getattr(request, "started_at", now)
        seconds = now - started
        pool = request.worker_pool
        worker = pool.name if pool is not None else "-"
        code = request.code
        self.stats.observe_request(worker, code, seconds)
        config = self.state.config
        if not config.server.access_log:
            return
        if config.server is not self._server:
            self._configure(config)
        if self._skip:
            path = request.uri.split(b"?", 1)[0].decode("latin-1")
            for skipped in self._skip:
                if path == skipped or path.startswith(skipped + "/"):
                    return
        line = self.line(request, now, seconds, worker)
        if self._file is not None:
            self._file.write(line.encode("utf-8", "replace") + b"\n")
        else:
            access_log.info("{line}", line=line)

    def line(self, request, now: float, seconds: float, worker: str) -> str:
        """The line (without its newline) of a finished request."""
        fwd = request.forward
        instance = getattr(fwd, "instance_id", None) or "-"
        upstream = getattr(fwd, "upstream_seconds", None)
        peer = request.client_ip
        client = (
            real_client(
                peer, request.requestHeaders.getRawHeaders(b"x-forwarded-for"), self._trusted
            )
            if self._trusted
            else peer
        )
        method, uri, proto = request.method, request.uri, request.clientproto
        host = _header(request, b"host")
        rid = request.request_id
        clock = self._clock.at(now)
        if self._format == "json":
            referer = _header(request, b"referer")
            agent = _header(request, b"user-agent")
            return json.dumps(
                {
                    "time": clock.iso,
                    "client": client,
                    "peer": peer,
                    "method": _text(method),
                    "uri": _text(uri),
                    "proto": _text(proto),
                    "status": request.code,
                    "bytes": request.sentLength,
                    "referer": None if referer is None else _text(referer),
                    "user_agent": None if agent is None else _text(agent),
                    "host": None if host is None else _text(host),
                    "upstream_ms": None if upstream is None else round(upstream * 1000, 1),
                    "ms": round(seconds * 1000, 1),
                    "worker": worker,
                    "instance": instance,
                    "rid": _text(rid),
                },
                separators=(",", ":"),
            )
        if client is not peer:  # from X-Forwarded-For (an address, but escaped all the same)
            client = escape(client.encode("latin-1", "replace"))
        head = (
            f'{client} - - [{clock.clf}] "{escape(method)} {escape(uri)} {escape(proto)}" '
            f"{request.code} {request.sentLength}"
        )
        if self._format == "combined":
            referer = _header(request, b"referer")
            agent = _header(request, b"user-agent")
            head += (
                f' "{"-" if referer is None else escape(referer)}"'
                f' "{"-" if agent is None else escape(agent)}"'
            )
        return (
            f'{head} host="{"-" if host is None else escape(host)}" '
            f"upstream_ms={_fmt_ms(upstream)} ms={seconds * 1000:.1f} worker={worker} "
            f"instance={instance} rid={escape(rid)}"
        )


def _text(value: bytes) -> str:
    """Bytes the client sent, as JSON text: UTF-8, other bytes as a literal \\xHH."""
    return value.decode("utf-8", "backslashreplace")
