"""ProxyState: what the proxy reads on every request, and nothing else of the supervisor."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tqserver.proxy.router import RoutingTable

if TYPE_CHECKING:
    from tqserver.config.server import ServerConfig


class ProxyState:
    """The mode, the server configuration and the routing table, as the proxy sees them
    now. Whoever owns the workers writes it (the Supervisor; in a proxy process, what the
    supervisor publishes), always by replacing ``config`` or ``routes`` whole, so a request
    never sees half a change."""

    __slots__ = ("config", "mode", "routes")

    config: ServerConfig
    mode: str
    routes: RoutingTable

    def __init__(self, mode: str, config: ServerConfig, routes: RoutingTable | None = None) -> None:
        self.mode = mode
        self.config = config
        self.routes = routes if routes is not None else RoutingTable()

    @property
    def dev(self) -> bool:
        return self.mode == "dev"
