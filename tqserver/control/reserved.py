"""Endpoints TQServer answers itself: /health, /metrics and the /_tqserver admin area
(status page, JSON status, reload control)."""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
from typing import Callable

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
        if path == cfg.health.path.encode():
            return self.health
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
    the Metrics, the live-reload EventHub and, in dev mode, the DevWatcher."""

    def __init__(self, supervisor, metrics, events, watcher=None) -> None:
        ReservedPaths.__init__(self, supervisor.state)
        self.supervisor = supervisor
        self.metrics_registry = metrics
        self.events = events
        self.watcher = watcher

    # -- /health ---------------------------------------------------------------------
    def health(self, request) -> None:
        status, body = health.aggregate(self.supervisor.pools.values(), self.watcher)
        body["revision"] = self.supervisor.revision  # the release on disk (bin/deploy waits)
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
        base = self.supervisor.config.admin.path.rstrip("/").encode()
        sub = request.path[len(base) :].strip(b"/")
        if sub in (b"", b"index.html") and request.method in (b"GET", b"HEAD"):
            respond(request, 200, self.status_page(), b"text/html; charset=utf-8")
        elif sub == b"events" and request.method == b"GET":
            self.events.subscribe(request)
        elif sub == b"api/status" and request.method in (b"GET", b"HEAD"):
            respond_json(request, 200, self.status())
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

    def status(self) -> dict:
        sup = self.supervisor
        workers = {}
        for name, pool in sorted(sup.pools.items()):
            info = pool.describe()
            info["instances"] = [
                {
                    "id": i.id,
                    "port": i.port,
                    "pid": i.pid,
                    "state": i.state,
                    "in_flight": i.inflight + i.inflight_elsewhere,
                    "requests": i.requests,
                    "health_failures": i.health_failures,
                }
                for i in sorted(pool.instances, key=lambda i: i.id)
            ]
            info["build_output"] = pool.build_error
            info["start_output"] = pool.start_error
            workers[name] = info
        return {
            "mode": sup.mode,
            "root": sup.root,
            "workers": workers,
            "config_errors": [str(e) for e in sup.config_errors],
            "watcher": None if self.watcher is None else self.watcher.describe(),
        }

    def status_page(self) -> bytes:
        data = self.status()
        rows = []
        for name, w in data["workers"].items():
            inst = "<br>".join(
                f"{html.escape(i['id'])} :{i['port']} pid {i['pid']} {html.escape(i['state'])}"
                f" ({i['requests']} req, {i['in_flight']} in flight)"
                for i in w["instances"]
            )
            build = w["last_build"]
            build_text = (
                "—"
                if build is None
                else (f"{'ok' if build['ok'] else 'FAILED'} in {build['duration_seconds']}s")
            )
            rows.append(
                f"<tr><td><a href='{html.escape(w['route'])}'>{html.escape(name)}</a></td>"
                f"<td>{html.escape(w['type'])}</td><td>{html.escape(w['route'])}</td>"
                f"<td class='{html.escape(w['status'])}'>{html.escape(w['status'])}</td>"
                f"<td>{inst or '—'}</td><td>{build_text}</td>"
                f"<td>{html.escape(w['error'] or '')}</td></tr>"
            )
        errors = "".join(f"<li>{html.escape(e)}</li>" for e in data["config_errors"])
        watcher = data["watcher"]
        watcher_failed = (
            "<p class=failed><b>The file watcher failed</b>: "
            f"{html.escape(watcher['error'] or '')}; it is restarting, edits are not seen "
            "until then.</p>"
            if watcher is not None and watcher["status"] == "failed"
            else ""
        )
        page = f"""<!DOCTYPE html><html><head><meta charset=utf-8><title>TQServer status</title>
<style>body{{font:14px system-ui,sans-serif;margin:24px;color:#1d2330}}
table{{border-collapse:collapse;width:100%}}td,th{{border-bottom:1px solid #ddd;padding:6px 8px;
text-align:left;vertical-align:top}}.healthy{{color:#1a7f37}}.degraded,.starting{{color:#9a6700}}
.failed,.stopped{{color:#cf222e}}</style></head><body>
<h1>TQServer</h1><p>mode {html.escape(data["mode"])} · root {html.escape(data["root"])}</p>
{watcher_failed}
<table><tr><th>worker</th><th>type</th><th>route</th><th>status</th><th>instances</th>
<th>last build</th><th>error</th></tr>{"".join(rows)}</table>
{"<h2>Configuration errors</h2><ul>" + errors + "</ul>" if errors else ""}
</body></html>"""
        return page.encode("utf-8")
