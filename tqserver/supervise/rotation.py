"""Which instance of a worker takes the next request, holding requests while none can,
and counting the requests in flight on an instance.

Shared by WorkerPool and Instance (the supervisor's own) and the mirrors of them that
proxy processes keep (fleet.child: MirrorPool, MirrorInstance)."""

from __future__ import annotations

from twisted.internet import defer


class Rotation:
    """Mixin: ``serving`` is the tuple of instances that take requests; subclasses say
    whether one may come soon (``_may_serve_soon``) and give the reactor (``_reactor``)."""

    serving: tuple = ()
    _rr = 0
    _serving_waiters: list[defer.Deferred]

    def pick(self):
        """The serving instance with the fewest requests in flight (round-robin on ties)."""
        serving = self.serving
        if len(serving) == 1:
            return serving[0]
        if not serving:
            return None
        self._rr = (self._rr + 1) % len(serving)
        ordered = serving[self._rr :] + serving[: self._rr]
        return min(ordered, key=lambda inst: inst.inflight)

    def wait_serving(self, timeout: float) -> defer.Deferred:
        """Fires with an instance once one is serving, or with None after ``timeout`` (at
        once when nothing is starting)."""
        inst = self.pick()
        if inst is not None or not self._may_serve_soon():
            return defer.succeed(inst)
        d: defer.Deferred = defer.Deferred()
        self._serving_waiters.append(d)

        def expire() -> None:
            if d in self._serving_waiters:
                self._serving_waiters.remove(d)
                d.callback(None)

        call = self._reactor.callLater(timeout, expire)
        d.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return d

    def _wake_waiters(self) -> None:
        waiters, self._serving_waiters = self._serving_waiters, []
        for d in waiters:
            d.callback(self.pick())

    def _may_serve_soon(self) -> bool:
        raise NotImplementedError

    @property
    def _reactor(self):
        raise NotImplementedError


class InFlight:
    """Mixin for an instance: ``inflight`` is kept by its request_started/finished; a
    drain waits on ``idle()``. Subclasses set ``inflight = 0`` and ``_idle_waiters = []``."""

    __slots__ = ()
    inflight: int
    _idle_waiters: list[defer.Deferred]

    def idle(self) -> defer.Deferred:
        """Fires (with the instance) when no request is in flight on it."""
        if self.inflight <= 0:
            return defer.succeed(self)
        d: defer.Deferred = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    def _wake_idle(self) -> None:
        waiters = self._idle_waiters[:]
        del self._idle_waiters[:]  # in place: the list is in the subclass's __slots__
        for d in waiters:
            d.callback(self)
