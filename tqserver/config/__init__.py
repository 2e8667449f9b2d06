"""What a project declares: etc/server.yaml, each worker's config/worker.yaml, and the
workers found under workers/. Everything is loaded into frozen attrs classes; every error
names file:line:column and the dotted key."""

from __future__ import annotations

from tqserver.config.errors import ConfigError, ConfigWarning
from tqserver.config.fields import parse_size
from tqserver.config.server import (
    AdminSection,
    FileWatcherSection,
    HealthSection,
    MetricsSection,
    ServerConfig,
    ServerSection,
    WorkersSection,
    default_server_config,
    load_server_config,
)
from tqserver.config.worker import (
    WORKER_TYPES,
    BunConfig,
    GoConfig,
    KotlinConfig,
    PhpConfig,
    PhpPoolConfig,
    PythonConfig,
    ScalingConfig,
    TimeoutsConfig,
    WorkerConfig,
    default_worker_config,
    load_worker_config,
)

__all__ = [
    "WORKER_TYPES",
    "AdminSection",
    "BunConfig",
    "ConfigError",
    "ConfigWarning",
    "FileWatcherSection",
    "GoConfig",
    "HealthSection",
    "KotlinConfig",
    "MetricsSection",
    "PhpConfig",
    "PhpPoolConfig",
    "PythonConfig",
    "ScalingConfig",
    "ServerConfig",
    "ServerSection",
    "TimeoutsConfig",
    "WorkerConfig",
    "WorkersSection",
    "default_server_config",
    "default_worker_config",
    "load_server_config",
    "load_worker_config",
    "parse_size",
]
