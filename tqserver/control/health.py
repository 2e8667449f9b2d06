"""The answers served at /health (the aggregate), /health/<worker>, /health/live and
/health/ready (docs/operations.md, "Health")."""

from __future__ import annotations

from collections.abc import Iterable


def worker_healthy(pool) -> bool:
    """A healthy instance of the worker serves: in rotation, its last probe passed."""
    return any(not inst.health_failures for inst in pool.serving)


def aggregate(pools: Iterable, watcher=None, degraded_status: int = 200) -> tuple[int, dict]:
    """(HTTP status, body) for GET /health: healthy (200) when every worker is (and the dev
    file watcher, if any, watches), unhealthy (503) when no worker serves at all, degraded
    (``degraded_status``: health.degraded_status) otherwise."""
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
    code = {"healthy": 200, "unhealthy": 503}.get(status, degraded_status)
    return code, body


def worker(pools: dict, name: str) -> tuple[int, dict]:
    """GET /health/<worker>: 200 while a healthy instance of it serves, 503 otherwise, 404
    for a worker nobody knows."""
    pool = pools.get(name)
    if pool is None:
        return 404, {"error": f"no worker named {name!r}"}
    body = {"worker": name, **pool.describe()}
    return (200 if worker_healthy(pool) else 503), body


def live() -> tuple[int, dict]:
    """GET /health/live: answered at all, the supervisor's reactor is responsive."""
    return 200, {"status": "live"}


def shutting_down(supervisor) -> bool:
    """Shutdown began: the server.shutdown_delay_seconds pause, or the stop itself."""
    return supervisor.draining or not supervisor.running


def ready(pools: Iterable, draining: bool) -> tuple[int, dict]:
    """GET /health/ready: 503 while draining for shutdown, and until every worker (there is
    at least one) has passed its first healthy probe; 200 from then on, whatever happens to
    them later (/health and /health/<worker> say that)."""
    pools = list(pools)
    waiting = sorted(pool.name for pool in pools if not pool.ready)
    if draining:
        status = "draining"
    elif not pools:
        status = "no workers"
    elif waiting:
        status = "starting"
    else:
        return 200, {"status": "ready", "waiting_for": []}
    return 503, {"status": status, "waiting_for": waiting}


# What the public /health of prod shows of a worker (bin/deploy reads revision, deploying).
PUBLIC_WORKER_KEYS = ("status", "ready", "revision", "deploying")


def redacted(body: dict) -> dict:
    """A /health body (aggregate's, worker's) as the public port shows it in prod: the
    verdict and each worker's status, readiness, revision and deploying flag; no ports,
    errors, build output or paths (those are on the admin listener)."""
    if "workers" in body:
        workers = body["workers"]
        return {
            "status": body["status"],
            "workers": {n: {k: w.get(k) for k in PUBLIC_WORKER_KEYS} for n, w in workers.items()},
        }
    if "worker" in body:
        return {"worker": body["worker"], **{k: body.get(k) for k in PUBLIC_WORKER_KEYS}}
    return body  # live, ready, an unknown worker: nothing to hide
