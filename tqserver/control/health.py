"""The aggregated answer served at /health."""

from __future__ import annotations

from collections.abc import Iterable


def aggregate(pools: Iterable) -> tuple[int, dict]:
    """(HTTP status, body) for GET /health: healthy when every worker is, unhealthy (503)
    when no worker serves at all, degraded otherwise."""
    workers = {pool.name: pool.describe() for pool in pools}
    states = [w["status"] for w in workers.values()]
    if states and all(s == "healthy" for s in states):
        status = "healthy"
    elif not states or all(s in ("failed", "stopped") for s in states):
        status = "unhealthy"
    else:
        status = "degraded"
    return (503 if status == "unhealthy" else 200), {"status": status, "workers": workers}
