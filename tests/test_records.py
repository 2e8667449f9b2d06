"""Leftovers of a supervisor killed with -9, identified from run/instances/ records: the
leader by PID and start time, its group, the descendants seen while it ran; never a
process whose PID was handed out again. On a fake process table (and a real /proc parser
check)."""

from __future__ import annotations

import os
import signal

import attrs
from twisted.trial import unittest

from tqserver.supervise import proctree
from tqserver.supervise.proctree import ProcInfo, ProcTable, parse_stat
from tqserver.supervise.records import InstanceRecords


@attrs.define
class FakeProc:
    info: ProcInfo
    cmdline: str = ""
    cwd: str = "/"
    environ: dict[str, str] = attrs.Factory(dict)


class FakeProcTable(ProcTable):
    """A process table the test writes; kills remove processes (and are recorded)."""

    def __init__(self) -> None:
        self.procs: dict[int, FakeProc] = {}
        self.killed: list[tuple[str, int]] = []

    def add(self, pid, ppid=1, pgid=None, start=100, cmdline="", cwd="/", environ=None):
        self.procs[pid] = FakeProc(
            ProcInfo(pid, ppid, pid if pgid is None else pgid, start),
            cmdline,
            cwd,
            dict(environ or {}),
        )

    def info(self, pid: int) -> ProcInfo | None:
        p = self.procs.get(pid)
        return None if p is None else p.info

    def all(self):
        return iter([p.info for p in self.procs.values()])

    def cmdline(self, pid):
        p = self.procs.get(pid)
        return None if p is None else p.cmdline

    def cwd(self, pid):
        p = self.procs.get(pid)
        return None if p is None else p.cwd

    def environ(self, pid):
        p = self.procs.get(pid)
        return {} if p is None else p.environ

    def kill(self, pid, sig):
        if pid not in self.procs:
            return False
        self.killed.append(("pid", pid))
        if sig == signal.SIGKILL:
            del self.procs[pid]
        return True

    def killpg(self, pgid, sig):
        members = [pid for pid, p in self.procs.items() if p.info.pgid == pgid]
        if not members:
            return False
        self.killed.append(("group", pgid))
        for pid in members:
            del self.procs[pid]
        return True


@attrs.define
class FakeInstance:
    """What InstanceRecords.record reads of an Instance."""

    id: str
    pid: int
    leader_start: int
    cwd: str
    argv: list[str]
    family: dict[int, int] = attrs.Factory(dict)
    cgroup: object = None

    def members(self):
        return sorted(self.family.items())


ROOT = "/srv/site"


class RecordsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.procs = FakeProcTable()
        self.run = self.mktemp()
        self.records = InstanceRecords(self.run, ROOT, self.procs)
        self.patch(self.records, "_boot", "boot-1")

    def php_master(self, family=True) -> FakeInstance:
        """A php-fpm master (pid 500) with two pool children; its environ is gone."""
        self.procs.add(
            500,
            start=1000,
            cmdline="php-fpm: master process (/srv/site/run/php/t.conf)",
            cwd="/srv/site/workers/blog",
        )
        self.procs.add(
            501,
            ppid=500,
            pgid=500,
            start=1001,
            cmdline="php-fpm: pool www",
            cwd="/srv/site/workers/blog",
        )
        self.procs.add(
            502,
            ppid=500,
            pgid=500,
            start=1002,
            cmdline="php-fpm: pool www",
            cwd="/srv/site/workers/blog",
        )
        inst = FakeInstance(
            "blog#1",
            500,
            1000,
            "/srv/site/workers/blog",
            ["php-fpm", "-F", "-y", "/srv/site/run/php/t.conf"],
        )
        if family:
            inst.family = {501: 1001, 502: 1002}
        return inst

    def restart(self) -> InstanceRecords:
        """The next supervisor of the same root, after a kill -9 of this one."""
        records = InstanceRecords(self.run, ROOT, self.procs)
        self.patch(records, "_boot", "boot-1")
        return records

    def test_php_fpm_whose_environ_is_rewritten_is_stopped(self):
        self.records.record(self.php_master())
        self.assertEqual(self.restart().reap(), 1)
        self.assertEqual(self.procs.procs, {})

    def test_group_members_started_after_the_last_look(self):
        inst = self.php_master(family=False)
        self.records.record(inst)
        del self.procs.procs[500]  # the master died with the supervisor; its pool serves on
        self.procs.add(
            999, ppid=1, pgid=77, start=1500, cwd="/srv/site/workers/blog"
        )  # other group
        self.assertEqual(self.restart().reap(), 1)
        self.assertEqual(sorted(self.procs.procs), [999])

    def test_a_reused_pid_is_left_alone(self):
        self.records.record(self.php_master())
        self.procs.procs.clear()
        # All gone; the kernel gave 500 and 501 to unrelated processes since (later starts).
        self.procs.add(500, start=5000, cmdline="postgres", cwd="/var/lib/postgresql")
        self.procs.add(
            501,
            ppid=500,
            pgid=500,
            start=5001,
            cmdline="postgres: writer",
            cwd="/srv/site/workers/blog",
        )
        self.assertEqual(self.restart().reap(), 0)
        self.assertEqual(self.procs.killed, [])
        self.assertEqual(sorted(self.procs.procs), [500, 501])
        self.assertEqual(os.listdir(os.path.join(self.run, "instances")), [])

    def test_a_group_of_a_reused_pid_whose_leader_died_is_left_alone(self):
        self.records.record(self.php_master(family=False))
        self.procs.procs.clear()
        # 500 went to another program that made a group and exited; its child lives on.
        self.procs.add(610, ppid=1, pgid=500, start=6000, cmdline="backup-job", cwd="/root")
        self.assertEqual(self.restart().reap(), 0)
        self.assertEqual(sorted(self.procs.procs), [610])

    def test_a_stray_outside_the_group_seen_while_running(self):
        # A Go worker that started a helper in a new session (setsid), its parent gone now.
        self.procs.add(700, start=2000, cmdline="bin/app", cwd="/srv/site/workers/hello")
        self.procs.add(701, ppid=1, pgid=701, start=2100, cmdline="sleep 600", cwd="/")
        inst = FakeInstance(
            "hello#1", 700, 2000, "/srv/site/workers/hello", ["bin/app"], family={701: 2100}
        )
        self.records.record(inst)
        self.assertEqual(self.restart().reap(), 1)
        self.assertEqual(self.procs.procs, {})

    def test_another_roots_or_another_boots_records_are_ignored(self):
        self.records.record(self.php_master())
        other = InstanceRecords(self.run, "/srv/other", self.procs)
        self.patch(other, "_boot", "boot-1")
        self.assertEqual(other.reap(), 0)
        self.records.record(self.php_master())
        rebooted = InstanceRecords(self.run, ROOT, self.procs)
        self.patch(rebooted, "_boot", "boot-2")
        self.assertEqual(rebooted.reap(), 0)
        self.assertEqual(self.procs.killed, [])

    def test_unreadable_and_old_records_are_dropped(self):
        d = os.path.join(self.run, "instances")
        os.makedirs(d)
        for name, text in (("123", "app#1\n"), ("124", "{"), ("125", "[1]")):
            with open(os.path.join(d, name), "w") as f:
                f.write(text)
        self.assertEqual(self.restart().reap(), 0)
        self.assertEqual(os.listdir(d), [])

    def test_forget(self):
        inst = self.php_master()
        self.records.record(inst)
        self.records.forget(inst)
        self.assertEqual(self.restart().reap(), 0)
        self.assertIn(500, self.procs.procs)


class ProcTableTests(unittest.TestCase):
    def test_stat_with_parentheses_in_the_name(self):
        text = "42 (a) b (c)) S 7 42 42 0 -1 4194560 " + " ".join(["0"] * 12) + " 12345 0 0"
        info = parse_stat(42, text)
        self.assertEqual((info.ppid, info.pgid, info.start, info.zombie), (7, 42, 12345, False))

    def test_this_process_and_its_parent(self):
        procs = ProcTable()
        me = procs.info(os.getpid())
        self.assertEqual(me.ppid, os.getppid())
        self.assertTrue(procs.is_same(me.ident))
        self.assertFalse(procs.is_same((me.pid, me.start + 1)))
        self.assertFalse(procs.kill_if_same((me.pid, me.start + 1), 0))
        self.assertIn(me.pid, [p.pid for p in procs.descendants(os.getppid())])
        self.assertTrue(proctree.boot_id())
