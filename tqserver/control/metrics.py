"""Prometheus metrics (docs/operations.md, "Metrics") in a registry of our own, plus the
process collectors.

Per-request figures are kept as plain cumulative numbers (RequestStats): one dict update
per request, and proxy processes send theirs to the supervisor, which exposes the sum."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from typing import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from tqserver.control.health import worker_healthy
from tqserver.logs.files import DROPPED_LINES
from tqserver.supervise.events import PoolEvent
from tqserver.supervise.instance import InstanceState

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)


class RequestStats:
    """Requests answered by (worker, code) and their durations by worker, cumulative since
    the process started. ``durations[worker]`` is one count per bucket of LATENCY_BUCKETS
    (not cumulative), then +Inf, then the sum of seconds."""

    __slots__ = ("counts", "durations")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}
        self.durations: dict[str, list[float]] = {}

    def observe_request(self, worker: str, code: int, seconds: float) -> None:
        key = (worker, code)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        row = self.durations.get(worker)
        if row is None:
            row = self.durations[worker] = [0] * (len(LATENCY_BUCKETS) + 2)
        row[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        row[-1] += seconds

    def snapshot(self) -> tuple[dict, dict]:
        """Plain data to send elsewhere (see add)."""
        return dict(self.counts), {w: list(row) for w, row in self.durations.items()}

    def add(self, snapshot: tuple[dict, dict]) -> None:
        counts, durations = snapshot
        for key, n in counts.items():
            self.counts[key] = self.counts.get(key, 0) + n
        for worker, row in durations.items():
            mine = self.durations.get(worker)
            if mine is None:
                self.durations[worker] = list(row)
            else:
                for i, value in enumerate(row):
                    mine[i] += value


class RequestCollector:
    """Exposes the sum of several RequestStats as tqserver_requests_total and
    tqserver_request_duration_seconds."""

    def __init__(self, sources: Callable[[], Iterable[RequestStats]]) -> None:
        self.sources = sources

    def describe(self):
        return []

    def collect(self):
        total = RequestStats()
        for stats in self.sources():
            total.add(stats.snapshot())
        requests = CounterMetricFamily(
            "tqserver_requests", "Requests answered", labels=["worker", "code"]
        )
        for (worker, code), n in sorted(total.counts.items()):
            requests.add_metric([worker, str(code)], n)
        duration = HistogramMetricFamily(
            "tqserver_request_duration_seconds", "Request duration", labels=["worker"]
        )
        for worker, row in sorted(total.durations.items()):
            buckets, running = [], 0
            for bound, n in zip(LATENCY_BUCKETS + (float("inf"),), row):
                running += n
                buckets.append((floatToGoString(bound), running))
            duration.add_metric([worker], buckets, row[-1])
        yield requests
        yield duration


class DroppedLogLinesCollector:
    """tqserver_log_lines_dropped_total{log}: lines of a log that could not be written
    ("server", "worker:<name>"), from logs.files.DROPPED_LINES."""

    def describe(self):
        return []

    def collect(self):
        dropped = CounterMetricFamily(
            "tqserver_log_lines_dropped",
            "Log lines dropped because their file could not be written",
            labels=["log"],
        )
        for name, n in sorted(DROPPED_LINES.items()):
            dropped.add_metric([name], n)
        yield dropped


class Metrics:
    """The supervisor's registry. Requests are counted by the AccessLog
    (``observe_request``), pool changes arrive as a Supervisor listener (``pool_changed``);
    ``elsewhere`` gives the counts of the proxy processes, if any."""

    def __init__(self, elsewhere: Callable[[], Iterable[RequestStats]] = lambda: ()) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = RequestStats()  # answered by this process
        self.elsewhere = elsewhere
        r.register(RequestCollector(self.request_stats))
        r.register(DroppedLogLinesCollector())
        self.in_flight = Gauge(
            "tqserver_requests_in_flight", "Requests in flight", ["worker"], registry=r
        )
        self.instances = Gauge(
            "tqserver_worker_instances", "Instances by state", ["worker", "state"], registry=r
        )
        self.healthy = Gauge(
            "tqserver_worker_healthy",
            "1 when a healthy instance of the worker serves (as /health/<worker>: 200)",
            ["worker"],
            registry=r,
        )
        self.restarts = Counter(
            "tqserver_worker_restarts", "Instance restarts", ["worker", "reason"], registry=r
        )
        self.builds = Counter("tqserver_builds", "Builds", ["worker", "result"], registry=r)
        self.build_duration = Histogram(
            "tqserver_build_duration_seconds",
            "Build duration",
            ["worker"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.swap_duration = Histogram(
            "tqserver_swap_duration_seconds",
            "From deploy start to the new instances serving",
            ["worker"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.health_checks = Counter(
            "tqserver_health_checks", "Health probes", ["worker", "result"], registry=r
        )

    def request_stats(self) -> list[RequestStats]:
        """Every process's cumulative request counts: this one's and the proxy processes'."""
        return [self.requests, *self.elsewhere()]

    def observe_request(self, worker: str, code: int, seconds: float) -> None:
        self.requests.observe_request(worker, code, seconds)

    def pool_changed(self, pool, event: PoolEvent) -> None:
        if event is PoolEvent.PROBE_OK or event is PoolEvent.PROBE_FAILED:
            result = "ok" if event is PoolEvent.PROBE_OK else "fail"
            self.health_checks.labels(pool.name, result).inc()
        elif event is PoolEvent.SWAP and pool.last_swap_seconds is not None:
            self.swap_duration.labels(pool.name).observe(pool.last_swap_seconds)
        elif event is PoolEvent.BUILD and pool.last_build is not None:
            build = pool.last_build
            result = "cancelled" if build.cancelled else ("success" if build.ok else "failure")
            self.builds.labels(pool.name, result).inc()
            self.build_duration.labels(pool.name).observe(build.duration)
        elif event is PoolEvent.CRASH:
            self.restarts.labels(pool.name, "crash").inc()
        elif event is PoolEvent.RESTART:
            self.restarts.labels(pool.name, "health").inc()

    def refresh(self, pools) -> None:
        """Gauges that are cheaper to read at scrape time than to keep current. Every known
        worker has every series, 0 included (a worker with no instance reads 0 in each
        state, so ``== 0`` alerts fire); a removed worker's are gone."""
        self.instances.clear()
        self.in_flight.clear()
        self.healthy.clear()
        for pool in pools:
            states = dict.fromkeys(STATES, 0)
            for inst in pool.instances:
                state = str(inst.state)
                states[state] = states.get(state, 0) + 1
            for state, n in states.items():
                self.instances.labels(pool.name, state).set(n)
            self.healthy.labels(pool.name).set(1 if worker_healthy(pool) else 0)
            self.in_flight.labels(pool.name).set(
                sum(i.inflight + i.inflight_elsewhere for i in pool.instances)
            )

    def render(self, pools) -> bytes:
        self.refresh(pools)
        return generate_latest(self.registry)


CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()
STATES = tuple(str(state) for state in InstanceState)  # each has a series per worker
