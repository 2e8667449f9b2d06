"""A worker log that cannot be written, with the real `twistd tqserver`: a worker that logs
on every request keeps answering, its lines are counted and dropped with one warning, and
writing resumes once the file can be written again. (It answered 502 forever: the
supervisor closed the worker's output pipe.)"""
from __future__ import annotations

import os

from .support import Client, stop_twistd, wait_until
from .test_integration import IntegrationBase, d

NOISY_WORKER = """
import sys
from tqserver.worker import serve

def app(environ, start_response):
    print("handling", environ["PATH_INFO"], flush=True)
    print("to stderr too", file=sys.stderr, flush=True)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]

serve(app)
"""


class WorkerLogFaultTests(IntegrationBase):

    def test_unwritable_log_then_writable_again(self):
        return d(self._unwritable())

    async def _unwritable(self):
        project = self.make_project()
        project.write("workers/app/src/main.py", NOISY_WORKER)
        project.write("workers/app/config/worker.yaml", 'logging: {log_file: "logs/app.log"}\n')
        log_path = os.path.join(project.root, "logs", "app.log")
        os.makedirs(log_path)                       # a directory where the file should be
        proc = self.start(project, "--mode", "prod")
        client = Client(self)
        await self.wait_healthy_or_degraded(client, project, proc)
        for i in range(30):
            response, body = await client.get(project.url + f"/app/{i}")
            self.assertEqual((response.code, body), (200, b"ok"), i)
        _, health = await client.get_json(project.admin_url + "/health")
        self.assertIn("cannot write logs/app.log", health["workers"]["app"]["log_error"])
        self.assertEqual(health["workers"]["app"]["status"], "degraded")
        response, metrics = await client.get(project.admin_url + "/metrics")
        line = [m for m in metrics.splitlines()
                if m.startswith(b'tqserver_log_lines_dropped_total{log="worker:app"}')]
        self.assertTrue(line and float(line[0].split()[-1]) >= 60, metrics[-2000:])
        self.assertEqual(proc.text.count("cannot write logs/app.log"), 1)

        os.rmdir(log_path)                          # fixed

        async def written():
            await client.get(project.url + "/app/again")
            return os.path.isfile(log_path) and b"/again" in open(log_path, "rb").read()
        await wait_until(written, 20, "the log written again", proc)
        self.assertIn("writing logs/app.log again", proc.text)
        _, health = await client.get_json(project.admin_url + "/health")
        self.assertIsNone(health["workers"]["app"]["log_error"])
        self.assertEqual(await stop_twistd(proc), 0)

    async def wait_healthy_or_degraded(self, client, project, proc):
        async def serving():
            _, body = await client.get_json(project.admin_url + "/health")
            return body["workers"].get("app", {}).get("instances", 0) >= 1
        await wait_until(serving, 60, "the worker serving", proc)
