"""Endpoints TQServer answers itself: /health, /metrics and the /_tqserver admin area
(the live status page, JSON status and streams, worker logs, reload control)."""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Callable
from urllib.parse import unquote

from twisted.logger import Logger

from tqserver.control import health
from tqserver.control.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

log = Logger()


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


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
    logs) and, in dev mode, the DevWatcher."""

    def __init__(self, supervisor, metrics, events, live_api, watcher=None) -> None:
        ReservedPaths.__init__(self, supervisor.state)
        self.supervisor = supervisor
        self.metrics_registry = metrics
        self.events = events
        self.live_api = live_api
        self.watcher = watcher

    # -- /health ---------------------------------------------------------------------
    def health(self, request) -> None:
        config = self.supervisor.config.health
        pools = self.supervisor.pools
        sub = request.path[len(config.path.rstrip("/").encode()) :].strip(b"/")
        if not sub:
            status, body = health.aggregate(pools.values(), self.watcher, config.degraded_status)
            body["revision"] = self.supervisor.revision  # the release on disk (bin/deploy waits)
        elif sub == b"live":
            status, body = health.live()
        elif sub == b"ready":
            # draining: stopService started (SIGTERM), the workers are being stopped
            status, body = health.ready(pools.values(), draining=not self.supervisor.running)
        else:
            # /health/worker/<name> reaches any worker, those named live, ready or worker too
            if sub.startswith(b"worker/"):
                sub = sub[len(b"worker/") :]
            status, body = health.worker(pools, unquote(sub.decode("utf-8", "replace")))
        respond_json(request, status, body)

    # -- /metrics --------------------------------------------------------------------
    def metrics(self, request) -> None:
        if not (self.supervisor.config.metrics.public or is_loopback(request.client_ip)):
            respond(request, 403, b"metrics are served to loopback clients only\n", b"text/plain")
            return
        body = self.metrics_registry.render(self.supervisor.pools.values())
        respond(request, 200, body, METRICS_CONTENT_TYPE)

    # -- /_tqserver ------------------------------------------------------------------
    def _authorized(self, request) -> bool:
        token = self.supervisor.config.admin.token
        if token:
            given = request.requestHeaders.getRawHeaders(b"authorization", [b""])[0]
            if hmac.compare_digest(given, b"Bearer " + token.encode()):
                return True
        return is_loopback(request.client_ip)

    def admin(self, request) -> None:
        if not self._authorized(request):
            respond(request, 403, b"forbidden\n", b"text/plain")
            return
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
