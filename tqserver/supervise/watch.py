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
from twisted.python.failure import Failure

from tqserver.signals import SignalService
from tqserver.supervise.fingerprint import NOT_SOURCE_DIRS

try:
    from twisted.internet import inotify

    from tqserver.supervise.inotify import TreeNotifier
except ImportError:  # not Linux
    inotify = None  # type: ignore[assignment]  # DevWatcher says it cannot watch

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
    server_config | discover (or hangup, a SIGHUP); ``worker`` names the worker for the
    first four."""

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
    if head in NOT_SOURCE_DIRS or head == "config" or any(p in NEVER_WATCHED for p in inner):
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


# A stream of changes that never pauses (a tool rewriting files in a loop, a HUP sent
# every few milliseconds) is still handed over this long after its first change.
MAX_WAIT_SECONDS = 1.0


class Debouncer:
    """Collects changes and hands them over once none arrived for ``delay`` seconds, so an
    editor's burst of events (temp file, rename, chmod) becomes one batch; but never
    later than MAX_WAIT_SECONDS (or ``delay``, if longer) after the first."""

    def __init__(
        self, clock, delay: Callable[[], float], flush: Callable[[set[Change]], None]
    ) -> None:
        self.clock = clock
        self.delay = delay
        self.flush = flush
        self.pending: set[Change] = set()
        self._call = None
        self._first = 0.0  # when the pending batch began

    def add(self, change: Change) -> None:
        self.pending.add(change)
        delay = self.delay()
        if self._call is not None and self._call.active():
            deadline = self._first + max(MAX_WAIT_SECONDS, delay)
            self._call.reset(max(0.0, min(delay, deadline - self.clock.seconds())))
        else:
            self._first = self.clock.seconds()
            self._call = self.clock.callLater(delay, self._fire)

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


# Directories never descended into, wherever they are: dependency trees, caches, VCS.
NEVER_WATCHED = frozenset(["node_modules", ".venv", "__pycache__", ".git"])
RECOVERY_MIN_SECONDS = 0.5  # a failed watcher is restarted after this, doubling...
RECOVERY_MAX_SECONDS = 30.0  # ...up to this


def _is_worker_dir(path: str, worker_dirs: dict[str, str]) -> bool:
    """A known worker's directory, or one that looks like a worker (not discovered yet)."""
    from tqserver.config.discovery import CONFIG_FILE, infer_type
    from tqserver.config.worker import default_worker_config

    if path in worker_dirs.values():
        return True
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return True
    return infer_type(path, default_worker_config()) is not None


def watched_dir(
    path: str, workers_dir: str, worker_dirs: dict[str, str], ignore: Iterable[str] = ()
) -> bool:
    """Whether the directory ``path`` is watched: not a dependency tree (node_modules,
    .venv), a hidden or ignored directory, nor a worker's build output, logs or data."""
    rel = os.path.relpath(path, workers_dir)
    if rel == ".":
        return True
    if rel.startswith(".."):
        return False
    parts = rel.split(os.sep)
    name = parts[-1]
    if name.startswith(".") or name in NEVER_WATCHED:
        return False
    if _ignored(parts, tuple(ignore) + EDITOR_NOISE):
        return False
    return not (name in NOT_SOURCE_DIRS and _is_worker_dir(os.path.dirname(path), worker_dirs))


