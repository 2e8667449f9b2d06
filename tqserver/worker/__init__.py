"""Runtime for Python workers.

A worker script hands its application to :func:`serve`::

    from tqserver.worker import serve

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hello\\n"]

    serve(app)                  # a WSGI application, an ASGI application,
    # serve(resource)           # or a twisted.web IResource

or names it in worker.yaml (``python.app: "package.module:app"``), which runs
``python -m tqserver.worker package.module:app`` (see app.py).

``serve`` listens on ``WORKER_HOST:WORKER_PORT`` (the worker contract in the
README), answers the health probe and shuts down gracefully on SIGTERM/SIGINT:
it stops accepting, closes idle keep-alive connections, lets in-flight requests
finish (at most ``WORKER_DRAIN_SECONDS``) and returns, so the script exits 0. A
second signal while draining exits at once with status 1. Behind the proxy, the
route a worker is mounted at (X-Forwarded-Prefix) is the WSGI ``SCRIPT_NAME`` and
the ASGI ``root_path``, so applications generate links under it by themselves.

Environment (all optional):

``WORKER_PORT`` / ``PORT``       port to listen on (default 8000)
``WORKER_HOST``                  address to listen on (default 127.0.0.1)
``WORKER_HEALTH_PATH``           health probe path (default ``/health``)
``WORKER_DRAIN_SECONDS``         shutdown drain bound (default 30)
``WORKER_IDLE_TIMEOUT_SECONDS``  keep-alive idle timeout (default 300)
``WORKER_READ_TIMEOUT_SECONDS``  socket timeout inside a request (default 60)

Start-up time is part of the dev loop (save -> new code served), so the WSGI
server (server.py, connection.py, response.py, body.py) is a small HTTP/1.1
implementation on the interpreter's C modules (``_socket``, ``_thread``,
``_signal``, ``select``, ``io``): it does not import ``http.server`` (it pulls in
http.client, email and ssl), nor ``socket``/``threading``/``signal``/
``socketserver`` (their enum set-up is slow on PyPy), nor Twisted
(docs/performance.md has the import times). Twisted is imported only to serve a
Twisted resource (resource.py), uvicorn only for an ASGI app (asgi.py). A
thread per connection; keep-alive; chunked both ways.

This package imports nothing else of TQServer: a worker with its own virtualenv
gets only it on its path.
"""

from __future__ import annotations

import os

from tqserver.worker.common import ClientDisconnected, env_float, worker_info

__all__ = ["ClientDisconnected", "serve", "worker_info"]


def serve(app_or_resource, port=None, host=None) -> None:
    """Serve a WSGI application, an ASGI application or a twisted.web resource until
    SIGTERM/SIGINT.

    ``port`` defaults to ``$WORKER_PORT`` (or ``$PORT``, else 8000), ``host``
    to ``$WORKER_HOST`` (else 127.0.0.1).  Returns after a graceful shutdown.
    The health path is answered without asking the application.
    """
    _serve(app_or_resource, port, host, app_health=False)


def _serve(app, port, host, app_health: bool) -> None:
    env = os.environ
    if host is None:
        host = env.get("WORKER_HOST") or "127.0.0.1"
    if port is None:
        raw = env.get("WORKER_PORT") or env.get("PORT") or "8000"
        try:
            port = int(raw)
        except ValueError:
            raise SystemExit(f"tqserver.worker: WORKER_PORT={raw!r} is not a port number") from None
    port = int(port)
    health_path = (env.get("WORKER_HEALTH_PATH") or "/health").split("?", 1)[0]
    if not health_path.startswith("/"):
        health_path = "/" + health_path
    drain_seconds = max(0.0, env_float("WORKER_DRAIN_SECONDS", 30.0))

    from tqserver.worker.resource import is_twisted_resource

    if is_twisted_resource(app):
        from tqserver.worker.resource import serve_resource

        return serve_resource(app, host, port, health_path, drain_seconds)
    if not callable(app):
        raise TypeError(
            "serve() needs a WSGI application, an ASGI application or a "
            f"twisted.web IResource, not {app!r}"
        )
    from tqserver.worker.asgi import is_asgi

    if is_asgi(app):
        from tqserver.worker.asgi import serve_asgi

        return serve_asgi(app, host, port, health_path, drain_seconds, app_health)
    from tqserver.worker.server import serve_wsgi

    return serve_wsgi(app, host, port, health_path, drain_seconds, app_health)
