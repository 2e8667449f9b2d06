"""Finding workers under workers/ (README: "A project"): their names, routes and runtimes.

The tree is small, so this walks it synchronously with os.scandir.  A worker
with a broken config is reported, not fatal: every other worker still serves.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Iterable

import attrs

from tqserver.config.errors import ConfigError, ConfigWarning
from tqserver.config.worker import WorkerConfig, default_worker_config, load_worker_config

__all__ = [
    "CONFIG_FILE",
    "RESERVED_SUBDIRS",
    "Discovery",
    "WorkerSpec",
    "discover",
    "infer_type",
    "route_taken",
]

CONFIG_FILE = os.path.join("config", "worker.yaml")

# A worker's own subdirectories: never nested workers.
RESERVED_SUBDIRS = frozenset(
    ["src", "bin", "public", "views", "config", "data", "node_modules", "logs", "vendor"]
)

# Dependency trees: never searched, whoever owns them.
_NEVER_DESCEND = frozenset(["node_modules", "vendor", "__pycache__"])


@attrs.frozen
class WorkerSpec:
    name: str
    directory: str
    route: str
    type: str
    config: WorkerConfig
    config_file: str | None


@attrs.frozen
class Discovery:
    workers: tuple[WorkerSpec, ...] = ()
    disabled: tuple[str, ...] = ()
    errors: tuple[ConfigError, ...] = ()
    warnings: tuple[ConfigWarning, ...] = ()
    # Workers whose worker.yaml cannot be applied as it is now: invalid, its route taken,
    # or empty (a running worker keeps its last good configuration: see Supervisor).
    held: tuple[tuple[str, ConfigError], ...] = ()


def _exists(directory: str, *parts: str) -> bool:
    return os.path.isfile(os.path.join(directory, *parts))


def _any(directory: str, pattern: str) -> bool:
    return bool(glob.glob(os.path.join(glob.escape(directory), pattern)))


def _looked_for(config: WorkerConfig) -> str:
    return ", ".join(
        [
            "go.mod",
            "src/*.go",
            "src/*.kt",
            "build.gradle(.kts)",
            "pom.xml",
            "index.ts",
            "package.json",
            config.bun.entrypoint,
            config.python.entrypoint,
            "public/*.php",
        ]
    )


def infer_type(directory: str, config: WorkerConfig) -> str | None:
    """The runtime a directory's files imply; order settles dirs that match several."""
    if config.command:
        return "command"
    if _exists(directory, "go.mod") or _any(directory, "src/*.go"):
        return "go"
    if (
        _any(directory, "src/*.kt")
        or _exists(directory, "build.gradle")
        or _exists(directory, "build.gradle.kts")
        or _exists(directory, "pom.xml")
    ):
        return "kotlin"
    if (
        _exists(directory, "index.ts")
        or _exists(directory, "package.json")
        or _exists(directory, config.bun.entrypoint)
    ):
        return "bun"
    if config.python.app or _exists(directory, config.python.entrypoint):
        return "python"
    if _any(directory, "public/*.php"):
        return "php"
    return None


def _route(name: str, config: WorkerConfig) -> str:
    """config.path, else the directory path; a top-level "index" is the site root."""
    route = config.path if config.path is not None else ("/" if name == "index" else "/" + name)
    return route.rstrip("/") or "/"


