"""/health, /health/<worker>, /health/live, /health/ready and /metrics of a real twistd
where one worker's build is broken (its requirements name a package that is not there)."""
from __future__ import annotations

import os
import shutil

from twisted.internet import utils
from twisted.trial import unittest

from .support import Client, Project, kill_leftovers, spawn_twistd, stop_twistd, wait_until
from .test_integration import PY_WORKER, d


def broken_build(project: Project, name: str) -> None:
    """A Python worker whose build fails at once, offline: a requirement that is a
    directory which does not exist."""
    project.write(f"workers/{name}/src/main.py", PY_WORKER)
    project.write(f"workers/{name}/config/worker.yaml", f"path: /{name}\n")
    project.write(f"workers/{name}/requirements.txt", "./no-such-package-here\n")


class HealthBase(unittest.TestCase):
    timeout = 180

    def project(self, **settings) -> Project:
        project = Project(os.path.abspath(self.mktemp()), **settings)
        self.addCleanup(kill_leftovers, project.root)
        project.write("workers/good/src/main.py", PY_WORKER)
        project.write("workers/good/config/worker.yaml", "path: /good\n")
        broken_build(project, "broken")
        return project

    def start(self, project: Project, *args):
        proc = spawn_twistd(project, *args)
        self.addCleanup(lambda: None if proc.done else d(stop_twistd(proc)))
        return proc

    async def settled(self, client: Client, project: Project, proc) -> dict:
        """/health once good is healthy and broken's build has failed."""
        last = {}

        async def both():
            _, body = await client.get_json(project.url + "/health")
            last.update(body)
            workers = body["workers"]
            return (workers["good"]["status"] == "healthy"
                    and workers["broken"]["status"] == "failed")
        await wait_until(both, 120, f"good healthy and broken failed (last {last})", proc)
        return last


class MetricsScrapeTests(HealthBase):
    def test_promtool_accepts_a_real_scrape_and_a_worker_without_instances_reads_0(self):
        return d(self._scrape())

    async def _scrape(self):
        promtool = shutil.which("promtool")
        if promtool is None:
            raise unittest.SkipTest("promtool is not installed (bin/install-toolchains "
                                    "--only promtool: Debian's prometheus package)")
        project = self.project()
        proc = self.start(project)
        client = Client(self)
        await self.settled(client, project, proc)
        await client.get(project.url + "/good/x")
        response, scrape = await client.get(project.url + "/metrics")
        self.assertEqual(response.code, 200)
        for line in [b'tqserver_worker_instances{state="ready",worker="broken"} 0.0',
                     b'tqserver_worker_instances{state="starting",worker="broken"} 0.0',
                     b'tqserver_worker_instances{state="ready",worker="good"} 1.0',
                     b'tqserver_worker_instances{state="draining",worker="good"} 0.0',
                     b'tqserver_requests_in_flight{worker="broken"} 0.0',
                     b'tqserver_worker_healthy{worker="broken"} 0.0',
                     b'tqserver_worker_healthy{worker="good"} 1.0',
                     b'tqserver_requests_total{code="200",worker="good"} 1.0']:
            self.assertIn(line, scrape)
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(scrape)
        out, err, code = await utils.getProcessOutputAndValue(
            "/bin/sh", ["-c", 'exec "$0" check metrics < "$1"', promtool, path])
        self.assertEqual(code, 0, (out + err).decode())
        self.assertEqual(await stop_twistd(proc), 0)
