"""Log rotation with the real `logrotate` and the shipped etc/logrotate.d/tqserver, against
a real `twistd tqserver` daemon: SIGUSR1 (logrotate's postrotate) reopens the server log
and every worker log, the daemon and its workers live on, lines after the rotation land in
the new files and no line is lost. (SIGUSR1 killed the daemon and orphaned its workers.)"""
from __future__ import annotations

import os
import re
import shutil

import psutil
from twisted.internet import utils
from twisted.trial import unittest

from .support import REPO, Client, wait_until
from .test_integration import IntegrationBase, _alive, d

LOGROTATE = shutil.which("logrotate") or "/usr/sbin/logrotate"
CONF = os.path.join(REPO, "etc", "logrotate.d", "tqserver")

NOISY_WORKER = """
from tqserver.worker import serve

def app(environ, start_response):
    print("handling", environ["PATH_INFO"], flush=True)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]

serve(app)
"""


def lines_with(path: str, needle: str) -> int:
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8", errors="replace") as f:
        word = re.compile(re.escape(needle) + r"(?![\w-])")
        return sum(1 for line in f if word.search(line))


class LogrotateTests(IntegrationBase):

    def setUp(self):
        if not os.access(LOGROTATE, os.X_OK):
            raise unittest.SkipTest("logrotate is not installed (apt-get install logrotate)")

    def test_forced_rotation_reopens_every_log(self):
        return d(self._rotation())

    async def _rotation(self):
        project = self.make_project()
        project.write("workers/app/src/main.py", NOISY_WORKER)
        project.write("workers/app/config/worker.yaml",
                      'path: /app\nlogging: {log_file: "logs/worker_app.log"}\n')
        conf = project.write("logrotate.conf", open(CONF).read().replace("/srv/site", project.root))
        state = os.path.join(project.root, "logrotate.state")
        self.start(project, "--mode", "prod", daemon=True)
        pidfile = os.path.join(project.root, "run", "tqserver.pid")

        pid = await self.daemon_started(pidfile)
        client = Client(self)
        await self.wait_healthy(client, project, None, ["app"], timeout=60)
        [worker] = [p for p in psutil.Process(pid).children() if p.is_running()]

        for i in range(20):
            response, _ = await client.get(project.url + f"/app/before-{i}")
            self.assertEqual(response.code, 200)
        # the documented daemon command: --logfile logs/twistd.log is the server log
        server_log = os.path.join(project.root, "logs", "twistd.log")
        worker_log = os.path.join(project.root, "logs", "worker_app.log")
        # made by the daemon under twistd's umask 077: still server.log_file_mode (0640)
        self.assertEqual([os.stat(p).st_mode & 0o777 for p in (server_log, worker_log)],
                         [0o640, 0o640])
        out, err, code = await utils.getProcessOutputAndValue(
            LOGROTATE, ["-f", "-s", state, conf], env=dict(os.environ))
        self.assertEqual(code, 0, (out + err).decode())
        for path in (server_log, worker_log):
            self.assertTrue(os.path.exists(path + ".1"), os.listdir(os.path.dirname(path)))

        async def reopened():
            return lines_with(server_log, "SIGUSR1:") == 1
        await wait_until(reopened, 20, "the server log reopened")
        for i in range(20):
            response, _ = await client.get(project.url + f"/app/after-{i}")
            self.assertEqual(response.code, 200)

        self.assertTrue(_alive(pid))
        self.assertEqual(worker.ppid(), pid)           # not orphaned
        self.assertEqual(int(open(pidfile).read()), pid)

        async def worker_lines_in():
            return lines_with(worker_log, "/after-19") == 1
        await wait_until(worker_lines_in, 20, "the worker's last line in its new log")
        for path in (server_log, worker_log):
            for i in range(20):
                # none lost, none twice; after the reopen, only in the new file
                self.assertEqual(lines_with(path, f"/before-{i}")
                                 + lines_with(path + ".1", f"/before-{i}"), 1, (path, i))
                self.assertEqual((lines_with(path, f"/after-{i}"),
                                  lines_with(path + ".1", f"/after-{i}")), (1, 0), (path, i))
            self.assertEqual(os.stat(path).st_mode & 0o777, 0o640)

        await self.stop_daemon(pid, pidfile)
