"""Serving an ASGI application: on uvicorn (installed in the worker's own environment),
with lifespan startup/shutdown and uvicorn's graceful drain on SIGTERM, behind a small
middleware that mounts the app under its route and answers the health probe."""

from __future__ import annotations

import sys

from tqserver.worker.common import log, worker_info

_CO_COROUTINE = 0x80  # inspect.CO_COROUTINE, without importing inspect
_OK_HEADERS = [(b"content-type", b"text/plain; charset=utf-8"), (b"cache-control", b"no-store")]


def is_asgi(app) -> bool:
    """An ASGI 3 application: an ``async def`` callable (function, or object with an async
    ``__call__``), or any callable of three positional parameters (scope, receive, send);
    a WSGI application takes two (environ, start_response)."""
    func = app if hasattr(app, "__code__") else getattr(app, "__call__", None)  # noqa: B004
    bound = hasattr(func, "__self__")
    func = getattr(func, "__func__", func)
    code = getattr(func, "__code__", None)
    if code is None:
        return False
    if code.co_flags & _CO_COROUTINE:
        return True
    return code.co_argcount - (1 if bound else 0) == 3 and not code.co_flags & 0x04  # *args


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


class Mounted:
    """The app as TQServer serves it: under the route the proxy stripped (``root_path`` =
    X-Forwarded-Prefix, and ``path`` with it in front, as the ASGI spec has it), and with
    an answer to the health probe: the app's own, or "ok" when it has no such route
    (``app_health``), else always "ok" without asking the app."""

    def __init__(self, app, health_path: str, app_health: bool) -> None:
        self.app = app
        self.health_path = health_path
        self.app_health = app_health

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        health = (
            kind == "http"
            and scope["path"] == self.health_path
            and scope["method"] in ("GET", "HEAD")
        )
        if health and not self.app_health:
            return await _ok(send)
        prefix = _header(scope, b"x-forwarded-prefix")
        if prefix and prefix[:1] == b"/" and b"?" not in prefix:
            prefix = prefix.rstrip(b"/")
            scope = dict(scope)
            root = prefix.decode("latin-1")
            scope["root_path"] = root + scope.get("root_path", "")
            scope["path"] = root + scope["path"]
            if "raw_path" in scope and scope["raw_path"] is not None:
                scope["raw_path"] = prefix + scope["raw_path"]
        if health:
            return await self._app_or_ok(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _app_or_ok(self, scope, receive, send):
        missing = []

        async def relay(message):
            if message["type"] == "http.response.start" and message["status"] == 404:
                missing.append(message)
            if not missing:
                await send(message)

        await self.app(scope, receive, relay)
        if missing:
            await _ok(send)


async def _ok(send):
    await send({"type": "http.response.start", "status": 200, "headers": _OK_HEADERS})
    await send({"type": "http.response.body", "body": b"ok"})


def serve_asgi(
    app, host: str, port: int, health_path: str, drain_seconds: float, app_health: bool = False
) -> None:
    """Serve ``app`` on uvicorn until SIGTERM: stop accepting, let in-flight requests
    finish (at most ``drain_seconds``), run lifespan shutdown, return. A failed lifespan
    startup exits with status 3 (its traceback is in the log)."""
    try:
        import uvicorn
    except ImportError:
        raise SystemExit(
            f"tqserver.worker: {app!r} is an ASGI application; it is served with uvicorn, "
            f"which {sys.executable} cannot import: add uvicorn to the worker's "
            "requirements.txt (a worker with python.app gets it installed itself)"
        ) from None
    config = uvicorn.Config(
        Mounted(app, health_path, app_health),
        host=host,
        port=port,
        lifespan="auto",
        access_log=False,  # the supervisor writes the access log
        proxy_headers=True,  # client address and scheme from the proxy's X-Forwarded-*
        forwarded_allow_ips="127.0.0.1,::1",
        timeout_graceful_shutdown=max(1, int(drain_seconds)),
        server_header=False,
        log_level="info",
    )
    server = uvicorn.Server(config)
    log(
        f"{worker_info()['name'] or 'worker'} serving an ASGI application with uvicorn "
        f"{uvicorn.__version__} on http://{host}:{port}"
    )
    server.run()
    if not server.started:
        raise SystemExit(3)
    log("stopped")
