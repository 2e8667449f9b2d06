"""Records of running instances under run/instances/, so that after a supervisor crash
(kill -9) the next start finds and stops what it left behind — and nothing else.

A PID alone identifies nothing once its process is gone (the kernel hands it out again),
and a process's environment is no proof either (php-fpm writes its process title over it).
So each record holds what does identify the instance's processes: the leader's PID with
its start time (exact within one boot), its cgroup when it had one, every descendant seen
while it ran with its start time, and its working directory and command lines, which
vouch for members of its process group that started after the last look."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from twisted.logger import Logger

from tqserver.supervise.cgroups import Cgroup
from tqserver.supervise.proctree import ProcInfo, ProcTable, boot_id

log = Logger()

CGROUP_REMOVE_TRIES = 50  # x 0.1 s: killed processes take a moment to leave their cgroup


class InstanceRecords:
    def __init__(
        self, run_dir: str, root: str, procs: ProcTable | None = None, reactor=None
    ) -> None:
        self.dir = os.path.join(run_dir, "instances")
        self.root = root
        self.procs = procs or ProcTable()
        self.reactor = reactor  # to remove emptied cgroups later (None: now or never)
        self._boot = boot_id()

    def record(self, inst) -> None:
        """Write (or rewrite, when its family changed) the record of a running instance."""
        if inst.pid is None:
            return
        procs = self.procs
        cmdlines = {" ".join(inst.argv)}
        for pid in inst.family:
            line = procs.cmdline(pid)
            if line:
                cmdlines.add(line)
        data = {
            "id": inst.id,
            "root": self.root,
            "boot": self._boot,
            "pid": inst.pid,
            "start": inst.leader_start
            if inst.leader_start is not None
            else procs.start_time(inst.pid),
            "cwd": inst.cwd,
            "cmdlines": sorted(cmdlines),
            "family": [list(ident) for ident in inst.members()],
            "cgroup": None if inst.cgroup is None else inst.cgroup.path,
        }
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, str(inst.pid))
        with open(path + ".new", "w") as f:
            json.dump(data, f)
        os.replace(path + ".new", path)

    def forget(self, inst) -> None:
        try:
            os.unlink(os.path.join(self.dir, str(inst.pid)))
        except (FileNotFoundError, TypeError):
            pass

    def reap(self) -> int:
        """Stop what the instances of a previous supervisor of this root left running;
        how many instances had something left."""
        if not os.path.isdir(self.dir):
            return 0
        stopped = 0
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            try:
                with open(path) as f:
                    record = json.load(f)
                if not isinstance(record, dict):
                    raise ValueError("not a record")
            except (OSError, ValueError):
                record = None  # unreadable, or the one-line format of older versions
            if record is not None and self._stop(record):
                stopped += 1
            try:
                os.unlink(path)
            except OSError:
                pass
        return stopped

    def _stop(self, record: dict[str, Any]) -> bool:
        if record.get("root") != self.root or record.get("boot") != self._boot:
            return False  # another root's, or from before a reboot: start times mean nothing
        procs = self.procs
        try:
            pid = int(record["pid"])
            start = int(record["start"])
            family = [(int(p), int(s)) for p, s in record.get("family", ())]
        except (KeyError, TypeError, ValueError):
            return False
        killed = 0
        cgroup = record.get("cgroup")
        if isinstance(cgroup, str) and os.path.isdir(cgroup):
            killed += Cgroup(cgroup).kill()
            self._remove_later(Cgroup(cgroup))
        leader = procs.info(pid)
        leader_is_ours = leader is not None and leader.start == start and not leader.zombie
        if leader_is_ours:
            procs.killpg(pid, signal.SIGKILL)
            procs.kill(pid, signal.SIGKILL)
            killed += 1
        for ident in family:
            if procs.kill_if_same(ident):
                killed += 1
        if leader is None or leader_is_ours:
            # A PID is not handed out again while a process group of that number exists:
            # if the PID names a different process, our group is gone, and its number is
            # someone else's. Otherwise members not seen yet are taken when they look
            # like the instance (started after it, same directory or command line).
            for p in procs.all():
                if p.pgid == pid and p.pid != pid and self._looks_ours(p, record, start):
                    if procs.kill_if_same(p.ident):
                        killed += 1
        if killed:
            log.warn(
                "stopped leftover instance {id} (pid {pid}) from an earlier run",
                id=record.get("id"),
                pid=pid,
            )
        return bool(killed)

    def _looks_ours(self, p: ProcInfo, record: dict[str, Any], start: int) -> bool:
        if p.zombie or p.start < start:
            return False
        procs = self.procs
        if procs.cwd(p.pid) == record.get("cwd"):
            return True
        if procs.cmdline(p.pid) in record.get("cmdlines", ()):
            return True
        env = procs.environ(p.pid)
        return env.get("TQSERVER_ROOT") == self.root and env.get("WORKER_INSTANCE") == record.get(
            "id"
        )

    def _remove_later(self, cgroup: Cgroup, tries: int = CGROUP_REMOVE_TRIES) -> None:
        if cgroup.remove():
            parent = Cgroup(os.path.dirname(cgroup.path))
            if os.path.basename(parent.path).startswith("tqserver."):
                parent.remove()  # the old supervisor's directory, once empty
            return
        if self.reactor is not None and tries:
            cgroup.kill()
            self.reactor.callLater(0.1, self._remove_later, cgroup, tries - 1)
