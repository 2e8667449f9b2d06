"""Where reloads come from: file changes in dev mode (inotify, debounced, classified) and
SIGHUP in both modes. Each ends as a call on the Supervisor."""

from __future__ import annotations

import fnmatch
import os
import signal
from collections.abc import Iterable
from typing import Callable

import attrs
from twisted.application.service import Service
from twisted.logger import Logger
from twisted.python import filepath

from tqserver.supervise.fingerprint import NOT_SOURCE_DIRS

try:
    from twisted.internet import inotify
except ImportError:  # not Linux
    inotify = None

log = Logger()

# Files editors write next to the real one and remove again: never a change by themselves.
EDITOR_NOISE = (
    "4913",
    "*.swp",
    "*.swx",
    "*.swo",
    "*~",
    ".#*",
    "#*#",
    "*.tmp",
    ".goutputstream-*",
    "*.kate-swp",
    "___jb_tmp___",
    "___jb_old___",
)


@attrs.frozen
class Change:
    """What a file event means: ``kind`` is source | config | public | views |
    server_config | discover; ``worker`` names the worker for the first four."""

    kind: str
    worker: str | None = None


def _ignored(parts: Iterable[str], patterns: Iterable[str]) -> bool:
    patterns = tuple(patterns)
    return any(fnmatch.fnmatchcase(part, pattern) for part in parts for pattern in patterns)


def classify(
    path: str,
    workers_dir: str,
    server_config: str,
    worker_dirs: dict[str, str],
    ignore: Iterable[str] = (),
) -> Change | None:
    """The meaning of a change at ``path`` (absolute), or None when it means nothing.
    ``worker_dirs`` maps worker names to their directories."""
    if os.path.abspath(path) == os.path.abspath(server_config):
        return Change("server_config")
    rel = os.path.relpath(path, workers_dir)
    if rel.startswith(".."):
        return None
    parts = [] if rel == "." else rel.split(os.sep)
    if _ignored(parts, tuple(ignore) + EDITOR_NOISE):
        return None
    owner, inner = _owner(path, worker_dirs)
    if owner is None:
        return Change("discover")  # maybe a new worker directory
    if not inner:
        return Change("discover")  # the worker directory itself came or went
    head = inner[0]
    if inner == ["config", "worker.yaml"]:
        return Change("config", owner)
    if head in NOT_SOURCE_DIRS or head == "config":
        return None
    if head == "public":
        return Change("public", owner)
    if head == "views":
        return Change("views", owner)
    return Change("source", owner)


def _owner(path: str, worker_dirs: dict[str, str]) -> tuple[str | None, list[str]]:
    """The deepest worker whose directory holds ``path``, and the path inside it."""
    best: str | None = None
    best_dir = ""
    for name, directory in worker_dirs.items():
        if (path == directory or path.startswith(directory + os.sep)) and len(directory) > len(
            best_dir
        ):
            best, best_dir = name, directory
    if best is None:
        return None, []
    rel = os.path.relpath(path, best_dir)
    return best, ([] if rel == "." else rel.split(os.sep))


class Debouncer:
    """Collects changes and hands them over once none arrived for ``delay`` seconds, so an
    editor's burst of events (temp file, rename, chmod) becomes one batch."""

    def __init__(
        self, clock, delay: Callable[[], float], flush: Callable[[set[Change]], None]
    ) -> None:
        self.clock = clock
        self.delay = delay
        self.flush = flush
        self.pending: set[Change] = set()
        self._call = None

    def add(self, change: Change) -> None:
        self.pending.add(change)
        if self._call is not None and self._call.active():
            self._call.reset(self.delay())
        else:
            self._call = self.clock.callLater(self.delay(), self._fire)

    def _fire(self) -> None:
        self._call = None
        batch, self.pending = self.pending, set()
        if batch:
            self.flush(batch)

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self.pending = set()


if inotify is not None:

    class TreeINotify(inotify.INotify):
        """Twisted's INotify closes itself as soon as any watched directory is deleted
        (IN_DELETE_SELF, which the kernel always sends). A watched tree whose directories
        come and go must keep going: only an explicit loseConnection() closes it."""

        _reading = False

        def _doRead(self, in_):
            self._reading = True
            try:
                inotify.INotify._doRead(self, in_)
            finally:
                self._reading = False

        def loseConnection(self):
            if not self._reading:
                inotify.INotify.loseConnection(self)


class DevWatcher(Service):
    """inotify on workers/ (recursively, new directories included) and on the directory of
    server.yaml; changes are classified, debounced and passed to ``apply``."""

    def __init__(self, reactor, supervisor, apply: Callable[[set[Change]], None]) -> None:
        self.reactor = reactor
        self.supervisor = supervisor
        self.debouncer = Debouncer(reactor, self._delay, apply)
        self._notifier = None

    def _delay(self) -> float:
        return self.supervisor.config.file_watcher.debounce_ms / 1000.0

    def startService(self) -> None:
        Service.startService(self)
        if inotify is None:
            log.warn(
                "inotify is not available here: dev mode will not see file changes "
                "(use kill -HUP to reload)"
            )
            return
        notifier = TreeINotify(self.reactor)
        notifier.startReading()
        self._notifier = notifier
        mask = (
            inotify.IN_CLOSE_WRITE
            | inotify.IN_MOVED_TO
            | inotify.IN_MOVED_FROM
            | inotify.IN_CREATE
            | inotify.IN_DELETE
            | inotify.IN_ATTRIB
        )
        workers_dir = self.supervisor.workers_dir
        os.makedirs(workers_dir, exist_ok=True)
        notifier.watch(
            filepath.FilePath(workers_dir),
            mask=mask,
            autoAdd=True,
            recursive=True,
            callbacks=[self._event],
        )
        etc = os.path.dirname(self.supervisor.config_path)
        if os.path.isdir(etc):
            notifier.watch(filepath.FilePath(etc), mask=mask, callbacks=[self._event])
        log.info("watching {workers} and {etc} for changes", workers=workers_dir, etc=etc)

    def stopService(self):
        Service.stopService(self)
        self.debouncer.cancel()
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None

    def _event(self, _watch, path: filepath.FilePath, mask: int) -> None:
        sup = self.supervisor
        worker_dirs = {name: pool.spec.directory for name, pool in sup.pools.items()}
        change = classify(
            os.fsdecode(path.path),
            sup.workers_dir,
            sup.config_path,
            worker_dirs,
            sup.config.file_watcher.ignore,
        )
        if change is not None:
            self.debouncer.add(change)


class HangupReload(Service):
    """SIGHUP → ``reload("SIGHUP")`` on the reactor thread. Signals arriving while a
    reload runs are not lost: the pools queue and coalesce the deploys they cause."""

    def __init__(self, reactor, reload: Callable[[str], None]) -> None:
        self.reactor = reactor
        self.reload = reload
        self._previous = None

    def startService(self) -> None:
        Service.startService(self)
        self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self):
        Service.stopService(self)
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _on_signal(self, signum, frame) -> None:
        self.reactor.callFromThread(self.reload, "SIGHUP")
