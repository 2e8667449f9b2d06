"""The documented daemon command on a fresh project (no run/, no logs/: twistd failed
writing run/tqserver.pid and pointed at a logs/twistd.log nobody wrote), and the open files
limit raised from a lowered soft limit (it stayed at 1024)."""
from __future__ import annotations

import os
import resource
import shutil

from twisted.trial import unittest

from .support import Client
from .test_integration import PY_WORKER, IntegrationBase, d

PRLIMIT = shutil.which("prlimit")


class FreshDaemonTests(IntegrationBase):

    def test_daemon_on_a_fresh_project(self):
        return d(self._fresh())

    async def _fresh(self):
        if PRLIMIT is None:
            raise unittest.SkipTest("prlimit (util-linux) is not installed")
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard <= 256:
            raise unittest.SkipTest(f"the hard open files limit is {hard}: nothing to raise")
        project = self.make_project()
        project.write("workers/app/src/main.py", PY_WORKER)
        project.write("workers/app/config/worker.yaml", "path: /app\n")
        for name in ("run", "logs"):
            self.assertFalse(os.path.exists(os.path.join(project.root, name)))
        self.start(project, "--mode", "prod", daemon=True, make_dirs=False,
                   prefix=[PRLIMIT, "--nofile=256:"])
        pidfile = os.path.join(project.root, "run", "tqserver.pid")
        logfile = os.path.join(project.root, "logs", "twistd.log")

        pid = await self.daemon_started(pidfile)
        client = Client(self)
        await self.wait_healthy(client, project, None, ["app"], timeout=60)
        # twistd's --logfile is the daemon's server log: where a failed start is told
        text = open(logfile).read()
        self.assertIn("TQServer starting in prod mode", text)
        self.assertIn(f"open files limit (RLIMIT_NOFILE): {hard} (soft, was 256)", text)
        with open(f"/proc/{pid}/limits") as f:
            [line] = [x for x in f if x.startswith("Max open files")]
        self.assertEqual(line.split()[3:5], [str(hard), str(hard)])
        await self.stop_daemon(pid, pidfile)
