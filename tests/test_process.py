"""Real child processes: own process group, output lines prefixed, group stopped whole,
SIGKILL after the timeout; and builds that fail, succeed or are cancelled."""
from __future__ import annotations

import os
import signal
import sys

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tqserver.runtimes import BuildStep
from tqserver.supervise.build import run_build
from tqserver.supervise.cgroups import CgroupParent
from tqserver.supervise.instance import Instance
from tqserver.supervise.proctree import ProcTable


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("condition not met in time")
        await task.deferLater(reactor, 0.02, lambda: None)


# A parent that starts a grandchild and prints its pid, then waits (optionally ignoring TERM).
FAMILY = r"""
import os, signal, subprocess, sys, time
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
print("grandchild", child.pid, flush=True)
print("partial line without newline", end="", flush=True)
time.sleep(60)
"""


class InstanceTests(unittest.TestCase):
    def spawn(self, mode: str):
        lines = []
        script = self.mktemp() + ".py"
        with open(script, "w") as f:
            f.write(FAMILY)
        inst = Instance(reactor, "w", "w#1", 0, [sys.executable, script, mode], dict(os.environ),
                        os.getcwd(), lines.append)
        inst.start()
        self.addCleanup(lambda: inst.stop(0.1) if inst.state != "exited" else None)
        return inst, lines

    @defer.inlineCallbacks
    def test_own_group_and_whole_tree_stopped(self):
        inst, lines = self.spawn("normal")
        yield defer.ensureDeferred(wait_for(lambda: b"grandchild" in b"".join(lines)))
        self.assertEqual(os.getpgid(inst.pid), inst.pid)
        self.assertNotEqual(os.getpgid(inst.pid), os.getpgid(0))
        grandchild = int(b"".join(lines).split(b"grandchild ")[1].split()[0])
        self.assertTrue(pid_alive(grandchild))
        yield inst.stop(5.0)
        self.assertEqual(inst.state, "exited")
        self.assertEqual(inst.exit_signal, signal.SIGTERM)
        yield defer.ensureDeferred(wait_for(lambda: not pid_alive(grandchild)))
        text = b"".join(lines)
        self.assertIn(b"[w#1] grandchild", text)
        self.assertIn(b"[w#1] partial line without newline\n", text)

    @defer.inlineCallbacks
    def test_sigkill_after_timeout(self):
        inst, lines = self.spawn("ignore")
        yield defer.ensureDeferred(wait_for(lambda: b"grandchild" in b"".join(lines)))
        started = reactor.seconds()
        yield inst.stop(0.3)
        self.assertGreaterEqual(reactor.seconds() - started, 0.25)
        self.assertEqual(inst.exit_signal, signal.SIGKILL)

    @defer.inlineCallbacks
    def test_unexpected_exit_reported(self):
        exits = []
        inst = Instance(reactor, "w", "w#2", 0, [sys.executable, "-c", "raise SystemExit(7)"],
                        dict(os.environ), os.getcwd(), lambda data: None,
                        on_exit=lambda i, reason: exits.append(i.exit_code))
        inst.start()
        yield inst.ended()
        self.assertEqual(exits, [7])
        self.assertEqual(inst.describe_exit(), "exited with status 7")


# A worker whose helper outlives it unless found: "session" starts a sleeper in a new
# session (setsid: out of the process group), still its child; "orphan" double-forks one
# (its parent exits at once, so no parent link is left to follow); "group" leaves a child
# in the group that holds the output pipes after the leader dies (a php-fpm pool's). Each
# prints the helper's pid; the helpers ignore SIGTERM.
STRAYS = r"""
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_DFL)
sleeper = [sys.executable, "-c",
           "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"]
how = sys.argv[1]
if how == "orphan":
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        child = subprocess.Popen(sleeper)
        os.write(w, str(child.pid).encode())
        os._exit(0)
    os.close(w)
    pid = int(os.read(r, 100))
    os.wait()
else:
    pid = subprocess.Popen(sleeper, start_new_session=how == "session").pid
print("helper", pid, flush=True)
time.sleep(120)
"""


