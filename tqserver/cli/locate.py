"""Where the ``tqserver`` command finds the server: the project's server.yaml (its admin
listener, admin.listen: a Unix socket under the root, or a TCP port, on loopback when it
listens on every interface; the public port when there is none), or --url."""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

from tqserver.cli.client import Target
from tqserver.config.errors import ConfigError
from tqserver.config.server import (
    admin_tcp_interface,
    default_server_config,
    load_server_config,
    read_admin_token,
)


class LocateError(Exception):
    """server.yaml cannot say (invalid, unreadable), or --url is not one we can use."""


def target(root: str, config: str, url: str | None, token: str | None) -> Target:
    root = os.path.abspath(root)
    path = config if os.path.isabs(config) else os.path.join(root, config)
    if os.path.exists(path):
        try:
            loaded, _warnings = load_server_config(path)
        except ConfigError as e:
            raise LocateError(str(e)) from None
        source = f"from {os.path.relpath(path)}: is the server of {root} running?"
    elif config == "etc/server.yaml":
        loaded = default_server_config()  # as the server does without one
        source = f"no {os.path.relpath(path)}, so the defaults: is the server running?"
    else:
        raise LocateError(f"{path}: no such file")
    admin = loaded.admin
    if token is None:
        try:
            token = read_admin_token(admin, root)
        except OSError:
            token = ""  # not readable by this user: the socket's mode decides
    host: str | None = _loopback(loaded.server.host)
    port: int | None = loaded.server.port
    unix_socket = None
    listen = admin.listen
    if listen.startswith("unix:"):
        host = port = None
        unix_socket = os.path.join(root, _unix_path(listen))
    elif listen:
        interface = admin_tcp_interface(listen) or ""
        host = _loopback(interface)
        port = _tcp_port(listen)
    found = Target(
        admin_path=admin.path,
        token=token,
        host=host,
        port=port,
        unix_socket=unix_socket,
        source=source,
    )
    return found if url is None else _from_url(url, found)


def _unix_path(listen: str) -> str:
    parts = re.split(r"(?<!\\):", listen[len("unix:") :])
    for part in parts:
        if part.startswith("address="):
            return part[len("address=") :].replace("\\:", ":")
    return next(p for p in parts if "=" not in p).replace("\\:", ":")


def _tcp_port(listen: str) -> int:
    parts = re.split(r"(?<!\\):", listen)[1:]
    kwargs = dict(p.split("=", 1) for p in parts if "=" in p)
    return int(kwargs.get("port") or next(p for p in parts if "=" not in p))


def _loopback(host: str) -> str:
    """A listener on every interface is reached on loopback."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _from_url(url: str, found: Target) -> Target:
    if url.startswith("unix:"):
        path = os.path.abspath(url[len("unix:") :])
        return Target(found.admin_path, found.token, None, None, path, "is the server running?")
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise LocateError(f"--url {url}: expected http://HOST:PORT or unix:/path")
    try:
        port = parts.port or 80
    except ValueError:
        raise LocateError(f"--url {url}: invalid port") from None
    return Target(found.admin_path, found.token, parts.hostname, port, None, "is it running?")
