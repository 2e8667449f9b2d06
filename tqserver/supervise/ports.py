"""Loopback ports for worker instances, handed out from the configured range."""

from __future__ import annotations

import socket
from typing import Callable


class PortsExhausted(Exception):
    """No free port is left in the configured range."""


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when a server could bind ``host:port`` now (someone else may hold it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # Same option the workers' servers use, so TIME_WAIT leftovers do not count as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


class PortPool:
    """Hands out ports round-robin from [start, end], skipping ones bound by anybody.

    Round-robin (rather than lowest-free) keeps a just-released port cool for a while, so a
    new instance never inherits connections meant for the one that was drained from it.
    """

    def __init__(self, start: int, end: int, is_free: Callable[[int], bool] = port_is_free) -> None:
        self._is_free = is_free
        self._in_use: set[int] = set()
        self.reconfigure(start, end)

    def reconfigure(self, start: int, end: int) -> None:
        """Apply a new range; ports already handed out stay valid until released."""
        if start > end:
            raise ValueError(f"port range {start}-{end} is empty")
        self.start, self.end = start, end
        self._next = start

    def acquire(self) -> int:
        size = self.end - self.start + 1
        for _ in range(size):
            port = self._next
            self._next = self.start if port >= self.end else port + 1
            if port in self._in_use:
                continue
            if self._is_free(port):
                self._in_use.add(port)
                return port
        raise PortsExhausted(
            f"no free port in workers.port_range {self.start}-{self.end} "
            f"({len(self._in_use)} held by our instances)"
        )

    def release(self, port: int | None) -> None:
        self._in_use.discard(port)

    @property
    def in_use(self) -> frozenset:
        return frozenset(self._in_use)
