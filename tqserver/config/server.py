"""etc/server.yaml."""

from __future__ import annotations

import ipaddress

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
    public: bool = _f(False, _bool)  # serve /metrics to non-loopback clients too


@attrs.frozen
class HealthSection:
    path: str = _f("/health", _url_path)  # also <path>/live, <path>/ready, <path>/<worker>
    # The HTTP status of <path> while some worker is not healthy but one serves: 200 keeps
    # the node in a load balancer's rotation, 503 takes it out (unhealthy is always 503).
    degraded_status: int = _f(200, _int_choice(200, 503))


@attrs.frozen
class AdminSection:
    path: str = _f("/_tqserver", _url_path)
    token: str = _f("", _str(null_ok=True))  # non-empty: non-loopback clients may use it


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
    return config, ctx.sorted_warnings()


def default_server_config() -> ServerConfig:
    return ServerConfig()


ORDER_CHECKS[WorkersSection] = [
    ("port_range_start", "port_range_end"),
    ("restart_backoff_min_ms", "restart_backoff_max_ms"),
]
