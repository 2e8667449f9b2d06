"""etc/server.yaml."""

from __future__ import annotations

import ipaddress
import os
import re
from typing import TYPE_CHECKING

import attrs

from tqserver.config.errors import ConfigWarning
from tqserver.config.fields import (
    ORDER_CHECKS,
    Position,
    _bool,
    _build,
    _choice,
    _f,
    _file_mode,
    _float,
    _int,
    _int_choice,
    _item_pos,
    _load,
    _log_file,
    _positions,
    _proxy_processes,
    _size,
    _str,
    _str_list,
    _sub,
    _url_path,
)

if TYPE_CHECKING:
    from tqserver.config.fields import _Context

DEFAULT_ADMIN_LISTEN = "unix:run/tqserver-admin.sock"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def admin_tcp_interface(listen: str) -> str | None:
    """The interface of a tcp:/tcp6: endpoint description ("" for all), None for others."""
    parts = re.split(r"(?<!\\):", listen)
    if parts[0] not in ("tcp", "tcp6"):
        return None
    kwargs = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    return kwargs.get("interface", "").replace("\\:", ":")


def read_admin_token(admin: AdminSection, root: str) -> str:
    """The bearer token: admin.token, else the first line of admin.token_file ($VARS
    expanded, relative to ``root``; e.g. ${CREDENTIALS_DIRECTORY}/admin-token), else "".
    Raises OSError when the file cannot be read."""
    if admin.token or not admin.token_file:
        return admin.token
    path = os.path.join(root, os.path.expandvars(os.path.expanduser(admin.token_file)))
    with open(path, encoding="utf-8") as f:
        return f.readline().strip()


def _admin_listen(value, ctx, key, pos):
    """unix:PATH, tcp:PORT[:interface=...] or tcp6:..., or "" / null (no listener)."""
    value = _str(null_ok=True)(value, ctx, key, pos).strip()
    if not value:
        return ""
    kind, _, rest = value.partition(":")
    if kind == "unix":
        path = rest.split(":", 1)[0]
        if path.startswith("address="):
            path = path[len("address=") :]
        if path:
            return value
    elif kind in ("tcp", "tcp6"):
        args = [p for p in re.split(r"(?<!\\):", rest) if p and "=" not in p]
        kwargs = dict(p.split("=", 1) for p in re.split(r"(?<!\\):", rest) if "=" in p)
        port = kwargs.get("port", args[0] if args else "")
        if port.isdigit() and 0 < int(port) < 65536:
            return value
    raise ctx.error(
        key,
        pos,
        f"expected unix:PATH or tcp:PORT:interface=127.0.0.1 (a Twisted endpoint), got {value!r}",
    )


# ---------------------------------------------------------------------------
# etc/server.yaml


def _addresses(value, ctx, key, pos):
    """A list of IP addresses and CIDR networks (server.trusted_proxies)."""
    items = _str_list()(value, ctx, key, pos)
    for i, item in enumerate(items):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ctx.error(
                f"{key}[{i}]",
                _item_pos(value, i, pos),
                f"expected an IP address or a network such as 10.0.0.0/8, got {item!r}",
            ) from None
    return items


@attrs.frozen
class ServerSection:
    port: int = _f(8080, _int(1, 65535))
    host: str = _f("0.0.0.0", _str())
    read_timeout_seconds: float = _f(30.0, _float())
    write_timeout_seconds: float = _f(30.0, _float())
    idle_timeout_seconds: float = _f(120.0, _float())
    log_file: str | None = _f("logs/tqserver_{date}.log", _log_file)
    log_file_mode: int = _f(0o640, _file_mode)  # every log file this server creates
    log_retention_days: int = _f(0, _int(0))  # {date} files older are deleted; 0: kept
    access_log: bool = _f(True, _bool)
    access_log_format: str = _f("combined", _choice("combined", "common", "json"))
    access_log_file: str | None = _f(None, _log_file)  # None: in the server log
    access_log_exclude_health: bool = _f(False, _bool)  # no line for health.path probes
    max_body_bytes: int = _f(104857600, _size)
    trusted_proxies: tuple[str, ...] = _f((), _addresses)  # addresses or CIDR networks
    proxy_processes: int | str = _f(1, _proxy_processes)
    # After SIGTERM, this long not ready (/health/ready 503) but still serving, so that a
    # load balancer checking readiness takes the node out before its ports close.
    shutdown_delay_seconds: float = _f(0.0, _float())


@attrs.frozen
class WorkersSection:
    directory: str = _f("workers", _str())
    port_range_start: int = _f(9000, _int(1, 65535))
    port_range_end: int = _f(9999, _int(1, 65535))
    startup_delay_ms: int = _f(100, _int(0))
    startup_timeout_ms: int = _f(10000, _int(0))
    restart_delay_ms: int = _f(100, _int(0))
    shutdown_grace_period_ms: int = _f(500, _int(0))
    kill_timeout_ms: int = _f(5000, _int(0))
    health_check_interval_ms: int = _f(10000, _int(1))
    health_check_timeout_ms: int = _f(1000, _int(1))
    health_check_failures: int = _f(3, _int(1))
    restart_backoff_min_ms: int = _f(100, _int(0))
    restart_backoff_max_ms: int = _f(30000, _int(0))
    # A cgroup (v2) per instance where the machine allows it (root, or a delegated one).
    cgroups: bool = _f(True, _bool)


