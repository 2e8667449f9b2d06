"""Immutable routing snapshots: longest segment-aware prefix match."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote


def normalize_route(route: str) -> str:
    """'/api/' -> '/api', '' -> '/'; routes are compared segment-wise."""
    route = "/" + route.strip("/")
    return route


@functools.lru_cache(maxsize=1024)
def route_key(route: str) -> bytes:
    """A route as it appears in a request target: percent-encoded, so '/café' matches
    '/caf%C3%A9' (a raw non-ASCII byte is not a valid target)."""
    return quote(route, safe="/!$&'()*+,;=:@-._~").encode("ascii")


def strip_prefix(prefix: str, path: bytes) -> bytes:
    """The path a worker mounted at ``prefix`` sees: '/api/items' -> '/items', '/api' -> '/'."""
    if prefix == "/":
        return path
    rest = path[len(route_key(prefix)) :]
    if not rest:
        return b"/"
    if rest[:1] == b"?":
        return b"/" + rest
    return rest


class RoutingTable:
    """A frozen map of mount paths to targets. The proxy reads the current table; the
    supervisor publishes a whole new one, so a request never sees half a change."""

    __slots__ = ("_routes",)

    def __init__(self, routes: Iterable[tuple[str, Any]] = ()) -> None:
        table: dict[bytes, tuple[str, Any]] = {}
        for route, target in routes:
            route = normalize_route(route)
            key = route_key(route)
            if key in table:
                raise ValueError(f"route {route!r} is used twice")
            table[key] = (route, target)
        self._routes = table

    def __len__(self) -> int:
        return len(self._routes)

    def items(self):
        return [(route, target) for route, target in self._routes.values()]

    def match(self, path: bytes) -> tuple[str, Any] | None:
        """(route, target) for the longest mount path that is a whole-segment prefix of
        ``path`` (query string excluded by the caller), or None."""
        routes = self._routes
        candidate = path
        while True:
            hit = routes.get(candidate)
            if hit is not None:
                return hit
            cut = candidate.rfind(b"/")
            if cut <= 0:
                return routes.get(b"/")
            candidate = candidate[:cut]
