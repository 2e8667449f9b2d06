"""The service tree makeService builds, against the drawing in docs/architecture.md, for
each shape it takes (dev/prod, one process or proxy processes), on a fake reactor; and
what the wiring promises: the proxy reads the state the supervisor publishes."""
from __future__ import annotations

import os
import re

from twisted.application.service import IServiceCollection
from twisted.internet.task import Clock
from twisted.trial import unittest

from tqserver.tap import Options, makeService

from .support import short_dir

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "docs", "architecture.md")
CONDITIONS = {"dev", "one process", "proxy processes", "at start"}
NODE = re.compile(r"^(?:(?P<name>[\w<>-]+): )?(?P<type>[A-Za-z_]\w*)(?:\s|$)")


class FakeReactor(Clock):
    """What makeService asks of a reactor before it runs: time and callWhenRunning."""

    def __init__(self) -> None:
        Clock.__init__(self)
        self.when_running: list = []

    def callWhenRunning(self, f, *args, **kwargs) -> None:
        self.when_running.append((f, args, kwargs))


def drawn_tree() -> list[tuple[int, str | None, str, set[str]]]:
    """(depth, name, type, conditions) of each line of the drawing, in order."""
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Service tree", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    nodes = []
    for line in block.strip("\n").splitlines():
        stripped = line.lstrip("│├└─ \u00a0")
        depth = (len(line) - len(stripped)) // 4
        match = NODE.match(stripped)
        if match is None:
            raise AssertionError(f"cannot read the drawing's line {line!r}")
        conditions = set(re.findall(r"\{([^}]*)\}", stripped))
        unknown = conditions - CONDITIONS
        if unknown:
            raise AssertionError(f"unknown condition(s) {unknown} in {line!r}")
        nodes.append((depth, match["name"], match["type"], conditions))
    return nodes


def expected(dev: bool, processes: int) -> list[tuple[int, str | None, str]]:
    """The drawing, as it should be for this shape of the tree when makeService returns."""
    out = []
    skip_below = None
    for depth, name, type_, conditions in drawn_tree():
        if skip_below is not None and depth > skip_below:
            continue
        skip_below = None
        shown = not (
            ("dev" in conditions and not dev)
            or ("one process" in conditions and processes != 1)
            or ("proxy processes" in conditions and processes == 1)
            or "at start" in conditions
        )
        if shown:
            out.append((depth, name, type_))
        else:
            skip_below = depth
    return out


def actual(service, depth: int = 0) -> list[tuple[int, str | None, str]]:
    out = [(depth, service.name, type(service).__name__)]
    if IServiceCollection.providedBy(service):
        for child in service:
            out.extend(actual(child, depth + 1))
    return out


class ServiceTreeTests(unittest.TestCase):
    def build(self, mode: str, processes: int):
        root = short_dir(self)  # (the default control-plane socket is under it)
        os.makedirs(os.path.join(root, "etc"))
        os.makedirs(os.path.join(root, "workers"))
        with open(os.path.join(root, "etc", "server.yaml"), "w") as f:
            f.write(f"server:\n  proxy_processes: {processes}\n")
        options = Options()
        options.parseOptions(["--root", root, "--mode", mode, "--quiet",
                              "--listen", "tcp:0:interface=127.0.0.1"])
        reactor = FakeReactor()
        return makeService(options, reactor), reactor

    def check(self, mode: str, processes: int) -> None:
        top, _ = self.build(mode, processes)
        self.assertEqual(actual(top), expected(mode == "dev", processes))

    def test_dev_one_process(self) -> None:
        self.check("dev", 1)

    def test_prod_one_process(self) -> None:
        self.check("prod", 1)

    def test_prod_proxy_processes(self) -> None:
        self.check("prod", 2)

    def test_dev_proxy_processes(self) -> None:
        self.check("dev", 2)

    def test_the_drawing_reads(self) -> None:
        nodes = drawn_tree()
        self.assertEqual(nodes[0][:3], (0, None, "TQServer"))
        self.assertIn((2, "<worker>", "WorkerPool", {"at start"}), nodes)

    def test_built_on_the_given_reactor(self) -> None:
        top, reactor = self.build("prod", 1)
        supervisor = top.getServiceNamed("supervisor")
        front = top.getServiceNamed("proxy")
        self.assertIs(supervisor.reactor, reactor)
        self.assertIs(front.reactor, reactor)
        self.assertIs(front.getServiceNamed("deadlines").reactor, reactor)
        self.assertTrue(reactor.when_running)   # the startup heap is frozen once it runs


