"""HealthChecker: a LoopingCall that probes every serving instance and replaces one that keeps
failing."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Callable

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from tqserver.supervise.instance import Instance

if TYPE_CHECKING:
    from tqserver.config.server import WorkersSection
    from tqserver.supervise.pool import WorkerPool

log = Logger()

BATCH = 25  # probes started together (one reactor turn, one burst of answers)
SPREAD = 0.5  # a round's batches start spread over this part of the interval


class HealthChecker(Service):
    """Every health_check_interval_ms, probe each serving instance; one that fails
    health_check_failures times in a row is replaced by its pool.

    With many instances, a round's probes start in batches of BATCH spread evenly over the
    first half of the interval rather than all at once, so that the supervisor (which
    proxies requests meanwhile) is never busy with probes for more than a few ms at a
    time. Not one by one: each reactor turn has a cost of its own, so probes spread one per
    turn cost the supervisor more CPU than probes sent together."""

    def __init__(
        self,
        reactor,
        pools: Callable[[], Iterable[WorkerPool]],
        probe,
        settings: Callable[[], WorkersSection],
        on_result: Callable[[WorkerPool, bool], None] = lambda pool, ok: None,
    ) -> None:
        self.reactor = reactor
        self._pools = pools
        self._probe = probe
        self._settings = settings
        self._loop: task.LoopingCall | None = None
        self._interval: float | None = None
        self.checks = {"ok": 0, "fail": 0}
        self._delayed: set[defer.Deferred] = set()  # probes of this round yet to start
        self.on_result = on_result  # (pool, ok) after each probe

    def startService(self) -> None:
        Service.startService(self)
        self._restart_loop()

    def stopService(self):
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for d in list(self._delayed):
            d.cancel()

    def reconfigure(self) -> None:
        """Pick up a changed interval from the (reloaded) configuration."""
        if self.running and self._settings().health_check_interval_ms / 1000.0 != self._interval:
            self._restart_loop()

    def _restart_loop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._interval = self._settings().health_check_interval_ms / 1000.0
        loop = self._loop = task.LoopingCall(self.check_all)
        loop.clock = self.reactor
        d = loop.start(self._interval, now=False)
        d.addErrback(lambda f: log.failure("health checker stopped", f))

    def check_all(self) -> defer.Deferred:
        pools = list(self._pools())
        for pool in pools:
            pool.maybe_scale_down()
        targets = [(pool, inst) for pool in pools for inst in pool.serving]
        batches = [targets[i : i + BATCH] for i in range(0, len(targets), BATCH)]
        step = (self._interval or 0) * SPREAD / max(1, len(batches))
        checks = []
        for k, batch in enumerate(batches):
            if k and step:
                checks.append(self._check_later(k * step, batch))
            else:
                checks.extend(self._check(pool, inst) for pool, inst in batch)
        return defer.gatherResults(checks, consumeErrors=True)

    def _check_later(
        self, delay: float, batch: list[tuple[WorkerPool, Instance]]
    ) -> defer.Deferred:
        def start():
            self._delayed.discard(d)
            # not those that left the rotation meanwhile
            return defer.gatherResults(
                [self._check(pool, inst) for pool, inst in batch if inst in pool.serving],
                consumeErrors=True,
            )

        def cancelled(failure):
            failure.trap(defer.CancelledError)  # stopped before it started
            self._delayed.discard(d)

        d = task.deferLater(self.reactor, delay, start)
        self._delayed.add(d)
        return d.addErrback(cancelled)

    def _check(self, pool: WorkerPool, inst: Instance) -> defer.Deferred:
        s = self._settings()
        d = self._probe(inst, pool.spec.config.health_path, s.health_check_timeout_ms / 1000.0)

        def record(ok: bool) -> None:
            self.checks["ok" if ok else "fail"] += 1
            self.on_result(pool, ok)
            if ok:
                if inst.health_failures:
                    log.info("{id} is healthy again", id=inst.id)
                inst.health_failures = 0
                pool.check_memory(inst)
                return
            inst.health_failures += 1
            log.warn(
                "{id}: health check failed ({n}/{limit})",
                id=inst.id,
                n=inst.health_failures,
                limit=s.health_check_failures,
            )
            if inst.health_failures >= s.health_check_failures:
                pool.replace(inst, "health")

        return d.addCallback(record)
