"""Supervisor.sync_workers on a fake reactor: what a changed worker.yaml does to a pool."""
from __future__ import annotations

import os
import sys

from twisted.trial import unittest

from tqserver.config.server import default_server_config
from tqserver.proxy.state import ProxyState
from tqserver.supervise import instance as process
from tqserver.supervise.supervisor import Supervisor

from .fakes import FakeProcessReactor, GroupSignals


class SupervisorTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        self.worker = os.path.join(self.root, "workers", "app")
        os.makedirs(os.path.join(self.worker, "config"))
        os.makedirs(os.path.join(self.worker, "src"))
        with open(os.path.join(self.worker, "src", "main.py"), "w") as f:
            f.write("print('hi')\n")
        self.reactor = FakeProcessReactor()
        self.patch(process, "signal_group", GroupSignals(self.reactor))
        config_path = os.path.join(self.root, "etc", "server.yaml")
        self.sup = Supervisor(self.reactor, self.root, config_path,
                              ProxyState("dev", default_server_config()))

    def write_config(self, text: str) -> None:
        with open(os.path.join(self.worker, "config", "worker.yaml"), "w") as f:
            f.write(text)


class ReconfigureTests(SupervisorTestCase):
    def test_a_new_type_takes_full_effect(self) -> None:
        self.write_config('type: command\ncommand: ["./serve", "{port}"]\n')
        self.assertEqual(self.sup.sync_workers(), {"app": "added"})
        pool = self.sup.pools["app"]
        self.assertEqual(pool.runtime.type, "command")
        self.write_config('type: python\nlog_file: "logs/other_{name}.log"\n')
        self.assertEqual(self.sup.sync_workers(), {"app": "reconfigured"})
        self.assertEqual((pool.spec.type, pool.runtime.type), ("python", "python"))
        # The instance the redeploy started runs the new runtime, not the old command.
        spawned = self.reactor.spawned[-1]
        self.assertIn(os.path.join(self.worker, "src", "main.py"), spawned.argv)
        self.assertNotIn("./serve", spawned.argv)
        self.assertEqual(spawned.env["WORKER_TYPE"], "python")
        self.assertIn(sys.executable, spawned.argv)


class HeldConfigTests(SupervisorTestCase):
    """A worker.yaml that cannot be applied leaves the running worker as it is; the file is
    applied once it is valid."""

    def start(self) -> None:
        self.write_config("path: /app\nenv: {V: one}\n")
        self.assertEqual(self.sup.sync_workers(), {"app": "added"})
        self.pool = self.sup.pools["app"]
        self.spawned = len(self.reactor.spawned)

    def assertKept(self, fragment: str) -> None:
        # It was drained, removed and 404 until fixed.
        self.assertIs(self.sup.pools.get("app"), self.pool)
        self.assertEqual(self.pool.spec.config.env, {"V": "one"})
        self.assertEqual(self.sup.routes.match(b"/app/x")[1], self.pool)
        self.assertEqual(len(self.reactor.spawned), self.spawned)   # nothing restarted
        described = self.pool.describe()["config_error"]
        self.assertIn(fragment, described)
        self.assertTrue(described.startswith(os.path.join("workers", "app", "config",
                                                          "worker.yaml")), described)

    def test_invalid_file_keeps_the_last_good_configuration(self) -> None:
        self.start()
        self.write_config("path: /app\nenv: {V: one}\nscaling: {min_workers: zero}\n")
        self.assertEqual(self.sup.sync_workers(), {"app": "kept"})
        self.assertKept("worker.yaml:3:24: scaling.min_workers: expected an integer")
        self.write_config("path: /app\nenv: {V: two}\n")                 # fixed: applied
        self.assertEqual(self.sup.sync_workers(), {"app": "reconfigured"})
        self.assertEqual(self.pool.spec.config.env, {"V": "two"})
        self.assertIsNone(self.pool.describe()["config_error"])

    def test_broken_yaml(self) -> None:
        self.start()
        self.write_config("path: /app\nenv: {V: one\n")
        self.assertEqual(self.sup.sync_workers(), {"app": "kept"})
        self.assertKept("worker.yaml:3:")

    def test_emptied_file_does_not_reset_to_defaults(self) -> None:
        self.start()
        self.write_config("")
        self.assertEqual(self.sup.sync_workers(), {"app": "kept"})
        self.assertKept("the file is empty")
        self.write_config("path: /app\nenv: {V: one}\n")                 # saved in full
        self.assertEqual(self.sup.sync_workers(), {})
        self.assertIsNone(self.pool.describe()["config_error"])

    def test_empty_file_of_a_new_worker_means_defaults(self) -> None:
        self.write_config("  \n")
        self.assertEqual(self.sup.sync_workers(), {"app": "added"})
        self.assertEqual(self.sup.pools["app"].spec.route, "/app")

    def test_route_taken_keeps_both(self) -> None:
        self.start()
        other = os.path.join(self.root, "workers", "zzz")
        os.makedirs(os.path.join(other, "src"))
        with open(os.path.join(other, "src", "main.py"), "w") as f:
            f.write("print('hi')\n")
        self.assertEqual(self.sup.sync_workers(), {"zzz": "added"})
        # app's file breaks while zzz asks for the route app keeps serving
        self.write_config("path: [\n")
        os.makedirs(os.path.join(other, "config"))
        with open(os.path.join(other, "config", "worker.yaml"), "w") as f:
            f.write("path: /app\n")
        actions = self.sup.sync_workers()
        self.assertEqual(actions, {"app": "kept", "zzz": "kept"})
        self.assertEqual(self.sup.routes.match(b"/app/x")[1], self.pool)
        self.assertEqual(self.sup.routes.match(b"/zzz")[1].name, "zzz")
        self.assertIn("already served by worker 'app'",
                      self.sup.pools["zzz"].describe()["config_error"])

    def test_a_held_worker_is_not_redeployed_by_a_reload(self) -> None:
        self.start()
        self.write_config("scaling: {min_workers: -1}\n")
        self.assertEqual(self.sup.reload("SIGHUP"), {"app": "kept"})
        self.assertEqual(len(self.reactor.spawned), self.spawned)
