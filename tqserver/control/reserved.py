"""Endpoints TQServer answers itself: /health, /metrics and the /_tqserver admin area
(the live status page, JSON status and streams, worker logs, reload control).

On the public port (Reserved) only /health is answered to anyone (in prod without ports,
errors or build output); /metrics and /_tqserver answer the same 404 as a path no worker
serves, unless ``admin.public`` (then with the bearer token only; ``metrics.public``: /metrics
to anyone). The whole control plane is on the admin listener (tqserver.control.admin)."""

from __future__ import annotations

import hmac
import json
from typing import Callable
from urllib.parse import unquote

from twisted.logger import Logger

from tqserver.config.server import is_loopback
from tqserver.control import health
from tqserver.control.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from tqserver.proxy.errors import error_renderer

log = Logger()

__all__ = ["Reserved", "ReservedPaths", "is_loopback", "respond", "respond_json"]

# What the public port answers for the control plane it does not serve: the page of a path
# no worker serves, so nothing tells it apart.
not_served = error_renderer(404, "No worker serves this path.")


def bearer_ok(request, token: str) -> bool:
    """The request carries ``Authorization: Bearer <token>`` (``token`` non-empty)."""
    if not token:
        return False
    given = request.requestHeaders.getRawHeaders(b"authorization", [b""])[0]
    return hmac.compare_digest(given, b"Bearer " + token.encode())


def respond(request, status: int, body: bytes, content_type: bytes) -> None:
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [content_type])
    request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
    request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
    if request.method != b"HEAD":
        request.write(body)
    request.finish_when_read()


def respond_json(request, status: int, data) -> None:
    respond(request, status, json.dumps(data, indent=1).encode() + b"\n", b"application/json")


class ReservedPaths:
    """Which paths are TQServer's own endpoints, as the server configuration of ``source``
    (anything with a ``config``) says. Alone (in a proxy process, which relays them to the
    supervisor) it has no answers; Reserved has them."""

    def __init__(self, source) -> None:
        self.source = source

    def match(self, path: bytes) -> Callable | None:
        """The renderer for ``path`` when it is one of TQServer's endpoints, else None."""
        cfg = self.source.config
        health_path = cfg.health.path.encode()
        if path == health_path or (
            path.startswith(health_path.rstrip(b"/") + b"/") and health_path != b"/"
        ):
            return self.health  # and /live, /ready, /<worker>, /worker/<worker>
        if cfg.metrics.enabled and path == cfg.metrics.path.encode():
            return self.metrics
        admin = cfg.admin.path.rstrip("/").encode()
        if path == admin or path.startswith(admin + b"/"):
            return self.admin
        return None

    def _answered_elsewhere(self, request) -> None:
        respond(request, 404, b"not found\n", b"text/plain")

    health = metrics = admin = _answered_elsewhere


class Reserved(ReservedPaths):
    """The answers to TQServer's own endpoints: from the Supervisor (its pools, reloads),
    the Metrics, the live-reload EventHub, the LiveAPI (status page, snapshots, streams,
    logs) and, in dev mode, the DevWatcher. This is the public port's view (see the module
    docstring); ``full`` gives the admin listener's answers (the listener authorizes)."""

    def __init__(self, supervisor, metrics, events, live_api, watcher=None, token=None) -> None:
        ReservedPaths.__init__(self, supervisor.state)
        self.supervisor = supervisor
        self.metrics_registry = metrics
        self.events = events
        self.live_api = live_api
        self.watcher = watcher
        # the token (admin.token, or read from admin.token_file): a callable, re-read
        # after a reload of the configuration
        self.token: Callable[[], str] = token or (lambda: self.supervisor.config.admin.token)

    def _token_ok(self, request) -> bool:
        return bearer_ok(request, self.token())

    # -- /health ---------------------------------------------------------------------
    def _health(self, request) -> tuple[int, dict]:
        config = self.supervisor.config.health
        pools = self.supervisor.pools
        sub = request.path[len(config.path.rstrip("/").encode()) :].strip(b"/")
        if not sub:
            status, body = health.aggregate(pools.values(), self.watcher, config.degraded_status)
            body["revision"] = self.supervisor.revision  # the release on disk (bin/deploy waits)
        elif sub == b"live":
            status, body = health.live()
        elif sub == b"ready":
            draining = health.shutting_down(self.supervisor)
            status, body = health.ready(pools.values(), draining=draining)
        else:
            # /health/worker/<name> reaches any worker, those named live, ready or worker too
            if sub.startswith(b"worker/"):
                sub = sub[len(b"worker/") :]
            status, body = health.worker(pools, unquote(sub.decode("utf-8", "replace")))
        return status, body

    def full_health(self, request) -> None:
        respond_json(request, *self._health(request))

    def health(self, request) -> None:
        """The public /health: in dev the full detail; in prod each worker's status and
        revision only (what load balancers and bin/deploy read): no ports, errors, build
        output or paths."""
        status, body = self._health(request)
        if self.supervisor.state.mode != "dev":
            revision = body.get("revision")
            body = health.redacted(body)
            if "workers" in body:
                body["revision"] = revision
        respond_json(request, status, body)

    # -- /metrics --------------------------------------------------------------------
    def full_metrics(self, request) -> None:
        body = self.metrics_registry.render(self.supervisor.pools.values())
        respond(request, 200, body, METRICS_CONTENT_TYPE)

    def metrics(self, request) -> None:
        cfg = self.supervisor.config
        if cfg.metrics.public or (cfg.admin.public and self._token_ok(request)):
            self.full_metrics(request)
        else:
            not_served(request)

    # -- /_tqserver ------------------------------------------------------------------
    def admin(self, request) -> None:
        cfg = self.supervisor.config
        if self.supervisor.state.mode == "dev" and request.method == b"GET":
            # the live-reload stream the pages of workers open (dev only)
            if request.path == cfg.admin.path.rstrip("/").encode() + b"/events":
                self.events.subscribe(request)
                return
        if cfg.admin.public and self._token_ok(request):
            self.full_admin(request)
        else:
            not_served(request)

    def full_admin(self, request) -> None:
        base = self.supervisor.config.admin.path.rstrip("/")
        sub = request.path[len(base.encode()) :].strip(b"/")
        if self.live_api.answer(request, base, sub):
            return
        if sub == b"events" and request.method == b"GET":
            self.events.subscribe(request)
        elif sub == b"api/reload" and request.method == b"POST":
            actions = self.supervisor.reload("admin API", everything=True)
            respond_json(request, 202, {"reloading": sorted(actions)})
        elif sub.startswith(b"api/reload/") and request.method == b"POST":
            name = sub[len(b"api/reload/") :].decode("utf-8", "replace")
            pool = self.supervisor.pools.get(name)
            if pool is None:
                respond_json(request, 404, {"error": f"no worker named {name!r}"})
                return
            pool.deploy("admin API")
            respond_json(request, 202, {"reloading": name})
        elif sub.startswith(b"api/"):
            respond_json(
                request,
                405 if sub.startswith(b"api/reload") else 404,
                {"error": "unknown admin endpoint or method"},
            )
        else:
            respond(request, 404, b"not found\n", b"text/plain")
