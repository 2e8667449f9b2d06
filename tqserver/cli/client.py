"""Requests to a server's control plane from the command line.

A command line has no reactor to share and makes a handful of requests, so this is the
standard library's blocking HTTP client (http.client, over TCP or a Unix socket), not
Twisted: nothing here runs inside the server."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import attrs


class NoServer(Exception):
    """Nothing answers where the server's control plane should be."""


class ControlError(Exception):
    """The control plane answered with an error (``status``, its message)."""

    def __init__(self, status: int, message: str) -> None:
        Exception.__init__(self, message)
        self.status = status
        self.message = message


@attrs.frozen
class Target:
    """Where a server's control plane is and what it asks for: a TCP ``host``/``port`` or
    a ``unix_socket``, the admin area's path, the token (or ""), and where that was read
    (said when nothing answers)."""

    admin_path: str = "/_tqserver"
    token: str = ""
    host: str | None = "127.0.0.1"
    port: int | None = 8080
    unix_socket: str | None = None
    source: str = ""

    @property
    def shown(self) -> str:
        if self.unix_socket is not None:
            return f"unix:{self.unix_socket}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"http://{host}:{self.port}"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        http.client.HTTPConnection.__init__(self, "localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


class Client:
    """The admin API of one server (``target``); ``timeout`` bounds each read."""

    def __init__(self, target: Target, timeout: float = 10.0) -> None:
        self.target = target
        self.timeout = timeout

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        t = self.target
        if t.unix_socket is not None:
            return _UnixConnection(t.unix_socket, timeout)
        assert t.host is not None and t.port is not None
        return http.client.HTTPConnection(t.host, t.port, timeout=timeout)

    def _open(self, method: str, path: str, timeout: float | None):
        conn = self._connection(timeout)
        headers = {"Accept": "application/json"}
        if self.target.token:
            headers["Authorization"] = f"Bearer {self.target.token}"
        try:
            conn.request(method, self.target.admin_path.rstrip("/") + path, headers=headers)
            response = conn.getresponse()
        except (ConnectionRefusedError, FileNotFoundError) as e:
            conn.close()
            raise NoServer(e.strerror or str(e)) from None
        except (socket.timeout, OSError, http.client.HTTPException) as e:
            conn.close()
            raise NoServer(str(e) or type(e).__name__) from None
        if response.status >= 400:
            body = response.read().decode("utf-8", "replace")
            conn.close()
            try:
                message = json.loads(body)["error"]
            except (ValueError, KeyError, TypeError):
                message = body.strip() or response.reason
            raise ControlError(response.status, message)
        return conn, response

    def _json(self, method: str, path: str):
        conn, response = self._open(method, path, self.timeout)
        try:
            return json.loads(response.read())
        finally:
            conn.close()

    # -- the API ---------------------------------------------------------------------
    def status(self) -> dict:
        return self._json("GET", "/api/status")

    def reload(self, worker: str | None = None) -> dict:
        path = "/api/reload" + ("" if worker is None else "/" + quote(worker, safe=""))
        return self._json("POST", path)

    def logs(self, worker: str, lines: int) -> list[str]:
        return self._json("GET", f"/api/logs/{quote(worker, safe='')}?lines={lines}")["lines"]

    def follow_logs(self, worker: str, lines: int) -> Iterator[list[str]]:
        """Batches of output lines as they come, until the server closes the stream."""
        path = f"/api/logs/{quote(worker, safe='')}?lines={lines}&follow=1"
        for kind, data in self._events(path):
            if kind == "lines":
                yield data

    def stream(self) -> Iterator[dict]:
        """Status snapshots as the server pushes them (about one a second)."""
        for kind, data in self._events("/api/stream"):
            if kind == "status":
                yield data

    def _events(self, path: str) -> Iterator[tuple[str, Any]]:
        # The server sends a heartbeat at least every 15 s: a minute of silence is a hang.
        conn, response = self._open("GET", path, 60.0)
        try:
            kind, data = "message", []  # type: tuple[str, list[str]]
            while True:
                raw = response.readline()
                if not raw:
                    return  # the server closed the stream (it stopped)
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not line:
                    if data:
                        yield kind, json.loads("\n".join(data))
                    kind, data = "message", []
                elif line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip(" "))
        except (socket.timeout, OSError) as e:
            raise NoServer(f"the stream stopped: {e}") from None
        finally:
            conn.close()
