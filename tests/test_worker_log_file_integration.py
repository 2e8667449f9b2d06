"""A worker.yaml's ``logging.log_file`` changed while the server runs (prod, SIGHUP): the
worker's output goes to the new file from its next instance on, with no restart of the
server, and the old file is closed (it no longer grows)."""
from __future__ import annotations

import os

from .support import Client, stop_twistd, wait_until
from .test_integration import IntegrationBase, d
from .test_log_faults_integration import NOISY_WORKER


class LogFileChangeTests(IntegrationBase):
    def test_a_new_log_file_applies_on_hup(self):
        return d(self._change())

    async def _change(self):
        project = self.make_project()
        project.write("workers/app/src/main.py", NOISY_WORKER)
        project.write("workers/app/config/worker.yaml", 'logging: {log_file: "logs/a.log"}\n')
        first = os.path.join(project.root, "logs", "a.log")
        second = os.path.join(project.root, "logs", "b.log")
        proc = self.start(project, "--mode", "prod")
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["app"], timeout=60)
        response, _ = await client.get(project.url + "/app/before")
        self.assertEqual(response.code, 200)
        await wait_until(logged(first, b"/before"), 10, "a.log", proc)

        project.write("workers/app/config/worker.yaml", 'logging: {log_file: "logs/b.log"}\n')
        proc.transport.signalProcess("HUP")

        async def in_the_new_file():
            await client.get(project.url + "/app/after")
            return os.path.isfile(second) and await logged(second, b"/after")()
        await wait_until(in_the_new_file, 30, "the worker logging to b.log", proc)
        size = os.path.getsize(first)
        for i in range(5):
            response, _ = await client.get(project.url + f"/app/more{i}")
            self.assertEqual(response.code, 200)
        await wait_until(logged(second, b"/more4"), 10, "b.log", proc)
        self.assertEqual(os.path.getsize(first), size)
        self.assertEqual(await stop_twistd(proc), 0)


def logged(path: str, text: bytes):
    async def check() -> bool:
        with open(path, "rb") as f:
            return text in f.read()
    return check
