"""Front: decides what each request is — a reserved endpoint, a public/ file, an error, or a
Forward to an instance — reading only the current ProxyState."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Callable, Protocol

from twisted.application.service import MultiService

from tqserver.proxy import static
from tqserver.proxy.deadlines import Deadlines
from tqserver.proxy.errors import error_renderer
from tqserver.proxy.forward import Forward
from tqserver.proxy.pages import live_reload_snippet
from tqserver.proxy.router import strip_prefix
from tqserver.proxy.upstream import UpstreamPool

if TYPE_CHECKING:
    from tqserver.config.server import ServerConfig
    from tqserver.proxy.site import ProxyRequest
    from tqserver.proxy.state import ProxyState

Renderer = Callable[["ProxyRequest"], None]
# worker type -> what makes its requests' Forward: (front, request, pool, route, target, cfg)
ForwardFactory = Callable[..., Forward]


def slash_redirect(request: ProxyRequest) -> None:
    """301 (GET, HEAD) or 308 (any other method: keep it and the body) to the path with
    a trailing slash, query string kept."""
    _, sep, query = request.uri.partition(b"?")
    request.setResponseCode(301 if request.method in (b"GET", b"HEAD") else 308)
    request.setHeader(b"location", request.path + b"/" + sep + query)
    request.setHeader(b"content-length", b"0")
    request.setHeader(b"x-request-id", request.request_id)
    request.finish_when_read()


class ReservedPaths(Protocol):
    """TQServer's own endpoints (/health, /metrics, /_tqserver): the renderer of a path
    that is one of them, else None."""

    def match(self, path: bytes) -> Renderer | None: ...


class Front(MultiService):
    """The proxy: decides what each request is (it only reads the current ProxyState,
    never waits on the supervisor), and owns what requests use while they are forwarded:
    the kept-alive connections to instances and the per-request timeouts. Its other
    children are the public listening ports, or other connection pools (FastCGI)."""

    name = "proxy"  # type: ignore[assignment]  # Twisted types Service.name as None

    def __init__(
        self,
        state: ProxyState,
        reactor,
        reserved: ReservedPaths | None = None,
        forwards: Mapping[str, ForwardFactory] | None = None,
        relay: Callable[[ProxyRequest], Forward] | None = None,
    ) -> None:
        """``forwards``: the Forward of a worker type that is not plain HTTP (PHP's
        FastCGI). ``relay``: in a proxy process, a reserved endpoint is not answered here
        but handed to the supervisor by the Forward this makes."""
        MultiService.__init__(self)
        self.state = state
        self.reactor = reactor
        self.reserved = reserved
        self.forwards = dict(forwards or {})
        self.relay = relay
        self.upstreams = UpstreamPool(reactor)
        self.upstreams.setServiceParent(self)
        self.deadlines = Deadlines(reactor)
        self.deadlines.setServiceParent(self)

    @property
    def config(self) -> ServerConfig:
        return self.state.config

    @property
    def dev(self) -> bool:
        return self.state.mode == "dev"

    def live_reload_snippet(self, worker: str, config_error: str | None = None) -> bytes:
        events = self.state.config.admin.path.rstrip("/") + "/events"
        return live_reload_snippet(worker, events, config_error)

    def plan(self, request: ProxyRequest) -> Forward | None:
        """Either start forwarding now (returns the Forward) or leave a renderer on the
        request for when its body is complete (returns None)."""
        state = self.state
        cfg = state.config
        path = request.path
        if self.reserved is not None:
            handler = self.reserved.match(path)
            if handler is not None:
                if self.relay is not None:
                    return self.relay(request)
                request.renderer = handler
                return None
        hit = state.routes.match(path)
        if hit is None:
            request.renderer = error_renderer(404, "No worker serves this path.")
            return None
        route, pool = hit
        request.worker_pool = pool
        config = pool.spec.config
        if (
            len(path) == len(route)
            and route != "/"
            and config.strip_prefix
            and config.trailing_slash_redirect
        ):
            # /flask -> /flask/, as nginx does for a prefix location: both would reach the
            # app as "/", and its relative links resolve under its route only from /flask/.
            request.renderer = slash_redirect
            return None
        rest = strip_prefix(route, path)
        if request.method in (b"GET", b"HEAD") and pool.public_dir is not None:
            found = static.resolve_public_file(
                pool.public_dir, rest, state.config.static.deny, pool.spec.type == "php"
            )
            if found is not None:
                request.renderer = lambda req: static.serve_file(req, found)
                return None
        if state.mode == "dev" and (pool.build_error or pool.start_error):
            built = pool.build_error is not None
            request.renderer = error_renderer(
                500,
                f"The last {'build' if built else 'start'} of worker '{pool.name}' failed; "
                "the page reloads after the next good one.",
                output=pool.build_error if built else pool.start_error,
                title="Build failed" if built else "Start failed",
                live_reload=pool.name,
            )
            return None
        target = rest if pool.spec.config.strip_prefix else path
        query = request.uri.partition(b"?")
        if query[1]:
            target += b"?" + query[2]
        forward = self.forwards.get(pool.spec.type, Forward)
        return forward(self, request, pool, route, target, cfg)
