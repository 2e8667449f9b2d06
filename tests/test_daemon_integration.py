"""The documented commands on a fresh project: the foreground one with the control plane
on its default socket (no run/ yet), the daemon one (no run/, no logs/: twistd failed
writing run/tqserver.pid and pointed at a logs/twistd.log nobody wrote), and the open files
limit raised from a lowered soft limit (it stayed at 1024)."""
from __future__ import annotations

import os
import resource
import shutil

from twisted.trial import unittest

from .support import Client, Project, kill_leftovers, short_dir, stop_twistd, wait_until
from .test_cli_integration import tqserver
from .test_integration import PY_WORKER, IntegrationBase, d

PRLIMIT = shutil.which("prlimit")


class FreshForegroundTests(IntegrationBase):
    """`twistd -n tqserver` (the README's command, and bin/example's) on a fresh clone:
    no run/, the control plane on its default Unix socket under it. (It died with a
    traceback: the socket was listened on before run/ was made.)"""

    def test_foreground_on_a_fresh_project_with_the_default_control_plane(self):
        return d(self._fresh())

    async def _fresh(self):
        root = short_dir(self)
        project = Project(root)
        self.addCleanup(kill_leftovers, root)
        project.write("workers/app/src/main.py", PY_WORKER)
        config = os.path.join(project.root, "etc", "server.yaml")
        with open(config) as f:
            text = f.read()
        with open(config, "w") as f:  # the default admin.listen: unix:run/tqserver-admin.sock
            f.write(text[:text.index("admin:")])
        self.assertFalse(os.path.exists(os.path.join(project.root, "run")))
        proc = self.start(project, make_dirs=False)
        client = Client(self)

        async def healthy():
            _, body = await client.get_json(project.url + "/health")
            return body["status"] == "healthy"
        await wait_until(healthy, 60, "the server healthy", proc)
        sock = os.path.join(project.root, "run", "tqserver-admin.sock")
        admin = Client(self, unix_socket=sock)
        code, status = await admin.get_json("http://localhost/_tqserver/api/status")
        self.assertEqual((code, sorted(status["workers"])), (200, ["app"]))
        code, out, err = await tqserver(project.root, "status")
        self.assertEqual(code, 0, err)
        self.assertIn("app", out)
        self.assertEqual(await stop_twistd(proc), 0)


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
