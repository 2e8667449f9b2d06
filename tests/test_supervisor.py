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


class ReconfigureTests(unittest.TestCase):
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
