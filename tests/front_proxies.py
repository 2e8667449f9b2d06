"""Real proxies in front of a test's twistd, on loopback, started the way operators run
them in the foreground: Debian's HAProxy (`haproxy -db -f CONFIG`) and Caddy (`caddy run
--config Caddyfile`, terminating TLS with its own local CA)."""
from __future__ import annotations

import os
import shutil

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
CADDY = shutil.which("caddy") or "/usr/bin/caddy"


def require_haproxy() -> None:
    """Skip the test on a machine without haproxy (CI installs it)."""
    if not os.access(HAPROXY, os.X_OK):
        raise unittest.SkipTest("haproxy is not installed (bin/install-toolchains --only haproxy)")


class ServerProcess(protocol.ProcessProtocol):
    """A running proxy; ``text`` is what it printed (its alerts name a bad config)."""

    def __init__(self) -> None:
        self.text = b""
        self.done = False
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.text += data

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.done = True
        self.ended.callback(None)

    @property
    def output(self) -> str:
        return self.text.decode("utf-8", "replace")

    def stop(self) -> defer.Deferred | None:
        """SIGTERM (haproxy's hard stop, Caddy's graceful one), fired once it exited."""
        if self.done:
            return None
        self.transport.signalProcess("TERM")
        return self.ended


def _start(testcase: unittest.TestCase, argv: list, env: dict) -> ServerProcess:
    server = ServerProcess()
    reactor.spawnProcess(server, argv[0], argv, env=env)
    testcase.addCleanup(server.stop)
    return server


def start_haproxy(testcase: unittest.TestCase, config_path: str) -> ServerProcess:
    """haproxy running ``config_path``, stopped when ``testcase`` ends."""
    return _start(testcase, [HAPROXY, "-db", "-f", config_path], dict(os.environ))


def require_caddy() -> None:
    if not os.access(CADDY, os.X_OK):
        raise unittest.SkipTest("caddy is not installed (bin/install-toolchains --only caddy)")


def start_caddy(testcase: unittest.TestCase, caddyfile: str, home: str) -> ServerProcess:
    """caddy running ``caddyfile``, its data (the local CA, certificates) under ``home``,
    stopped when ``testcase`` ends."""
    env = dict(os.environ, HOME=home, XDG_DATA_HOME=home, XDG_CONFIG_HOME=home)
    return _start(testcase, [CADDY, "run", "--config", caddyfile, "--adapter", "caddyfile"], env)
