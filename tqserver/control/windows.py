"""Per-worker request rate, error rate and latency over the last minute, and a short history
for the status page's charts: measured, not estimated from totals since start.

The proxy counts every answered request in cumulative RequestStats (this process's and,
with server.proxy_processes > 1, the ones the proxy processes report). Once a second the
RequestWindows samples their sum and keeps what changed, per worker, for the last
HISTORY_SECONDS; a window is the sum of the last seconds of those changes. Latency
percentiles come from the latency histogram's buckets (the ones /metrics exposes),
interpolated inside the bucket the rank falls in, the way Prometheus' histogram_quantile
does: their precision is that of the buckets."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Callable

from twisted.application.service import Service
from twisted.internet import task

from tqserver.control.metrics import LATENCY_BUCKETS, RequestStats

SAMPLE_SECONDS = 1.0
WINDOW_SECONDS = 60  # "over the last minute"
HISTORY_SECONDS = 600  # the charts' span
CHART_STEP_SECONDS = 10  # one chart point per this many seconds


class Delta:
    """What one worker answered during one sample: requests, 5xx answers and the latency
    histogram row (one count per bucket of LATENCY_BUCKETS, then +Inf, then seconds)."""

    __slots__ = ("errors", "requests", "row")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.row = [0.0] * (len(LATENCY_BUCKETS) + 2)

    def add(self, other: Delta) -> None:
        self.requests += other.requests
        self.errors += other.errors
        row = self.row
        for i, value in enumerate(other.row):
            row[i] += value


def quantile(q: float, row: list[float]) -> float | None:
    """The ``q`` quantile (0..1) of the durations counted in a histogram ``row``, in
    seconds; None when it counts nothing. A rank in the +Inf bucket answers the largest
    finite bound (all that is known is "more than that")."""
    counts = row[:-1]
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    running = 0.0
    for i, n in enumerate(counts):
        if n and running + n >= rank:
            if i == len(LATENCY_BUCKETS):
                return float(LATENCY_BUCKETS[-1])
            lower = 0.0 if i == 0 else float(LATENCY_BUCKETS[i - 1])
            upper = float(LATENCY_BUCKETS[i])
            return lower + (upper - lower) * max(0.0, rank - running) / n
        running += n
    return float(LATENCY_BUCKETS[-1])


def summary(delta: Delta, seconds: float) -> dict:
    """The JSON-able figures of ``delta`` accumulated over ``seconds``."""
    p50 = quantile(0.5, delta.row)
    p99 = quantile(0.99, delta.row)
    return {
        "requests": delta.requests,
        "rate": round(delta.requests / seconds, 3) if seconds else 0.0,
        "errors": delta.errors,
        "error_rate": round(delta.errors / delta.requests, 4) if delta.requests else 0.0,
        "p50_ms": None if p50 is None else round(p50 * 1000, 2),
        "p99_ms": None if p99 is None else round(p99 * 1000, 2),
    }


class RequestWindows(Service):
    """Samples the cumulative request counts of ``sources`` every SAMPLE_SECONDS (on the
    given reactor's clock) and answers per-worker figures over recent windows."""

    name = "request-windows"  # type: ignore[assignment]  # Twisted types Service.name as None

    def __init__(
        self,
        reactor,
        sources: Callable[[], Iterable[RequestStats]],
        history_seconds: int = HISTORY_SECONDS,
    ) -> None:
        self.reactor = reactor
        self.sources = sources
        self.samples: deque[tuple[float, dict[str, Delta]]] = deque(
            maxlen=int(history_seconds / SAMPLE_SECONDS)
        )
        self._previous: RequestStats | None = None
        self._loop: task.LoopingCall | None = None
        self.started_at: float | None = None

    def startService(self) -> None:
        Service.startService(self)
        self.started_at = self.reactor.seconds()
        self._previous = self._total()
        loop = self._loop = task.LoopingCall(self.sample)
        loop.clock = self.reactor
        loop.start(SAMPLE_SECONDS, now=False)

    def stopService(self):
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _total(self) -> RequestStats:
        total = RequestStats()
        for stats in self.sources():
            total.add(stats.snapshot())
        return total

    def sample(self) -> None:
        """Record what was answered since the previous sample."""
        total = self._total()
        previous = self._previous or RequestStats()
        self._previous = total
        changes: dict[str, Delta] = {}
        for (worker, code), n in total.counts.items():
            # a count that went down (a source restarted from zero) counts from zero
            before = previous.counts.get((worker, code), 0)
            diff = n - before if n >= before else n
            if diff:
                delta = changes.get(worker)
                if delta is None:
                    delta = changes[worker] = Delta()
                delta.requests += diff
                if code >= 500:
                    delta.errors += diff
        for worker, delta in changes.items():
            row = total.durations.get(worker)
            if row is None:
                continue
            before_row = previous.durations.get(worker)
            for i, value in enumerate(row):
                old = before_row[i] if before_row is not None else 0
                delta.row[i] = value - old if value >= old else value
        self.samples.append((self.reactor.seconds(), changes))

    def _since(self, seconds: float) -> tuple[dict[str, Delta], float]:
        """Per worker, what the samples of the last ``seconds`` counted, and the seconds
        they actually cover (less than asked for just after the start)."""
        now = self.reactor.seconds()
        horizon = now - seconds
        merged: dict[str, Delta] = {}
        for at, changes in reversed(self.samples):
            if at <= horizon:
                break
            for worker, delta in changes.items():
                mine = merged.get(worker)
                if mine is None:
                    mine = merged[worker] = Delta()
                mine.add(delta)
        started = self.started_at if self.started_at is not None else now
        return merged, max(0.0, min(seconds, now - started))

    def window(self, seconds: float = WINDOW_SECONDS) -> dict[str, dict]:
        """Per worker: requests, rate (per second), errors (5xx), error_rate (their share),
        p50_ms and p99_ms over the last ``seconds``."""
        merged, covered = self._since(seconds)
        return {worker: summary(delta, covered) for worker, delta in merged.items()}

    def history(
        self, seconds: float = HISTORY_SECONDS, step: float = CHART_STEP_SECONDS
    ) -> dict[str, list]:
        """Per worker, one point per ``step`` seconds over the last ``seconds`` (oldest
        first): [requests per second, p50 ms, p99 ms]; the latencies are None for a step
        without requests. Every worker seen in that span has every point."""
        now = self.reactor.seconds()
        points = int(seconds // step)
        steps: list[dict[str, Delta]] = [{} for _ in range(points)]
        for at, changes in reversed(self.samples):
            index = points - 1 - int((now - at) // step)
            if index < 0:
                break
            for worker, delta in changes.items():
                mine = steps[index].get(worker)
                if mine is None:
                    mine = steps[index][worker] = Delta()
                mine.add(delta)
        workers = {w for bucket in steps for w in bucket}
        empty = Delta()
        out: dict[str, list] = {}
        for worker in sorted(workers):
            series = []
            for bucket in steps:
                d = bucket.get(worker, empty)
                figures = summary(d, step)
                series.append([figures["rate"], figures["p50_ms"], figures["p99_ms"]])
            out[worker] = series
        return out
