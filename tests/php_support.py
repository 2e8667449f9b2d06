"""A real php-fpm for tests: started from TQServer's own generated config on a free
loopback port, polled (with a deadline) until its ping answers, stopped and waited for."""
from __future__ import annotations

import os
from typing import Dict, Optional

import attrs
from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from tqserver.config.discovery import WorkerSpec
from tqserver.config.worker import PhpConfig, PhpPoolConfig, default_worker_config
from tqserver.fastcgi import client
from tqserver.runtimes.php import PING_PATH, PhpRuntime, find_php_fpm

from .support import free_port, sleep

SKIP_REASON = ("php-fpm is not installed (apt-get install php-fpm, or "
               "bin/install-toolchains --only php)")


def require_php_fpm() -> str:
    found = find_php_fpm()
    if found is None:
        raise unittest.SkipTest(SKIP_REASON)
    return found


def php_spec(directory: str, settings: Optional[Dict[str, str]] = None,
             **pool) -> WorkerSpec:
    config = attrs.evolve(default_worker_config(), type="php",
                          php=PhpConfig(settings=dict(settings or {}),
                                        pool=PhpPoolConfig(**pool)))
    return WorkerSpec(name="t", directory=directory, route="/t", type="php", config=config,
                      config_file=None)


PING = [(b"REQUEST_METHOD", b"GET"), (b"SCRIPT_NAME", PING_PATH.encode()),
        (b"SCRIPT_FILENAME", PING_PATH.encode())]


class PhpFpm(protocol.ProcessProtocol):
    """One php-fpm master and its children, as the PHP runtime would launch it."""

    def __init__(self, spec: WorkerSpec, root: str) -> None:
        self.spec = spec
        self.root = root
        self.port = free_port()
        self.output = b""
        self.ended: defer.Deferred = defer.Deferred()
        self.launch = None

    async def start(self, timeout: float = 20.0) -> "PhpFpm":
        self.launch = PhpRuntime().launch(self.spec, self.port, "t#1", self.root, "dev")
        argv = self.launch.argv
        reactor.spawnProcess(self, argv[0], argv, env=dict(os.environ), path=self.root)
        deadline = reactor.seconds() + timeout
        last = None
        while reactor.seconds() < deadline:
            if self.ended.called:
                raise AssertionError("php-fpm exited:\n" + self.text)
            try:
                response = await client.request(reactor, self.port, PING, timeout=1.0)
                if response.body == b"pong":
                    return self
            except Exception as e:   # not listening yet
                last = e
            await sleep(0.05)
        raise AssertionError(f"php-fpm did not answer its ping ({last!r}):\n{self.text}")

    def connectionMade(self) -> None:
        self.transport.closeStdin()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason) -> None:
        self.ended.callback(None)

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    async def stop(self, timeout: float = 10.0) -> None:
        if self.ended.called:
            return
        self.transport.signalProcess("TERM")
        deadline = reactor.seconds() + timeout
        while not self.ended.called and reactor.seconds() < deadline:
            await sleep(0.02)
        if not self.ended.called:
            self.transport.signalProcess("KILL")
            await self.ended
