"""A real HAProxy (Debian's package) in front of a test's twistd, on loopback, started the
way operators run it in the foreground (`haproxy -db -f CONFIG`)."""
from __future__ import annotations

import os
import shutil

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def require_haproxy() -> None:
    """Skip the test on a machine without haproxy (CI installs it)."""
    if not os.access(HAPROXY, os.X_OK):
        raise unittest.SkipTest("haproxy is not installed (bin/install-toolchains --only haproxy)")


class HAProxyProcess(protocol.ProcessProtocol):
    """A running haproxy; ``text`` is what it printed (its alerts name a bad config)."""

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
        """SIGTERM (haproxy's hard stop), fired once it exited."""
        if self.done:
            return None
        self.transport.signalProcess("TERM")
        return self.ended


def start_haproxy(testcase: unittest.TestCase, config_path: str) -> HAProxyProcess:
    """haproxy running ``config_path``, stopped when ``testcase`` ends."""
    lb = HAProxyProcess()
    reactor.spawnProcess(lb, HAPROXY, [HAPROXY, "-db", "-f", config_path],
                         env=dict(os.environ))
    testcase.addCleanup(lb.stop)
    return lb