class WiringTests(unittest.TestCase):
    def setUp(self) -> None:
        self.root = short_dir(self)
        os.makedirs(os.path.join(self.root, "etc"))
        self.config = os.path.join(self.root, "etc", "server.yaml")
        with open(self.config, "w") as f:
            f.write("server:\n  idle_timeout_seconds: 30\n")
        options = Options()
        options.parseOptions(["--root", self.root, "--mode", "prod", "--quiet",
                              "--listen", "tcp:0:interface=127.0.0.1"])
        self.top = makeService(options, FakeReactor())
        self.supervisor = self.top.getServiceNamed("supervisor")
        self.front = self.top.getServiceNamed("proxy")

    def test_the_proxy_reads_what_the_supervisor_publishes(self) -> None:
        self.assertIs(self.front.state, self.supervisor.state)
        self.supervisor.publish_routes()
        self.assertIs(self.front.state.routes, self.supervisor.routes)

    def test_reloaded_idle_timeout_applies_to_new_connections(self) -> None:
        [listener] = [s for s in self.front if type(s).__name__ == "StreamServerEndpointService"]
        site = listener.factory
        self.assertEqual(site.buildProtocol(None).timeOut, 30)
        with open(self.config, "w") as f:
            f.write("server:\n  idle_timeout_seconds: 7\n")
        self.supervisor.reload_config()
        self.assertEqual(site.buildProtocol(None).timeOut, 7)


class ShutdownDelayTests(unittest.TestCase):
    """server.shutdown_delay_seconds: after SIGTERM the node is not ready but everything
    keeps running that long, then the tree stops as before."""

    def tree(self, delay: float):
        from types import SimpleNamespace

        from twisted.application.service import Service

        from tqserver.tap import TQServer

        clock = Clock()
        top = TQServer(observer=None, reactor=clock)
        top.supervisor = SimpleNamespace(  # what the root reads of the Supervisor
            draining=False,
            config=SimpleNamespace(server=SimpleNamespace(shutdown_delay_seconds=delay)))
        child = Service()
        child.setServiceParent(top)
        top.startService()
        return clock, top, child

    def test_not_ready_and_serving_for_the_delay_then_stopped(self) -> None:
        clock, top, child = self.tree(2.0)
        stopped = top.stopService()
        self.assertTrue(top.supervisor.draining)       # /health/ready: 503 draining
        self.assertTrue(child.running)                 # the ports still listen
        self.assertFalse(stopped.called)
        clock.advance(1.9)
        self.assertTrue(child.running)
        clock.advance(0.1)
        self.assertFalse(child.running)
        self.assertTrue(stopped.called)

    def test_a_second_sigterm_cuts_the_delay_short(self) -> None:
        clock, top, child = self.tree(30.0)
        stopped = top.stopService()
        self.assertTrue(child.running)
        top._signalled_again("SIGTERM")            # (what the taken-over handler calls)
        self.assertFalse(child.running)
        self.assertTrue(stopped.called)
        top._signalled_again("SIGTERM")            # a third: already stopping, nothing breaks
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_no_delay_stops_at_once(self) -> None:
        clock, top, child = self.tree(0.0)
        stopped = top.stopService()
        self.assertFalse(child.running)
        self.assertTrue(stopped.called)
        self.assertTrue(top.supervisor.draining)
