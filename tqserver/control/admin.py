"""The control plane's own listener (``admin.listen``): the status page, the admin API
(status, stream, logs, reload), /metrics and the full /health, on a Unix socket under the
root by default (mode 0600) or a TCP port, never on the public port (see reserved.py).

Who may ask, on this listener:

- with a valid ``Authorization: Bearer <token>`` (admin.token / admin.token_file): anyone;
- a TCP listener on an interface other than loopback (allowed only with a token): nobody
  else, but for /health;
- otherwise (the Unix socket, loopback TCP): whoever can connect, which the socket's mode
  or loopback restricts, with two checks against a page in the operator's browser: the
  Host must be a loopback name or the listener's interface (a DNS-rebound name is
  refused), and a request that is not GET or HEAD must not come from another site
  (``Sec-Fetch-Site`` same-origin or none, ``Origin`` the listener's own): 403 otherwise.
"""

from __future__ import annotations

import os
import re
from typing import Callable
from urllib.parse import urlsplit

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.logger import Logger

from tqserver.config.server import admin_tcp_interface, is_loopback, read_admin_token
from tqserver.control.reserved import Reserved, bearer_ok, respond
from tqserver.proxy.deadlines import Deadlines
from tqserver.proxy.pages import live_reload_snippet
from tqserver.proxy.site import ProxySite

log = Logger()

READ_METHODS = (b"GET", b"HEAD")
SAME_SITE = (b"same-origin", b"none")  # Sec-Fetch-Site values of the operator's own requests


def endpoint_description(listen: str, root: str) -> str:
    """``listen`` made usable by strports: a relative unix: path under ``root``, mode 0600
    and a lock file (a socket left by a killed server is replaced) unless given."""
    if not listen.startswith("unix:"):
        return listen
    parts = re.split(r"(?<!\\):", listen[len("unix:") :])
    paths = [p for p in parts if "=" not in p or p.startswith("address=")]
    options = [p for p in parts if p not in paths]
    path = paths[0].replace("\\:", ":") if paths else ""
    if path.startswith("address="):
        path = path[len("address=") :]
    path = os.path.join(root, path)
    names = {p.split("=", 1)[0] for p in options}
    if "mode" not in names:
        options.append("mode=600")
    if "lockfile" not in names:
        options.append("lockfile=1")
    return ":".join(["unix", path.replace(":", "\\:"), *options])


def socket_path(description: str) -> str | None:
    """The file of a unix: description from endpoint_description, else None."""
    if not description.startswith("unix:"):
        return None
    return re.split(r"(?<!\\):", description[len("unix:") :])[0].replace("\\:", ":")


class AdminToken:
    """The current token (a callable): admin.token or admin.token_file's, read again
    when a reload changes either; "" when the file cannot be read (logged)."""

    def __init__(self, supervisor, root: str) -> None:
        self.supervisor = supervisor
        self.root = root
        self._key: tuple[str, str] | None = None
        self._value = ""

    def __call__(self) -> str:
        admin = self.supervisor.config.admin
        key = (admin.token, admin.token_file)
        if key != self._key:
            self._key = key
            try:
                self._value = read_admin_token(admin, self.root)
            except OSError as e:
                log.error("admin.token_file {file}: {e}", file=admin.token_file, e=e)
                self._value = ""
        return self._value


class Access:
    """Decides who may use the admin listener (see the module docstring)."""

    def __init__(self, listen: str, token: Callable[[], str]) -> None:
        interface = admin_tcp_interface(listen)
        self.interface = interface
        # only the token opens a listener that is not on loopback
        self.token_only = interface is not None and not is_loopback(interface)
        self.token = token

    def refusal(self, request) -> str | None:
        """Why ``request`` is refused, or None when it may go on."""
        if bearer_ok(request, self.token()):
            return None
        if self.token_only:
            return "this listener needs the admin token (Authorization: Bearer ...)"
        headers = request.requestHeaders
        host = (headers.getRawHeaders(b"host") or [b""])[0].decode("latin-1").lower()
        hostname = urlsplit("//" + host).hostname or ""
        if hostname and not (is_loopback(hostname) or hostname == (self.interface or "")):
            return f"Host {host!r} is not this listener's (a loopback name or address)"
        if request.method in READ_METHODS:
            return None
        site = (headers.getRawHeaders(b"sec-fetch-site") or [None])[0]
        if site is not None and site.lower() not in SAME_SITE:
            return "cross-site request refused"
        origin = (headers.getRawHeaders(b"origin") or [None])[0]
        if origin is not None:
            parts = urlsplit(origin.decode("latin-1").lower())
            if parts.scheme not in ("http", "https") or parts.netloc != host:
                return "cross-origin request refused"
        return None


class AdminFront(MultiService):
    """What ProxySite needs of a front, for the admin listener: the plan of a request
    (TQServer's own endpoints only, nothing is forwarded) and the deadlines of its
    connections. Its children: the Deadlines and the listening port."""

    name = "admin"  # type: ignore[assignment]  # Twisted types Service.name as None

    def __init__(self, reactor, reserved: Reserved, listen: str, root: str) -> None:
        MultiService.__init__(self)
        self.reactor = reactor
        self.reserved = reserved
        self.state = reserved.supervisor.state
        self.listen = listen
        self.description = endpoint_description(listen, root)
        self.access = Access(listen, reserved.token)
        self.deadlines = Deadlines(reactor)
        self.deadlines.setServiceParent(self)
        # what ProxySite uses of a Front: plan, state, reactor, deadlines, dev
        self.site = ProxySite(self, log_access=lambda request: None)  # type: ignore[arg-type]
        strports.service(self.description, self.site, reactor=reactor).setServiceParent(self)

    @property
    def config(self):
        return self.state.config

    @property
    def dev(self) -> bool:
        return self.state.mode == "dev"

    def live_reload_snippet(self, worker: str, config_error: str | None = None) -> bytes:
        events = self.config.admin.path.rstrip("/") + "/events"
        return live_reload_snippet(worker, events, config_error)

    def privilegedStartService(self) -> None:
        # twistd listens here, before startService: a fresh clone has no run/ yet.
        path = socket_path(self.description)
        if path is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        MultiService.privilegedStartService(self)

    def startService(self) -> None:
        MultiService.startService(self)
        log.info("control plane listening on {listen}", listen=self.listen)

    def plan(self, request) -> None:
        """Leave the renderer on the request; nothing here is forwarded."""
        request.renderer = self.renderer(request)

    def renderer(self, request) -> Callable:
        cfg = self.config
        path = request.path
        reserved = self.reserved
        if reserved.match(path) == reserved.health:  # /health and its /live, /ready, /<worker>
            return reserved.full_health
        admin = cfg.admin.path.rstrip("/").encode()
        if path in (b"", b"/") and request.method in READ_METHODS:
            return redirect_to(admin + b"/")
        if cfg.metrics.enabled and path == cfg.metrics.path.encode():
            handler = reserved.full_metrics
        elif path == admin or path.startswith(admin + b"/"):
            handler = reserved.full_admin
        else:
            return lambda req: respond(req, 404, b"not found\n", b"text/plain")
        why = self.access.refusal(request)
        if why is not None:
            return lambda req: respond(req, 403, why.encode() + b"\n", b"text/plain")
        return handler


def redirect_to(location: bytes) -> Callable:
    def render(request) -> None:
        request.setResponseCode(302)
        request.setHeader(b"location", location)
        respond(request, 302, b"", b"text/plain")

    return render
