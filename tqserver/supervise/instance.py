"""One worker instance: a child process in its own process group, its output, its stop."""

from __future__ import annotations

import enum
import os
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Callable

from twisted.internet import defer, error
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from tqserver.runtimes import HTTP_PROBE, Probe
from tqserver.supervise.cgroups import Cgroup
from tqserver.supervise.lifecycle import Stopper
from tqserver.supervise.proctree import Ident, ProcInfo, ProcTable
from tqserver.supervise.rotation import InFlight

log = Logger()

_SETSID = shutil.which("setsid")
# Fallback when util-linux's setsid(1) is missing: a tiny exec trampoline.
_TRAMPOLINE = [
    sys.executable,
    "-c",
    "import os,sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])",
]


def in_new_session(argv: list[str]) -> list[str]:
    """argv that runs ``argv`` as leader of a new session and process group, keeping the PID
    (setsid(1) execs in place when its caller is not already a group leader)."""
    if _SETSID:
        return [_SETSID] + list(argv)
    return _TRAMPOLINE + list(argv)


def signal_group(pid: int | None, sig: int) -> bool:
    """Signal the whole process group led by ``pid``; False when nothing is left of it."""
    if not pid:
        return False
    try:
        os.killpg(pid, sig)
        return True
    except ProcessLookupError:
        pass
    except PermissionError:
        return False
    try:
        # Just spawned: setsid(1) may not have made the group yet; signal the leader itself.
        os.kill(pid, sig)
        return True
    except OSError:
        return False


# Once the leader exited and its group and strays were killed, how long its pipes may take
# to bring the last output before they are closed (a stray we could not find may hold them).
PIPE_GRACE_SECONDS = 0.25

TAIL_LINES = 40  # the last lines of output an instance keeps (shown when it fails to start)


class LineSink:
    """Collects a child's output into whole lines, each prefixed, for a log writer; the
    last TAIL_LINES are kept too."""

    def __init__(self, prefix: bytes, write: Callable[[bytes], None]) -> None:
        self._prefix = prefix
        self._write = write
        self._partial: dict[int | str, bytes] = {}  # by descriptor ("side": FastCGI STDERR)
        self.tail: deque[bytes] = deque(maxlen=TAIL_LINES)

    def feed(self, fd: int | str, data: bytes) -> None:
        data = self._partial.pop(fd, b"") + data
        lines = data.split(b"\n")
        tail = lines.pop()
        if len(tail) > 65536:  # a runaway line without newline: flush it anyway
            lines.append(tail)
            tail = b""
        if tail:
            self._partial[fd] = tail
        if lines:
            self.tail.extend(line.rstrip(b"\r") for line in lines)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S").encode()
            self._write(
                b"".join(
                    b"%s %s %s\n" % (stamp, self._prefix, line.rstrip(b"\r")) for line in lines
                )
            )

    def flush(self) -> None:
        for fd in list(self._partial):
            self.feed(fd, b"\n")


class InstanceState(str, enum.Enum):
    """Where an instance is in its life. A ``str`` too, so it reads and logs as its value."""

    NEW = "new"
    STARTING = "starting"  # spawned, not yet healthy
    READY = "ready"  # answered its first probe: may serve
    DRAINING = "draining"  # out of rotation, its requests in flight finishing
    STOPPING = "stopping"  # signalled
    EXITED = "exited"

    def __str__(self) -> str:
        return self.value


