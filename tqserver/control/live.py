"""The whole picture of a running server as one JSON-able dict: what the status page
renders, ``/_tqserver/api/status`` answers and ``tqserver status``/``top`` print.

Per worker: its pool's state (Pool.describe), its instances with their process figures
(pid, port, uptime, requests, in flight, CPU %, RSS), its requests over the last minute
(rate, error rate, p50/p99 latency) and their recent history, its last build with the
output of a failed one, and the last lines of its output."""

from __future__ import annotations

import time

from tqserver.control import health
from tqserver.control.processes import ProcessStats
from tqserver.control.windows import RequestWindows

LOG_LINES = 20  # per worker in the snapshot (the logs endpoint gives more)


class LiveStatus:
    """Builds snapshots of ``supervisor``'s pools, with the request windows and process
    figures it measures. ``watcher`` is the dev file watcher, if any."""

    def __init__(
        self,
        supervisor,
        windows: RequestWindows,
        watcher=None,
        processes: ProcessStats | None = None,
        wall=time.time,
    ) -> None:
        self.supervisor = supervisor
        self.windows = windows
        self.watcher = watcher
        self.processes = processes if processes is not None else ProcessStats()
        self.wall = wall

    def snapshot(self, history: bool = True, log_lines: int = LOG_LINES) -> dict:
        sup = self.supervisor
        now = sup.reactor.seconds()
        minute = self.windows.window()
        charts = self.windows.history() if history else {}
        self.processes.forget_gone()
        workers = {}
        for name, pool in sorted(sup.pools.items()):
            info = pool.describe()
            serving = set(pool.serving)
            info["instances"] = [
                dict(
                    {
                        "id": i.id,
                        "port": i.port,
                        "pid": i.pid,
                        "state": str(i.state),
                        "serving": i in serving,
                        "uptime_seconds": (
                            None if i.started_at is None else round(now - i.started_at, 1)
                        ),
                        "in_flight": i.inflight + i.inflight_elsewhere,
                        "requests": i.requests,
                        "health_failures": i.health_failures,
                    },
                    **self.processes.measure(i.pid),
                )
                for i in sorted(pool.instances, key=lambda i: i.id)
            ]
            build = pool.last_build
            info["last_build"] = (
                None
                if build is None
                else {
                    "ok": build.ok,
                    "cancelled": build.cancelled,
                    "started": build.started,
                    "duration_seconds": round(build.duration, 3),
                    "command": build.command,
                    "output": None if build.ok else build.output,
                }
            )
            info["build_output"] = pool.build_error
            info["start_output"] = pool.start_error
            info["requests"] = minute.get(name) or _idle_window()
            info["history"] = charts.get(name, [])
            info["log"] = pool.log_tail.last(log_lines)
            workers[name] = info
        return {
            "time": self.wall(),
            "mode": sup.mode,
            "root": sup.root,
            "revision": sup.revision,
            "workers": workers,
            # /health/ready's answer: ready | starting | draining | no workers, and who
            "ready": health.ready(sup.pools.values(), draining=health.shutting_down(sup))[1],
            "config_errors": [str(e) for e in sup.config_errors],
            "watcher": None if self.watcher is None else self.watcher.describe(),
        }


def _idle_window() -> dict:
    return {
        "requests": 0,
        "rate": 0.0,
        "errors": 0,
        "error_rate": 0.0,
        "p50_ms": None,
        "p99_ms": None,
    }
