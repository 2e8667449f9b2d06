"""HAProxy's runtime API on its stats socket (``stats socket ... level admin``): take one
server of a backend out of rotation gently (``state drain``: no new requests, the ones in
flight finish), and put it back (``state ready``) once its health check passes again."""

from __future__ import annotations

import csv
import socket
import time
from typing import Callable


class BalancerError(Exception):
    pass


class HAProxy:
    def __init__(
        self,
        address: str,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.address = address  # a Unix socket path, or host:port
        self.clock = clock
        self.sleep = sleep

    def _connect(self) -> socket.socket:
        if "/" in self.address:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: str | tuple[str, int] = self.address
        else:
            host, _, port = self.address.rpartition(":")
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            target = (host.strip("[]"), int(port))
        sock.settimeout(5)
        try:
            sock.connect(target)
        except OSError as e:
            sock.close()
            raise BalancerError(
                f"cannot reach HAProxy's stats socket {self.address}: {e}"
            ) from None
        return sock

    def command(self, line: str) -> str:
        """One command; HAProxy answers and closes the connection."""
        with self._connect() as sock:
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        return b"".join(chunks).decode("utf-8", "replace")

    def set_state(self, backend: str, server: str, state: str) -> None:
        answer = self.command(f"set server {backend}/{server} state {state}").strip()
        if answer:  # success is an empty answer
            raise BalancerError(f"set server {backend}/{server} state {state}: {answer}")

    def stat(self, backend: str, server: str) -> dict:
        """The server's row of ``show stat`` (scur: sessions now, status: UP, DRAIN...)."""
        text = self.command("show stat").lstrip("# ")
        for row in csv.DictReader(text.splitlines()):
            if row.get("pxname") == backend and row.get("svname") == server:
                return row
        raise BalancerError(f"HAProxy has no server {backend}/{server}")

    def drain(self, backend: str, server: str, timeout: float) -> int:
        """Out of rotation; wait (up to ``timeout``) until no session is left on it.
        Returns the sessions still open when the wait ended (0 normally)."""
        self.set_state(backend, server, "drain")
        deadline = self.clock() + timeout
        while True:
            sessions = int(self.stat(backend, server).get("scur") or 0)
            if sessions == 0 or self.clock() >= deadline:
                return sessions
            self.sleep(0.1)

    def ready(self, backend: str, server: str, timeout: float) -> None:
        """Back in rotation; wait until HAProxy's health check sees it UP."""
        self.set_state(backend, server, "ready")
        deadline = self.clock() + timeout
        while True:
            status = self.stat(backend, server).get("status", "")
            if status.startswith("UP") or status == "no check":
                return
            if self.clock() >= deadline:
                raise BalancerError(f"{backend}/{server} is {status}, not UP, after {timeout:g}s")
            self.sleep(0.1)
