"""The processes of the machine as /proc shows them: who is whose parent, which process
group, and when each started. An instance's descendants are found by their parent links
while they are still linked (``descendants``), and each is remembered with its start time,
so that a PID is only ever signalled while it still names the same process (a PID the
kernel gave to an unrelated process since is left alone)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable, Iterator

import attrs

PROC = "/proc"

# A process as (pid, start time in clock ticks since boot): what identifies it for good.
Ident = tuple[int, int]


@attrs.frozen
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    start: int  # clock ticks since boot (field 22 of /proc/PID/stat)
    zombie: bool = False

    @property
    def ident(self) -> Ident:
        return (self.pid, self.start)


def parse_stat(pid: int, text: str) -> ProcInfo:
    """/proc/PID/stat; the command name (in parentheses) may hold spaces and parentheses."""
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): ppid is field 4, pgrp 5, starttime 22.
    return ProcInfo(
        pid=pid, ppid=int(rest[1]), pgid=int(rest[2]), start=int(rest[19]), zombie=rest[0] == "Z"
    )


class ProcTable:
    """Reads /proc (``root`` for tests) and signals processes. Every method answers for
    the moment it is called: a process may be gone by the next call."""

    def __init__(self, root: str = PROC) -> None:
        self.root = root

    def info(self, pid: int) -> ProcInfo | None:
        try:
            with open(os.path.join(self.root, str(pid), "stat")) as f:
                return parse_stat(pid, f.read())
        except (OSError, ValueError, IndexError):
            return None

    def all(self) -> Iterator[ProcInfo]:
        try:
            names = os.listdir(self.root)
        except OSError:
            return
        for name in names:
            if name.isdigit():
                found = self.info(int(name))
                if found is not None:
                    yield found

    def cmdline(self, pid: int) -> str | None:
        try:
            with open(os.path.join(self.root, str(pid), "cmdline"), "rb") as f:
                return f.read().replace(b"\0", b" ").strip().decode("utf-8", "replace")
        except OSError:
            return None

    def cwd(self, pid: int) -> str | None:
        try:
            return os.readlink(os.path.join(self.root, str(pid), "cwd"))
        except OSError:
            return None

    def environ(self, pid: int) -> dict[str, str]:
        try:
            with open(os.path.join(self.root, str(pid), "environ"), "rb") as f:
                data = f.read()
        except OSError:
            return {}
        env = {}
        for item in data.split(b"\0"):
            key, sep, value = item.partition(b"=")
            if sep:
                env[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        return env

    def kill(self, pid: int, sig: int) -> bool:
        try:
            os.kill(pid, sig)
            return True
        except OSError:
            return False

    def killpg(self, pgid: int, sig: int) -> bool:
        try:
            os.killpg(pgid, sig)
            return True
        except OSError:
            return False

    # -- built on the above ------------------------------------------------------------
    def start_time(self, pid: int) -> int | None:
        found = self.info(pid)
        return None if found is None else found.start

    def is_same(self, ident: Ident) -> bool:
        """Is this PID still the process that was seen with this start time (alive)?"""
        found = self.info(ident[0])
        return found is not None and found.start == ident[1] and not found.zombie

    def kill_if_same(self, ident: Ident, sig: int = signal.SIGKILL) -> bool:
        """Signal the process only if its PID still names it. (A PID is not reused while
        its process exists, zombie included, so the check and the kill cannot be fooled.)"""
        return self.is_same(ident) and self.kill(ident[0], sig)

    def descendants(self, pid: int, table: Iterable[ProcInfo] | None = None) -> list[ProcInfo]:
        """Every live process below ``pid`` by parent links, whatever its group or session."""
        children: dict[int, list[ProcInfo]] = {}
        for p in self.all() if table is None else table:
            children.setdefault(p.ppid, []).append(p)
        found = []
        todo = [pid]
        while todo:
            for child in children.get(todo.pop(), ()):
                if not child.zombie:
                    found.append(child)
                todo.append(child.pid)
        return found


def boot_id() -> str:
    """Start times count from boot: they identify a process only within one boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""