class DevWatcher(Service):
    """inotify on workers/ (recursively, new directories included, dependency trees and
    build output never) and on the directory of server.yaml; changes are classified,
    debounced and passed to ``apply``.

    A directory that cannot be watched is logged and skipped. If the watcher itself fails
    (its handling raised, the kernel's event queue overflowed, the inotify descriptor
    broke) it says so in the log and in ``describe()`` (/health, status page), starts over
    on a fresh inotify descriptor, and reloads what changed meanwhile (``rescan``)."""

    name = "watcher"  # type: ignore[assignment]  # Twisted types Service.name as None
    MASK = 0
    if inotify is not None:
        MASK = (
            inotify.IN_CLOSE_WRITE
            | inotify.IN_MOVED_TO
            | inotify.IN_MOVED_FROM
            | inotify.IN_CREATE
            | inotify.IN_DELETE
            | inotify.IN_ATTRIB
        )

    def __init__(
        self,
        reactor,
        supervisor,
        apply: Callable[[set[Change]], None],
        rescan: Callable[[str], object] | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock = reactor  # timers (tests put a Clock here and on the debouncer)
        self.supervisor = supervisor
        self.debouncer = Debouncer(reactor, self._delay, apply)
        self.rescan = rescan  # None: supervisor.reload
        self._notifier: TreeNotifier | None = None
        self.problem: str | None = None  # why the watcher is not watching right now
        self.failures = 0
        self.last_failure: str | None = None
        self.unwatched: dict[str, str] = {}  # directory -> why it could not be watched
        self._recovery = None
        self._delay_next = RECOVERY_MIN_SECONDS

    def _delay(self) -> float:
        return self.supervisor.config.file_watcher.debounce_ms / 1000.0

    def describe(self) -> dict:
        """The watcher's state for /health and the status page."""
        if inotify is None:
            status = "unavailable"
        elif self.problem is not None:
            status = "failed"
        else:
            status = "watching" if self.running else "stopped"
        return {
            "status": status,
            "error": self.problem,
            "failures": self.failures,
            "last_failure": self.last_failure,
            "unwatched": sorted(self.unwatched)[:20],
        }

    def startService(self) -> None:
        Service.startService(self)
        if inotify is None:
            log.warn(
                "inotify is not available here: dev mode will not see file changes "
                "(use kill -HUP to reload)"
            )
            return
        self._start_notifier()
        log.info(
            "watching {workers} and {etc} for changes",
            workers=self.supervisor.workers_dir,
            etc=os.path.dirname(self.supervisor.config_path),
        )

    def stopService(self):
        Service.stopService(self)
        self.debouncer.cancel()
        if self._recovery is not None and self._recovery.active():
            self._recovery.cancel()
        self._recovery = None
        self._close_notifier()

    # -- the inotify descriptor --------------------------------------------------------
    def _start_notifier(self) -> None:
        notifier = TreeNotifier(self.reactor, self._lost, self._overflowed)
        self._notifier = notifier
        notifier.startReading()
        workers_dir = self.supervisor.workers_dir
        os.makedirs(workers_dir, exist_ok=True)
        self.unwatched = {}
        self.watch_tree(workers_dir)
        etc = os.path.dirname(self.supervisor.config_path)
        if os.path.isdir(etc):
            self._add(etc)

    def _close_notifier(self) -> None:
        notifier, self._notifier = self._notifier, None
        if notifier is not None:
            notifier.closing = True
            notifier.loseConnection()

    def watched(self) -> list[str]:
        """The directories watched now (for tests and diagnostics)."""
        if self._notifier is None:
            return []
        return [os.fsdecode(p) for p in self._notifier.watched_paths()]

    def _worker_dirs(self) -> dict[str, str]:
        return {name: pool.spec.directory for name, pool in self.supervisor.pools.items()}

    def _watched_dir(self, path: str) -> bool:
        sup = self.supervisor
        return watched_dir(
            path, sup.workers_dir, self._worker_dirs(), sup.config.file_watcher.ignore
        )

    def watch_tree(self, top: str) -> None:
        """Watch ``top`` and every directory under it worth watching."""
        stack = [top]
        while stack:
            directory = stack.pop()
            if not self._add(directory):
                continue
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue  # gone already: its parent's watch reports that
            for entry in entries:
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if is_dir and self._watched_dir(entry.path):
                    stack.append(entry.path)

    def _add(self, directory: str) -> bool:
        notifier = self._notifier
        if notifier is None:
            return False
        try:
            notifier.add(os.fsencode(directory), self.MASK, [self._event])
        except (inotify.INotifyError, OSError) as e:
            if not os.path.isdir(directory):
                return False  # it went away before we got to it: nothing to watch
            self.unwatched[directory] = str(e)
            log.warn(
                "cannot watch {path} ({error}); changes under it are not seen "
                "(is fs.inotify.max_user_watches too low?)",
                path=directory,
                error=e,
            )
            return False
        self.unwatched.pop(directory, None)
        return True

    # -- events --------------------------------------------------------------------------
    def _event(self, _watch, path: filepath.FilePath, mask: int) -> None:
        try:
            self._handle(os.fsdecode(path.path), mask)
        except Exception:
            self._failed("handling a file event failed", Failure())

    def _handle(self, path: str, mask: int) -> None:
        sup = self.supervisor
        if mask & inotify.IN_ISDIR:
            if mask & (inotify.IN_CREATE | inotify.IN_MOVED_TO):
                if self._watched_dir(path):
                    # Next turn: a burst of creations is read first; what was made inside
                    # before the watch existed is caught by the walk.
                    self.reactor.callLater(0, self.watch_tree, path)
            elif mask & inotify.IN_MOVED_FROM and self._notifier is not None:
                self._notifier.forget_under(os.fsencode(path))
        change = classify(
            path,
            sup.workers_dir,
            sup.config_path,
            self._worker_dirs(),
            sup.config.file_watcher.ignore,
        )
        if change is not None:
            self.debouncer.add(change)

    # -- failures and recovery -------------------------------------------------------------
    def _overflowed(self) -> None:
        self._failed("the kernel's inotify event queue overflowed: changes were lost")

    def _lost(self, reason) -> None:
        self._failed("the inotify descriptor stopped working", reason)

    def _failed(self, what: str, failure: Failure | None = None) -> None:
        self.failures += 1
        detail = what if failure is None else f"{what}: {failure.getErrorMessage()}"
        self.problem = self.last_failure = detail
        if failure is not None:
            log.failure("file watcher failed: {what}", failure, what=what)
        log.error(
            "FILE WATCHER FAILED ({detail}); restarting it in {delay:.1f}s, then reloading what "
            "changed",
            detail=detail,
            delay=self._delay_next,
        )
        if self._recovery is None and self.running:
            self._recovery = self.clock.callLater(self._delay_next, self._recover)
            self._delay_next = min(RECOVERY_MAX_SECONDS, self._delay_next * 2)

    def _recover(self) -> None:
        self._recovery = None
        if not self.running:
            return
        self._close_notifier()
        try:
            self._start_notifier()
        except Exception:
            self._failed("restarting the file watcher failed", Failure())
            return
        self.problem = None
        log.info("file watcher restarted: reloading what changed while it was down")
        (self.rescan or self.supervisor.reload)("file watcher recovered")
        # Reset the backoff once it has stayed up a while.
        self.clock.callLater(RECOVERY_MAX_SECONDS, self._steady)

    def _steady(self) -> None:
        if self.problem is None:
            self._delay_next = RECOVERY_MIN_SECONDS


class HangupReload(SignalService):
    """SIGHUP → ``reload("SIGHUP")``, debounced like file events: a burst of signals (a
    deploy script's retries, a HUP per host in a loop) is one reload once none arrived
    for ``delay()`` seconds. Signals arriving while a reload runs are not lost: the pools
    queue the deploys they cause, and join a build already building the same files."""

    name = "hangup"  # type: ignore[assignment]  # Twisted types Service.name as None
    signum = signal.SIGHUP

    def __init__(
        self, reactor, reload: Callable[[str], object], delay: Callable[[], float]
    ) -> None:
        super().__init__(reactor)
        self.reload = reload
        self._count = 0
        self._debouncer = Debouncer(reactor, delay, self._fire)

    def received(self) -> None:
        self._count += 1
        self._debouncer.add(Change("hangup"))

    def _fire(self, _changes: set[Change]) -> None:
        count, self._count = self._count, 0
        self.reload("SIGHUP" if count == 1 else f"SIGHUP x{count}")

    def stopService(self):
        self._debouncer.cancel()
        self._count = 0
        return super().stopService()