class _Walk:
    """Accumulates what one discover() call finds."""

    def __init__(self, root: str, mode: str, ignore: tuple[str, ...]) -> None:
        self.root = root
        self.mode = mode
        self.ignore = ignore
        self.found: list[WorkerSpec] = []
        self.disabled: list[str] = []
        self.errors: list[ConfigError] = []
        self.held: dict[str, ConfigError] = {}
        self.warnings: list[ConfigWarning] = []
        self.seen: set[str] = set()

    def skip(self, entry: os.DirEntry, parent_is_worker: bool) -> bool:
        name = entry.name
        return (
            name.startswith(".")
            or name in _NEVER_DESCEND
            or (parent_is_worker and name in RESERVED_SUBDIRS)
            or any(fnmatch.fnmatch(name, pattern) for pattern in self.ignore)
        )

    def walk(self, directory: str) -> None:
        real = os.path.realpath(directory)
        if real in self.seen:  # symlink loop
            return
        self.seen.add(real)
        is_worker = directory != self.root and self.visit(directory)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if entry.is_dir() and not self.skip(entry, is_worker):
                self.walk(entry.path)

    def visit(self, directory: str) -> bool:
        """Record the worker at `directory`, if it is one; say whether it is."""
        name = os.path.relpath(directory, self.root).replace(os.sep, "/")
        path = os.path.join(directory, CONFIG_FILE)
        config_file: str | None = path
        if os.path.isfile(path):
            try:
                config, warnings = load_worker_config(path)
            except ConfigError as e:
                self.errors.append(e)
                self.held[name] = e
                return True
            self.warnings.extend(warnings)
            if _is_empty(path):
                # Found with every default, but a file emptied mid-save must not reset a
                # running worker: the Supervisor keeps its last good configuration.
                self.held[name] = ConfigError(
                    "the file is empty (truncated while being saved?); a running worker "
                    "keeps its last good configuration: write {} to use every default",
                    path,
                )
        else:
            config_file = None
            config = default_worker_config()
        kind = config.type or infer_type(directory, config)
        if kind is None and config_file is None:
            return False
        if not config.enabled_in(self.mode):
            self.disabled.append(name)
        elif kind is None:
            error = ConfigError(
                f"cannot tell the worker type: found none of {_looked_for(config)}; set 'type:'",
                config_file,
                key="type",
            )
            self.errors.append(error)
            self.held[name] = error
        else:
            self.found.append(
                WorkerSpec(name, directory, _route(name, config), kind, config, config_file)
            )
        return True


def _is_empty(path: str) -> bool:
    """Nothing but white space (a comment or {} is a choice: every default)."""
    try:
        with open(path, "rb") as f:
            return not f.read(4096).strip() and os.fstat(f.fileno()).st_size <= 4096
    except OSError:
        return False


def _dedupe_routes(
    found: list[WorkerSpec], errors: list[ConfigError], held: dict[str, ConfigError]
) -> list[WorkerSpec]:
    """Keep the first worker (by name) per route; the others are errors naming both."""
    owners: dict[str, WorkerSpec] = {}
    kept = []
    for spec in sorted(found, key=lambda s: s.name):
        owner = owners.get(spec.route)
        if owner is None:
            owners[spec.route] = spec
            kept.append(spec)
            continue
        error = route_taken(spec, owner.name)
        errors.append(error)
        held[spec.name] = error
    return kept


def route_taken(spec: WorkerSpec, owner: str) -> ConfigError:
    line, column = spec.config.positions.get("path", (None, None))
    return ConfigError(
        f"route {spec.route!r} of worker {spec.name!r} is already served by worker {owner!r}",
        spec.config_file or spec.directory,
        line,
        column,
        "path",
    )


def discover(workers_dir: str, mode: str, ignore: Iterable[str] = ()) -> Discovery:
    """Find the workers under workers_dir that run in `mode` ("dev" or "prod").

    `ignore` takes file_watcher.ignore-style glob patterns of directory names.
    """
    root = os.path.abspath(workers_dir)
    if not os.path.isdir(root):
        return Discovery(
            warnings=(ConfigWarning(root, None, None, None, "workers directory not found"),)
        )
    state = _Walk(root, mode, tuple(ignore))
    state.walk(root)
    workers = _dedupe_routes(state.found, state.errors, state.held)
    return Discovery(
        tuple(workers),
        tuple(sorted(state.disabled)),
        tuple(state.errors),
        tuple(state.warnings),
        tuple(sorted(state.held.items())),
    )
