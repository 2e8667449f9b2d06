"""A cluster: two TQServer nodes on loopback with separate roots behind a real HAProxy
(health checks on /health, its stats socket at level admin), constant bounded load through
HAProxy, and `bin/deploy --rolling` of a changed worker to both: no request fails and both
nodes serve the new version."""
from __future__ import annotations

import os
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from .deploy_support import Node, body_of, py_app, release_of, run_deploy, source_project
from .front_proxies import require_haproxy, start_haproxy
from .support import (
    Client,
    free_port,
    kill_leftovers,
    short_dir,
    sleep,
    stop_twistd,
    wait_until,
)

HAPROXY_CFG = """global
    stats socket {socket} mode 600 level admin
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend web
    bind 127.0.0.1:{port}
    default_backend nodes
backend nodes
    balance roundrobin
    option httpchk GET /health
    http-check expect status 200
    default-server inter 200ms fall 2 rise 1
    server node1 127.0.0.1:{port1} check
    server node2 127.0.0.1:{port2} check
"""


class Load:
    """``concurrency`` loops of GET through HAProxy until stopped; every answer counted."""

    def __init__(self, url: str, concurrency: int = 4) -> None:
        self.url = url.encode()
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.retryAutomatically = False
        self.agent = Agent(reactor, pool=self.pool)
        self.running = True
        self.ok = 0
        self.failures: list = []
        self.bodies: dict = {}
        self.loops = [defer.ensureDeferred(self.loop()) for _ in range(concurrency)]

    async def loop(self) -> None:
        while self.running:
            try:
                d = self.agent.request(b"GET", self.url)
                d.addTimeout(10, reactor)
                response = await d
                body = await readBody(response)
            except Exception as e:
                self.failures.append(repr(e))
                continue
            if response.code != 200:
                self.failures.append(f"{response.code} {body[:100]!r}")
            else:
                self.ok += 1
                self.bodies[body] = self.bodies.get(body, 0) + 1
            await sleep(0.005)

    async def stop(self) -> None:
        self.running = False
        await defer.DeferredList(self.loops)
        await self.pool.closeCachedConnections()


class RollingDeployTests(unittest.TestCase):
    timeout = 300

    def setUp(self) -> None:
        require_haproxy()

    def test_rolling_deploy_behind_haproxy_drops_nothing(self):
        return defer.ensureDeferred(self._rolling())

    async def _rolling(self):
        base = os.path.abspath(self.mktemp())
        source = source_project(os.path.join(base, "project"))
        nodes = [Node(os.path.join(base, f"node{i}")) for i in (1, 2)]
        short = short_dir(self)
        socket_path = os.path.join(short, "haproxy.sock")
        lb_port = free_port()
        source.write("etc/deployment.yaml", "targets:\n"
                     + nodes[0].target_yaml("node1") + nodes[1].target_yaml("node2")
                     + "groups:\n  cluster: [node1, node2]\n"
                     + f"balancer:\n  haproxy:\n    socket: {socket_path}\n"
                     + "    backend: nodes\n")
        code, out = await run_deploy(source.root, "cluster")     # first release, no servers
        self.assertEqual(code, 0, out)
        client = Client(self)
        for node in nodes:                    # one after the other: the port range is shared
            proc = node.start()
            self.addCleanup(kill_leftovers, node.current)
            self.addCleanup(lambda p=proc: None if p.done else defer.ensureDeferred(
                stop_twistd(p)))

            async def serves(node=node):
                response, body = await client.get(node.url + "/app/")
                return body == b"app v1"
            await wait_until(serves, 90, f"{node.root} serving", proc)

        config = os.path.join(base, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(HAPROXY_CFG.format(socket=socket_path, port=lb_port,
                                       port1=nodes[0].port, port2=nodes[1].port))
        lb = start_haproxy(self, config)
        front = f"http://127.0.0.1:{lb_port}/app/"

        async def both_up():
            seen = set()
            for _ in range(6):
                response, body = await client.get(front)
                seen.add(body)
            return seen == {b"app v1"}
        try:
            await wait_until(both_up, 30, "HAProxy forwarding", None)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{lb.output}") from None

        load = Load(front)
        started = time.monotonic()
        await sleep(0.5)
        source.write("workers/app/src/main.py", py_app("v2"))
        code, out = await run_deploy(source.root, "--rolling", "cluster", "app")
        await sleep(0.5)
        await load.stop()
        seconds = time.monotonic() - started
        self.assertEqual(code, 0, out + lb.output)
        release = release_of(out)
        for name in ("node1", "node2"):
            self.assertIn(f"[{name}] drain: nodes/{name} drained", out)
            self.assertIn(f"[{name}] health: {release} serves", out)
            self.assertIn(f"[{name}] ready: nodes/{name} is UP", out)
        print(f"\nrolling deploy under load: {load.ok + len(load.failures)} requests, "
              f"{len(load.failures)} failed, {seconds:.1f}s; bodies {load.bodies}")
        self.assertEqual(load.failures, [])
        self.assertGreater(load.ok, 50)
        self.assertEqual(set(load.bodies), {b"app v1", b"app v2"})
        for node in nodes:
            self.assertEqual(await body_of(client, node.url + "/app/"), b"app v2")
            self.assertEqual(node.current_release(), release)