class Instance(InFlight, ProcessProtocol):
    """A running copy of a worker. The pool owns it; the proxy counts requests on it."""

    def __init__(
        self,
        reactor,
        worker: str,
        instance_id: str,
        port: int,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        output: Callable[[bytes], None],
        on_exit: Callable[[Instance, Failure], None] | None = None,
        probe: Probe = HTTP_PROBE,
        files: Sequence[str] = (),
        stop_signal: int = signal.SIGTERM,
        procs: ProcTable | None = None,
        cgroup: Cgroup | None = None,
    ) -> None:
        self.reactor = reactor
        self.worker = worker
        self.id = instance_id
        self.port = port
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.on_exit = on_exit
        self.probe = probe
        self.stop_signal = stop_signal
        self.files = tuple(files)  # generated for this instance (a php-fpm config...)
        self.state = InstanceState.NEW
        self.inflight = 0
        self.inflight_elsewhere = 0  # in proxy processes (server.proxy_processes > 1)
        self.requests = 0
        self.health_failures = 0
        self.recycle_after = 0  # max_requests (with jitter); 0 = never
        self.on_request_limit: Callable[[Instance], None] | None = None
        self.on_request: Callable[[], None] | None = None  # autoscaling watches load
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.exit_code: int | None = None
        self.exit_signal: int | None = None
        self.stopping = False
        # Where its processes are found besides its process group: its cgroup (when the
        # machine gives us one), and every descendant seen while it ran (``track``), each
        # with its start time. Without ``procs`` (tests on fake processes) neither is used.
        self.procs = procs
        self.cgroup = cgroup
        self.family: dict[int, int] = {}  # pid -> start time
        self.leader_start: int | None = None
        self._sink = LineSink(b"[" + instance_id.encode() + b"]", output)
        self._ended: list[defer.Deferred] = []
        self._leader_exited = False
        self._kill_at: float | None = None  # when stopping must be over
        self._close_call = None
        self._stopper = Stopper(reactor, self._signal, f"instance {instance_id} of {worker}")
        self._idle_waiters: list[defer.Deferred] = []

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self.state = InstanceState.STARTING
        self.started_at = self.reactor.seconds()
        argv = in_new_session(self.argv)
        if self.cgroup is not None:
            argv = self.cgroup.enter(argv)
        self.reactor.spawnProcess(self, argv[0], argv, env=self.env, path=self.cwd)

    @property
    def pid(self) -> int | None:
        """The group leader's PID (kept after exit, so stragglers in the group can be found)."""
        return self._leader_pid

    @property
    def alive(self) -> bool:
        return self.state is not InstanceState.NEW and self.state is not InstanceState.EXITED

    def ended(self) -> defer.Deferred:
        """Fires (with self) once the process has exited."""
        if self.state is InstanceState.EXITED:
            return defer.succeed(self)
        d: defer.Deferred = defer.Deferred()
        self._ended.append(d)
        return d

    def stop(self, kill_timeout: float) -> defer.Deferred:
        """SIGTERM (or the runtime's graceful stop signal) to the process group, SIGKILL
        after ``kill_timeout`` seconds; fires on exit."""
        if self.state is InstanceState.EXITED:
            return defer.succeed(self)
        if not self.stopping:
            self.stopping = True
            self.state = InstanceState.STOPPING
            self._kill_at = self.reactor.seconds() + kill_timeout
            self.track()  # who is below it now, before the signal makes orphans of them
        self._stopper.stop(self.stop_signal, kill_timeout)
        return self.ended()

    def track(self, table: list[ProcInfo] | None = None) -> bool:
        """Note every process below the leader now (by parent links; ``table`` is one read
        of /proc shared by all instances), and forget noted ones that are gone. A process
        that left the group and whose parent exited is found this way only if it was seen
        before: the supervisor calls this periodically. True when the family changed."""
        if self.procs is None or self._leader_pid is None or self._leader_exited:
            return False
        if table is None:
            table = list(self.procs.all())
        alive = {p.pid: p.start for p in table if not p.zombie}
        family = {pid: start for pid, start in self.family.items() if alive.get(pid) == start}
        for p in self.procs.descendants(self._leader_pid, table):
            family[p.pid] = p.start
        changed = family != self.family
        self.family = family
        return changed

    def members(self) -> list[Ident]:
        return sorted(self.family.items())

    def _signal(self, sig: int) -> None:
        """The stop signal goes to the process group; SIGKILL goes to everything of it that
        can be found: the group, the cgroup, and every descendant noted while it ran (even
        one that made itself a new session), each only while its PID still names it."""
        signal_group(self._leader_pid, sig)
        if sig == signal.SIGKILL:
            self._kill_strays()

    def _kill_strays(self) -> None:
        if self.cgroup is not None:
            self.cgroup.kill()
        if self.procs is not None:
            for ident in self.members():
                self.procs.kill_if_same(ident)

    # -- request accounting (the proxy calls these) ----------------------------------
    def request_started(self) -> None:
        self.inflight += 1
        self.requests += 1
        if self.on_request is not None:
            self.on_request()

    def request_finished(self) -> None:
        self.inflight -= 1
        self._check_request_limit()
        if self.inflight == 0:
            self._wake_idle()

    def requests_elsewhere(self, finished: int, inflight: int) -> None:
        """What proxy processes report (server.proxy_processes > 1): requests they sent
        here since their last report, and how many are in flight now."""
        self.inflight_elsewhere = inflight
        if finished:
            self.requests += finished
            if self.on_request is not None:
                self.on_request()
            self._check_request_limit()

    def _check_request_limit(self) -> None:
        if (
            self.recycle_after
            and self.requests >= self.recycle_after
            and self.on_request_limit is not None
        ):
            callback, self.on_request_limit = self.on_request_limit, None  # once
            callback(self)

    def log_lines(self, data: bytes) -> None:
        """Whole lines of this instance's output that reached us another way than its pipes
        (FastCGI STDERR), into the same log."""
        self._sink.feed("side", data if data.endswith(b"\n") else data + b"\n")

    # -- ProcessProtocol -------------------------------------------------------------
    def childDataReceived(self, childFD: int, data: bytes) -> None:
        # Never raise here: Twisted would close that pipe, and a worker writing to it would
        # then fail (EPIPE) on every request, for good. The output is always drained.
        try:
            self._sink.feed(childFD, data)
        except Exception:
            log.failure("{id}: writing its output failed (output dropped)", id=self.id)

    def processExited(self, reason: Failure) -> None:
        """The leader exited (its pipes may still be open: a php-fpm master's pool
        children hold them). Everything it left is killed now, and the pipes are closed
        if they are not closed by then, so that the exit is noticed at once and a stop
        always ends."""
        self._note_exit(reason)
        self._leader_exited = True
        signal_group(self._leader_pid, signal.SIGKILL)
        self._kill_strays()
        delay = PIPE_GRACE_SECONDS
        if self._kill_at is not None:
            delay = max(0.0, min(delay, self._kill_at - self.reactor.seconds()))
        self._close_call = self.reactor.callLater(delay, self._close_pipes)

    def _close_pipes(self) -> None:
        self._close_call = None
        if self.state is not InstanceState.EXITED and self.transport is not None:
            log.info("{id}: its output pipes outlived it; closing them", id=self.id)
            self.transport.loseConnection()

    def _note_exit(self, reason: Failure) -> None:
        if isinstance(reason.value, (error.ProcessDone, error.ProcessTerminated)):
            self.exit_code = reason.value.exitCode
            self.exit_signal = reason.value.signal

    def processEnded(self, reason: Failure) -> None:
        self._sink.flush()
        self._note_exit(reason)
        if self._close_call is not None and self._close_call.active():
            self._close_call.cancel()
        self._close_call = None
        # The leader is gone; anything it left in its group goes with it.
        signal_group(self._leader_pid, signal.SIGKILL)
        self._kill_strays()
        self._stopper.ended()
        self._remove_cgroup()
        self.state = InstanceState.EXITED
        for path in self.files:
            try:
                os.unlink(path)
            except OSError:
                pass
        if self.on_exit is not None:
            self.on_exit(self, reason)
        waiters, self._ended = self._ended, []
        for d in waiters:
            d.callback(self)
        self._wake_idle()

    def _remove_cgroup(self, tries: int = 50) -> None:
        """Its cgroup goes once the processes killed in it are gone (a moment later)."""
        if self.cgroup is not None and not self.cgroup.remove() and tries:
            self.cgroup.kill()
            self.reactor.callLater(0.1, self._remove_cgroup, tries - 1)

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None  # connected
        self._leader_pid = transport.pid
        if self.procs is not None and transport.pid is not None:
            self.leader_start = self.procs.start_time(transport.pid)
        transport.closeStdin()

    _leader_pid: int | None = None

    def last_output(self) -> str:
        """The last lines the process wrote (stdout and stderr), e.g. a traceback."""
        return b"\n".join(self._sink.tail).decode("utf-8", "replace")

    def describe_exit(self) -> str:
        if self.exit_signal:
            try:
                name = signal.Signals(self.exit_signal).name
            except ValueError:
                name = str(self.exit_signal)
            return f"killed by {name}"
        return f"exited with status {self.exit_code}"