@attrs.frozen
class FileWatcherSection:
    debounce_ms: int = _f(50, _int(0))
    ignore: tuple[str, ...] = _f(
        (".git", "node_modules", "bin", "*.swp", "*~", ".#*", "__pycache__"), _str_list()
    )


@attrs.frozen
class MetricsSection:
    enabled: bool = _f(True, _bool)
    path: str = _f("/metrics", _url_path)
    # true: /metrics on the public port too, to anyone, without the token (else only on
    # the admin listener, or on the public port with the token when admin.public is true)
    public: bool = _f(False, _bool)


@attrs.frozen
class HealthSection:
    path: str = _f("/health", _url_path)  # also <path>/live, <path>/ready, <path>/<worker>
    # The HTTP status of <path> while some worker is not healthy but one serves: 200 keeps
    # the node in a load balancer's rotation, 503 takes it out (unhealthy is always 503).
    degraded_status: int = _f(200, _int_choice(200, 503))


@attrs.frozen
class AdminSection:
    path: str = _f("/_tqserver", _url_path)
    # The control plane's own listener (a Twisted endpoint; a relative unix: path is under
    # the root; "" or null: none). A TCP interface other than loopback needs a token.
    listen: str = _f(DEFAULT_ADMIN_LISTEN, _admin_listen)
    token: str = _f("", _str(null_ok=True))  # the bearer token, or:
    token_file: str = _f("", _str(null_ok=True))  # a file holding it (systemd credentials)
    # true: /_tqserver and /metrics answered on the public port too, with the token only
    public: bool = _f(False, _bool)


def unguarded_admin_listener(admin: AdminSection) -> str | None:
    """Why ``admin.listen`` is refused (anyone could reach it: off loopback without a
    token), or None."""
    interface = admin_tcp_interface(admin.listen)
    if interface is None or is_loopback(interface) or admin.token or admin.token_file:
        return None
    where = "all interfaces" if interface in ("", "0.0.0.0", "::") else interface
    return (
        f"{admin.listen!r} listens on {where}: set admin.token or admin.token_file, "
        "or listen on a unix: socket or interface=127.0.0.1"
    )


def _check_admin(config: ServerConfig, ctx: _Context) -> None:
    """Refuse a control plane that anyone could reach without the token."""
    admin = config.admin
    has_token = bool(admin.token or admin.token_file)
    problem = unguarded_admin_listener(admin)
    if problem:
        raise ctx.error("admin.listen", ctx.positions.get("admin.listen", (None, None)), problem)
    if admin.public and not has_token:
        raise ctx.error(
            "admin.public",
            ctx.positions.get("admin.public", (None, None)),
            "true needs admin.token or admin.token_file (the public port answers the "
            "control plane only with it)",
        )


# Editor backups and swap files (vim, emacs, nano, kate, patch, diff tools): a copy of a
# script in public/ must not be served as text (index.php~ is PHP source). Dotfiles are
# never served anyway.
DEFAULT_STATIC_DENY = (
    "*~",
    "#*#",
    "*.swp",
    "*.swo",
    "*.swx",
    "*.bak",
    "*.orig",
    "*.rej",
    "*.old",
    "*.save",
    "*.sav",
    "*.tmp",
    "*.kate-swp",
)


@attrs.frozen
class StaticSection:
    deny: tuple[str, ...] = _f(DEFAULT_STATIC_DENY, _str_list())  # file names never served


@attrs.frozen
class ServerConfig:
    server: ServerSection = _sub(ServerSection)
    workers: WorkersSection = _sub(WorkersSection)
    file_watcher: FileWatcherSection = _sub(FileWatcherSection)
    metrics: MetricsSection = _sub(MetricsSection)
    health: HealthSection = _sub(HealthSection)
    admin: AdminSection = _sub(AdminSection)
    static: StaticSection = _sub(StaticSection)
    source: str = attrs.field(default="")
    positions: dict[str, Position] = _positions()


def load_server_config(path: str) -> tuple[ServerConfig, list[ConfigWarning]]:
    """Read etc/server.yaml; raises ConfigError, returns the unknown-key warnings."""
    ctx, top = _load(path)
    config = _build(ServerConfig, top, ctx, "", source=path, positions=ctx.positions)
    _check_admin(config, ctx)
    return config, ctx.sorted_warnings()


def default_server_config() -> ServerConfig:
    return ServerConfig()


ORDER_CHECKS[WorkersSection] = [
    ("port_range_start", "port_range_end"),
    ("restart_backoff_min_ms", "restart_backoff_max_ms"),
]
