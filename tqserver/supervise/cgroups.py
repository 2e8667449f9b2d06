"""A cgroup (v2) per worker instance, where the machine lets us make one: every process an
instance starts stays in it, whatever it does (a new session, a double fork, a process
that renames itself), so stopping an instance can kill all of them. Without a writable
cgroup v2 hierarchy instances run without one and are tracked by their process tree
(proctree.py) instead."""

from __future__ import annotations

import os
import re
import secrets
import signal

from twisted.logger import Logger

log = Logger()

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def _v2_mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or .../unified on hybrid
    machines), if it is."""
    try:
        with open(mountinfo) as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                if fields[sep + 1] == "cgroup2":
                    return fields[4]
    except (OSError, ValueError, IndexError):
        pass
    return None


def _own_cgroup(path: str = "/proc/self/cgroup") -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


class Cgroup:
    """One instance's cgroup: a directory whose cgroup.procs lists its processes."""

    def __init__(self, path: str) -> None:
        self.path = path

    def enter(self, argv: list[str]) -> list[str]:
        """argv that moves itself into this cgroup before it execs ``argv``, so that even
        its first child is born inside (a shell: a few hundred microseconds). Should the
        move fail, the instance runs anyway, tracked by its process tree."""
        procs = os.path.join(self.path, "cgroup.procs")
        return ["/bin/sh", "-c", 'echo $$ 2>/dev/null >"$0"; exec "$@"', procs, *list(argv)]

    def pids(self) -> list[int]:
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                return [int(line) for line in f if line.strip()]
        except (OSError, ValueError):
            return []

    def kill(self) -> int:
        """SIGKILL every process in it (cgroup.kill where the kernel has it, 5.14+); how
        many there were."""
        pids = self.pids()
        if not pids:
            return 0
        try:
            with open(os.path.join(self.path, "cgroup.kill"), "w") as f:
                f.write("1")
            return len(pids)
        except OSError:
            pass
        for pid in pids:  # in the cgroup now: ours, whatever its PID was before
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return len(pids)

    def remove(self) -> bool:
        """rmdir once it is empty (the kernel refuses while a process is in it)."""
        try:
            os.rmdir(self.path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            return False

    @property
    def exists(self) -> bool:
        return os.path.isdir(self.path)


class CgroupParent:
    """The directory this supervisor makes its instances' cgroups in: a child of its own
    cgroup, named with its PID and a random token so that no other run's can be mistaken
    for it."""

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def find(cls) -> CgroupParent | None:
        """None when cgroup v2 is not mounted or not writable here (not root, no
        delegation); then instances run without a cgroup."""
        mount = _v2_mount()
        own = _own_cgroup()
        if mount is None or own is None:
            return None
        base = os.path.join(mount, own.lstrip("/"))
        path = os.path.join(base, f"tqserver.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            os.mkdir(path)
        except OSError as e:
            log.info("no cgroup per instance ({path}: {error})", path=base, error=e.strerror)
            return None
        return cls(path)

    def create(self, instance_id: str) -> Cgroup | None:
        path = os.path.join(self.path, _UNSAFE.sub("_", instance_id))
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        except OSError as e:
            log.warn("no cgroup for {id}: {error}", id=instance_id, error=e.strerror)
            return None
        return Cgroup(path)

    def remove(self) -> None:
        """At the end: the (empty) instance cgroups left, then this directory."""
        try:
            names = os.listdir(self.path)
        except OSError:
            return
        for name in names:
            child = os.path.join(self.path, name)
            if os.path.isdir(child):
                Cgroup(child).remove()
        Cgroup(self.path).remove()
