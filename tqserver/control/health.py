"""The aggregated answer served at /health."""

from __future__ import annotations

from collections.abc import Iterable


def worker_healthy(pool) -> bool:
    """A healthy instance of the worker serves: in rotation, its last probe passed."""
    return any(not inst.health_failures for inst in pool.serving)


def aggregate(pools: Iterable, watcher=None) -> tuple[int, dict]:
    """(HTTP status, body) for GET /health: healthy when every worker is (and the dev file
    watcher, if any, watches), unhealthy (503) when no worker serves at all, degraded
    otherwise."""
    workers = {pool.name: pool.describe() for pool in pools}
    states = [w["status"] for w in workers.values()]
    watching = watcher.describe() if watcher is not None else None
    if not states or all(s in ("failed", "stopped") for s in states):
        status = "unhealthy"
    elif all(s == "healthy" for s in states) and (
        watching is None or watching["status"] != "failed"
    ):
        status = "healthy"
    else:
        status = "degraded"
    body = {"status": status, "workers": workers}
    if watching is not None:
        body["watcher"] = watching
    return (503 if status == "unhealthy" else 200), body