class StrayTests(unittest.TestCase):
    """Stopping an instance finds and kills what it left outside its process group, and
    the leader's exit is noticed even while others hold its output pipes."""

    cgroup = False

    def spawn(self, how: str):
        lines = []
        script = self.mktemp() + ".py"
        with open(script, "w") as f:
            f.write(STRAYS)
        cgroup = None
        if self.cgroup:
            parent = CgroupParent.find()
            if parent is None:
                raise unittest.SkipTest("no writable cgroup v2 hierarchy here")
            self.addCleanup(parent.remove)
            cgroup = parent.create("w#1")
            # its cgroup goes too, once what was killed in it is gone
            self.addCleanup(lambda: defer.ensureDeferred(
                wait_for(lambda: not os.path.exists(cgroup.path))))
        inst = Instance(reactor, "w", "w#1", 0, [sys.executable, script, how], dict(os.environ),
                        os.getcwd(), lines.append, procs=ProcTable(), cgroup=cgroup)
        inst.start()
        self.addCleanup(lambda: inst.stop(0.1) if inst.state != "exited" else None)
        return inst, lines

    async def helper(self, lines) -> int:
        await wait_for(lambda: b"helper" in b"".join(lines))
        helper = int(b"".join(lines).split(b"helper ")[1].split()[0])
        self.addCleanup(lambda: pid_alive(helper) and os.kill(helper, signal.SIGKILL))
        self.assertTrue(pid_alive(helper))
        return helper

    @defer.inlineCallbacks
    def test_new_session_child_killed_on_stop(self):
        inst, lines = self.spawn("session")
        helper = yield defer.ensureDeferred(self.helper(lines))
        self.assertNotEqual(os.getpgid(helper), inst.pid)
        yield inst.stop(1.0)   # the leader goes on SIGTERM; the helper only with SIGKILL
        self.assertEqual(inst.state, "exited")
        yield defer.ensureDeferred(wait_for(lambda: not pid_alive(helper)))

    @defer.inlineCallbacks
    def test_group_child_holding_the_pipes_after_kill_9(self):
        exits = []
        inst, lines = self.spawn("group")
        inst.on_exit = lambda i, reason: exits.append(i.exit_signal)
        helper = yield defer.ensureDeferred(self.helper(lines))
        os.kill(inst.pid, signal.SIGKILL)   # not through stop(): a crash
        yield inst.ended()
        self.assertEqual(exits, [signal.SIGKILL])
        yield defer.ensureDeferred(wait_for(lambda: not pid_alive(helper)))


class CgroupStrayTests(StrayTests):
    cgroup = True

    @defer.inlineCallbacks
    def test_double_forked_orphan_killed_on_stop(self):
        inst, lines = self.spawn("orphan")
        helper = yield defer.ensureDeferred(self.helper(lines))
        self.assertIn(helper, inst.cgroup.pids())
        yield inst.stop(1.0)
        yield defer.ensureDeferred(wait_for(lambda: not pid_alive(helper)))
        yield defer.ensureDeferred(wait_for(lambda: not os.path.exists(inst.cgroup.path)))


class BuildTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_success_keeps_output(self):
        steps = [BuildStep([sys.executable, "-c", "print('compiling')"], os.getcwd())]
        result = yield run_build(reactor, steps)
        self.assertTrue(result.ok)
        self.assertIn("compiling", result.output)

    @defer.inlineCallbacks
    def test_failure_stops_at_failing_step(self):
        steps = [BuildStep([sys.executable, "-c", "import sys; print('main.go:3: oops'); sys.exit(2)"],
                           os.getcwd()),
                 BuildStep([sys.executable, "-c", "print('never')"], os.getcwd())]
        result = yield run_build(reactor, steps)
        self.assertFalse(result.ok)
        self.assertIn("main.go:3: oops", result.output)
        self.assertIn("exit status 2", result.output)
        self.assertNotIn("never", result.output)

    @defer.inlineCallbacks
    def test_missing_program(self):
        result = yield run_build(reactor, [BuildStep(["/nonexistent/compiler"], os.getcwd())])
        self.assertFalse(result.ok)

    @defer.inlineCallbacks
    def test_cancel_kills_the_build(self):
        from twisted.internet import process as twisted_process
        marker = self.mktemp()
        script = ("import os, time\n"
                  f"with open({marker!r}, 'w') as f: f.write(str(os.getpid()))\n"
                  "time.sleep(30)\n")
        steps = [BuildStep([sys.executable, "-c", script], os.getcwd())]
        d = run_build(reactor, steps)
        self.addCleanup(lambda: d.called or d.cancel())
        yield defer.ensureDeferred(wait_for(lambda: os.path.exists(marker)
                                            and os.path.getsize(marker) > 0))
        with open(marker) as f:
            pid = int(f.read())
        d.cancel()
        with self.assertRaises(defer.CancelledError):
            yield d
        yield defer.ensureDeferred(wait_for(lambda: not pid_alive(pid)))
        yield defer.ensureDeferred(wait_for(lambda: not twisted_process.reapProcessHandlers and not any(
            isinstance(r, twisted_process.ProcessReader) for r in reactor.getReaders())))
