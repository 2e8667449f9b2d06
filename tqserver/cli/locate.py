"""Where the ``tqserver`` command finds the server: the project's server.yaml (the admin
area on the server's port, on loopback when it listens on every interface), or --url."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from tqserver.cli.client import Target
from tqserver.config.errors import ConfigError
from tqserver.config.server import default_server_config, load_server_config


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
    found = Target(
        admin_path=admin.path,
        token=admin.token if token is None else token,
        host=_loopback(loaded.server.host),
        port=loaded.server.port,
        source=source,
    )
    return found if url is None else _from_url(url, found)


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
