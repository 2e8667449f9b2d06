"""Prometheus metrics (SPEC §9) in a registry of our own, plus the process collectors."""
from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest, CONTENT_TYPE_LATEST)
from prometheus_client import PlatformCollector, ProcessCollector, GCCollector

LATENCY_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter("tqserver_requests", "Requests answered", ["worker", "code"],
                                registry=r)
        self.duration = Histogram("tqserver_request_duration_seconds", "Request duration",
                                  ["worker"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("tqserver_requests_in_flight", "Requests in flight", ["worker"],
                               registry=r)
        self.instances = Gauge("tqserver_worker_instances", "Instances by state",
                               ["worker", "state"], registry=r)
        self.restarts = Counter("tqserver_worker_restarts", "Instance restarts",
                                ["worker", "reason"], registry=r)
        self.builds = Counter("tqserver_builds", "Builds", ["worker", "result"], registry=r)
        self.build_duration = Histogram("tqserver_build_duration_seconds", "Build duration",
                                        ["worker"], buckets=(.1, .25, .5, 1, 2, 5, 10, 30, 60, 120),
                                        registry=r)
        self.swap_duration = Histogram("tqserver_swap_duration_seconds",
                                       "From deploy start to the new instances serving",
                                       ["worker"], buckets=(.05, .1, .25, .5, 1, 2, 5, 10, 30),
                                       registry=r)
        self._request_children: dict = {}
        self.health_checks = Counter("tqserver_health_checks", "Health probes",
                                     ["worker", "result"], registry=r)

    def observe_request(self, worker: str, code: int, seconds: float) -> None:
        # The labelled children, looked up once per (worker, code): labels() takes a lock
        # and builds the label tuple on every call.
        key = (worker, code)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(worker, str(code)), self.duration.labels(worker))
        children[0].inc()
        children[1].observe(seconds)

    def refresh(self, pools) -> None:
        """Gauges that are cheaper to read at scrape time than to keep current."""
        self.instances.clear()
        self.in_flight.clear()
        for pool in pools:
            states = {}
            for inst in pool.instances:
                states[inst.state] = states.get(inst.state, 0) + 1
            for state, n in states.items():
                self.instances.labels(pool.name, state).set(n)
            self.in_flight.labels(pool.name).set(sum(i.inflight for i in pool.instances))

    def render(self, pools) -> bytes:
        self.refresh(pools)
        return generate_latest(self.registry)


CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()
