"""Serving a twisted.web resource: Twisted's reactor and Site, with the same health
answer and graceful drain as the WSGI server."""

from __future__ import annotations

import os
import sys
from typing import Any

try:
    import _signal as _sig
except ImportError:  # pragma: no cover
    import signal as _sig

from tqserver.worker.common import log, worker_info


def is_twisted_resource(obj) -> bool:
    mod = sys.modules.get("twisted.web.resource")
    if mod is None:
        return False
    try:
        return bool(mod.IResource.providedBy(obj))
    except Exception:
        return False


def serve_resource(root, host: str, port: int, health_path: str, drain_seconds: float) -> None:
    from twisted.internet import reactor
    from twisted.internet.defer import maybeDeferred
    from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.python.failure import Failure
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    state = {"draining": False, "stopping": False}
    health_b = health_path.encode("latin-1")

    class HealthResource(Resource):
        isLeaf = True

        def render(self, request):
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.setHeader(b"cache-control", b"no-store")
            if state["draining"]:
                request.setResponseCode(503)
                return b"draining"
            return b"ok"

    health = HealthResource()

    class WorkerSite(Site):
        noisy = False
        displayTracebacks = False

        def __init__(self, resource):
            Site.__init__(self, resource)
            self.protocols = set()

        def log(self, request):  # the supervisor writes the access log
            pass

        def buildProtocol(self, addr):
            proto = Site.buildProtocol(self, addr)
            protocols = self.protocols
            protocols.add(proto)
            orig = proto.connectionLost

            def connectionLost(reason, _orig=orig, _proto=proto):
                protocols.discard(_proto)
                return _orig(reason)

            proto.connectionLost = connectionLost
            return proto

        def getResourceFor(self, request):
            if request.path == health_b and request.method in (b"GET", b"HEAD"):
                request.site = self
                request.sitepath = []
                return health
            return Site.getResourceFor(self, request)

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)

    site = WorkerSite(root)
    endpoint: TCP4ServerEndpoint | TCP6ServerEndpoint
    if ":" in host:
        endpoint = TCP6ServerEndpoint(reactor, port, backlog=1024, interface=host)
    else:
        endpoint = TCP4ServerEndpoint(reactor, port, backlog=1024, interface=host)
    outcome: list[Any] = []
    endpoint.listen(site).addBoth(outcome.append)  # TCP listen completes synchronously
    if not outcome or isinstance(outcome[0], Failure):
        err = outcome[0].value if outcome else "listen did not complete"
        raise SystemExit(f"tqserver.worker: cannot listen on {host}:{port}: {err}")
    listening = outcome[0]

    def idle_and_busy():
        """Close idle connections; count the ones with a request in progress."""
        busy = 0
        for proto in list(site.protocols):
            # Site builds a _GenericHTTPChannelProtocol proxy around the HTTPChannel.
            channel = getattr(proto, "_channel", proto)
            transport = getattr(channel, "transport", None)
            if getattr(channel, "requests", None):
                busy += 1
            elif transport is not None:
                transport.loseConnection()
        return busy

    def begin_drain():
        state["draining"] = True
        log(f"stopping: draining {len(site.protocols)} connection(s) (at most {drain_seconds:g}s)")
        end = reactor.seconds() + drain_seconds

        def tick(_=None):
            try:
                busy = idle_and_busy()
            except Exception:
                import traceback

                log(f"drain failed:\n{traceback.format_exc().rstrip()}")
                busy = 0
            if busy and reactor.seconds() < end:
                reactor.callLater(0.02, tick)
                return
            if busy:
                log(f"drain timed out with {busy} connection(s) still busy")
            log("stopped")
            reactor.stop()

        maybeDeferred(listening.stopListening).addBoth(tick)

    def on_signal(signum, frame):
        if state["stopping"]:
            log("second signal: exiting without waiting for in-flight requests")
            os._exit(1)
        state["stopping"] = True
        reactor.callFromThread(begin_drain)

    def install_handlers():
        for sig in (_sig.SIGTERM, _sig.SIGINT):
            _sig.signal(sig, on_signal)

    reactor.callWhenRunning(install_handlers)
    info = worker_info()
    log(
        f"{info['name'] or 'worker'} listening on "
        f"http://{host if ':' not in host else f'[{host}]'}:{listening.getHost().port} "
        "(Twisted resource)"
    )
    reactor.run()
