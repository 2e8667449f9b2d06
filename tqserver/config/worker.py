"""A worker's config/worker.yaml."""

from __future__ import annotations

import re

import attrs

from tqserver.config.errors import ConfigWarning
from tqserver.config.fields import (
    ORDER_CHECKS,
    Position,
    _as_mapping,
    _bool,
    _choice,
    _enabled,
    _f,
    _float,
    _ini_map,
    _int,
    _load,
    _log_file,
    _optional,
    _positions,
    _size,
    _str,
    _str_list,
    _str_map,
    _sub,
    _url_path,
    _value_pos,
    _walk,
)

WORKER_TYPES = ("go", "python", "bun", "php", "kotlin", "command")


# ---------------------------------------------------------------------------
# worker.yaml


@attrs.frozen
class GoConfig:
    go_max_procs: int = _f(2, _int(0))
    go_mem_limit: str = _f("", _str(null_ok=True, numbers_ok=True))
    max_requests: int = _f(0, _int(0))
    build_flags: tuple[str, ...] = _f((), _str_list())


_APP_TARGET = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(\(\))?)?$")


def _app_target(value, ctx, key, pos):
    """python.app: "package.module:app" (or ":create_app()", a factory to call)."""
    value = _str(null_ok=True)(value, ctx, key, pos)
    if value and not _APP_TARGET.match(value):
        raise ctx.error(
            key,
            pos,
            f'expected "package.module:app" or "package.module:create_app()", got {value!r}',
        )
    return value


@attrs.frozen
class PythonConfig:
    entrypoint: str = _f("src/main.py", _str())
    # The application object to serve (WSGI or ASGI), instead of running a script.
    app: str = _f("", _app_target)
    # python3.12 | pypy3 | /path/to/python; "" = the supervisor's own interpreter.
    interpreter: str = _f("", _str(null_ok=True))


@attrs.frozen
class BunConfig:
    entrypoint: str = _f("index.ts", _str())
    env: dict[str, str] = _f({}, _str_map)


@attrs.frozen
class KotlinConfig:
    main_class: str = _f("", _str(null_ok=True))
    jvm_args: tuple[str, ...] = _f((), _str_list(numbers_ok=True))


@attrs.frozen
class PhpPoolConfig:
    manager: str = _f("dynamic", _choice("dynamic", "static", "ondemand"))
    min_workers: int = _f(1, _int(0))
    max_workers: int = _f(5, _int(1))
    start_workers: int = _f(2, _int(0))
    max_requests: int = _f(0, _int(0))
    request_timeout: int = _f(30, _int(0))
    idle_timeout: int = _f(10, _int(0))
    listen_address: str = _f("127.0.0.1", _str())


@attrs.frozen
class PhpConfig:
    binary: str = _f("", _str(null_ok=True))
    config_file: str = _f("", _str(null_ok=True))
    settings: dict[str, str] = _f({}, _ini_map)
    pool: PhpPoolConfig = _sub(PhpPoolConfig)


@attrs.frozen
class ScalingConfig:
    min_workers: int = _f(1, _int(1))
    max_workers: int = _f(1, _int(1))
    queue_threshold: int = _f(10, _int(1))
    scale_down_delay: float = _f(60.0, _float())


@attrs.frozen
class TimeoutsConfig:
    read_timeout_seconds: float = _f(30.0, _float())
    write_timeout_seconds: float = _f(30.0, _float())
    idle_timeout_seconds: float = _f(120.0, _float())


@attrs.frozen
class _LoggingConfig:
    """Only read to fill WorkerConfig.log_file; `logging.level` etc. are legacy."""

    log_file: str | None = _f("logs/worker_{name}_{date}.log", _log_file)


_MODES = {"dev": "development", "prod": "production"}


@attrs.frozen
class WorkerConfig:
    path: str | None = _f(None, _optional(_url_path))
    type: str | None = _f(None, _optional(_choice(*WORKER_TYPES)))
    enabled: bool | str = _f(True, _enabled)
    strip_prefix: bool = _f(True, _bool)
    # GET /route (no slash) -> 301 /route/, as nginx does for a prefix location (when the
    # prefix is stripped: the app would see "/" for both).
    trailing_slash_redirect: bool = _f(True, _bool)
    working_directory: str = _f("worker", _choice("worker", "project"))
    health_path: str = _f("/health", _url_path)
    env: dict[str, str] = _f({}, _str_map)
    max_requests: int = _f(0, _int(0))
    memory_limit: int = _f(0, _size)
    command: tuple[str, ...] = _f((), _str_list(numbers_ok=True))
    go: GoConfig = _sub(GoConfig)
    python: PythonConfig = _sub(PythonConfig)
    bun: BunConfig = _sub(BunConfig)
    kotlin: KotlinConfig = _sub(KotlinConfig)
    php: PhpConfig = _sub(PhpConfig)
    scaling: ScalingConfig = _sub(ScalingConfig)
    timeouts: TimeoutsConfig = _sub(TimeoutsConfig)
    log_file: str | None = _f("logs/worker_{name}_{date}.log", _log_file)
    source: str = attrs.field(default="")
    positions: dict[str, Position] = _positions()

    def enabled_in(self, mode: str) -> bool:
        """Whether this worker runs in mode "dev" or "prod" (long names accepted)."""
        if isinstance(self.enabled, bool):
            return self.enabled
        return _MODES.get(mode, mode) == self.enabled


# Keys of worker.yaml read outside the generic walk (aliases and seed-era names).
_GO_LEGACY_KEYS = ("go_max_procs", "go_mem_limit")
_WORKER_ALIAS_KEYS = ("go", "runtime", "logging") + _GO_LEGACY_KEYS


def load_worker_config(path: str) -> tuple[WorkerConfig, list[ConfigWarning]]:
    """Read a worker.yaml; `runtime:` and seed-era top-level go keys feed `go:`."""
    ctx, top = _load(path)
    values = _walk(WorkerConfig, top, ctx, "", ignore=_WORKER_ALIAS_KEYS)

    go = _walk(GoConfig, top, ctx, "", only=_GO_LEGACY_KEYS)
    for name in ("runtime", "go"):  # later wins: go: beats its alias
        node = _as_mapping(top.get(name), ctx, name, _value_pos(top, name))
        go.update(_walk(GoConfig, node, ctx, name + "."))
    values["go"] = GoConfig(**go)

    logging = _as_mapping(top.get("logging"), ctx, "logging", _value_pos(top, "logging"))
    values.update(_walk(_LoggingConfig, logging, ctx, "logging."))

    if values.get("type") == "command" and not values.get("command"):
        raise ctx.error(
            "type", ctx.positions["type"], "type command needs a non-empty 'command' list"
        )
    config = WorkerConfig(**values, source=path, positions=ctx.positions)
    return config, ctx.sorted_warnings()


def default_worker_config() -> WorkerConfig:
    return WorkerConfig()


ORDER_CHECKS[PhpPoolConfig] = [("min_workers", "max_workers"), ("start_workers", "max_workers")]
ORDER_CHECKS[ScalingConfig] = [("min_workers", "max_workers")]
