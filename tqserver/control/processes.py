"""CPU and memory of worker instances for the status page and ``tqserver status``/``top``.

CPU % is a rate: psutil measures it between two readings of the same process, so the
ProcessStats keeps each process it has read (an instance's leader and its children, e.g.
PHP-FPM's pool) and answers the CPU used since the previous reading of the same tree. The
first reading of a process has no earlier one: its CPU is None (unknown), never 0."""

from __future__ import annotations

from typing import Callable

import psutil


class ProcessStats:
    """``measure(pid)`` -> {"cpu_percent", "rss_bytes"} of the process tree of ``pid``
    (reads of /proc, microseconds each). Forgets processes that are gone."""

    def __init__(self, process: Callable[[int], psutil.Process] = psutil.Process) -> None:
        self._process = process
        self._known: dict[int, psutil.Process] = {}

    def _get(self, pid: int) -> tuple[psutil.Process, bool]:
        proc = self._known.get(pid)
        if proc is not None:
            return proc, False
        proc = self._known[pid] = self._process(pid)
        proc.cpu_percent(None)  # the reference reading
        return proc, True

    def measure(self, pid: int | None) -> dict:
        if pid is None:
            return {"cpu_percent": None, "rss_bytes": None}
        try:
            leader, new = self._get(pid)
            tree = [leader, *leader.children(recursive=True)]
        except psutil.Error:
            self._known.pop(pid, None)
            return {"cpu_percent": None, "rss_bytes": None}
        cpu: float | None = 0.0
        rss = 0
        for proc in tree:
            try:
                if proc is leader:
                    percent = None if new else proc.cpu_percent(None)
                else:
                    known, fresh = self._get(proc.pid)
                    percent = None if fresh else known.cpu_percent(None)
                rss += proc.memory_info().rss
            except psutil.Error:
                self._known.pop(proc.pid, None)
                continue
            if percent is None:
                if proc is leader:
                    cpu = None
            elif cpu is not None:
                cpu += percent
        return {"cpu_percent": None if cpu is None else round(cpu, 1), "rss_bytes": rss}

    def forget_gone(self) -> None:
        """Drop the processes that exited (instances replaced, children reaped)."""
        for pid, proc in list(self._known.items()):
            try:
                running = proc.is_running()
            except psutil.Error:
                running = False
            if not running:
                del self._known[pid]
