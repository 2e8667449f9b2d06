"""A worker.yaml that cannot be applied, with the real `twistd tqserver`: the running worker
keeps serving with its last good configuration, the error is reported with file:line:column
(log, /health, status page, a banner on the worker's pages in dev), and the file is applied
once it is valid. An emptied file (truncated mid-save) does not reset it to defaults."""
from __future__ import annotations

import os

from .support import Client, processes_of, stop_twistd, wait_until
from .test_integration import HTML_WORKER, IntegrationBase, d

GOOD = "path: /app\nenv: {GREETING: hello}\n"
BAD = "path: /app\nenv: {GREETING: hello}\nscaling: {min_workers: zero}\n"
WHERE = os.path.join("workers", "app", "config", "worker.yaml") + ":3:24: scaling.min_workers"


class HeldConfigTests(IntegrationBase):

    async def started(self, mode: str):
        project = self.make_project()
        project.write("workers/app/src/main.py", HTML_WORKER)
        project.write("workers/app/config/worker.yaml", GOOD)
        proc = self.start(project, "--mode", mode)
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["app"], timeout=60)
        return project, proc, client

    async def pids(self, project) -> set:
        return {p.pid for p in processes_of(project.root)}

    async def assert_still_serving(self, project, client, pids) -> None:
        response, body = await client.get(project.url + "/app/x")
        self.assertEqual(response.code, 200, body)
        self.assertEqual(await self.pids(project), pids)   # not restarted either

    async def config_error(self, client, project):
        _code, health = await client.get_json(project.admin_url + "/health")
        return health["workers"].get("app", {}).get("config_error")

    def test_prod_hup(self):
        return d(self._prod_hup())

    async def _prod_hup(self):
        # It was drained and removed: 404 until the file was fixed.
        project, proc, client = await self.started("prod")
        pids = await self.pids(project)
        project.write("workers/app/config/worker.yaml", BAD)
        proc.transport.signalProcess("HUP")

        async def reported():
            return await self.config_error(client, project)
        await wait_until(reported, 20, "the error in /health", proc)
        error = await self.config_error(client, project)
        self.assertTrue(error.startswith(WHERE), error)
        self.assertNotIn(project.root, error)                  # no absolute path in /health
        code, health = await client.get_json(project.admin_url + "/health")
        self.assertEqual((code, health["workers"]["app"]["status"]), (200, "degraded"))
        await self.assert_still_serving(project, client, pids)
        self.assertIn(WHERE, proc.text)                        # the log names it too
        _response, page = await client.get(project.admin_url + "/_tqserver/")
        self.assertIn(b"scaling.min_workers", page)            # and the status page

        project.write("workers/app/config/worker.yaml", "")   # emptied mid-save
        proc.transport.signalProcess("HUP")

        async def emptied():
            error = await self.config_error(client, project)
            return error and "empty" in error
        await wait_until(emptied, 20, "the empty file reported", proc)
        await self.assert_still_serving(project, client, pids)

        project.write("workers/app/config/worker.yaml", GOOD.replace("/app", "/fixed"))
        proc.transport.signalProcess("HUP")

        async def applied():
            response, _ = await client.get(project.url + "/fixed/x")
            return response.code == 200 and await self.config_error(client, project) is None
        await wait_until(applied, 30, "the valid file applied", proc)
        self.assertEqual(await stop_twistd(proc), 0)

    def test_dev_save_and_banner(self):
        return d(self._dev_save())

    async def _dev_save(self):
        project, proc, client = await self.started("dev")
        pids = await self.pids(project)
        _, page = await client.get(project.url + "/app/x")
        self.assertNotIn(b"tqserver-config-error", page)
        project.write("workers/app/config/worker.yaml", BAD)

        async def banner():
            response, page = await client.get(project.url + "/app/x")
            return response.code == 200 and b"tqserver-config-error" in page
        await wait_until(banner, 20, "the banner on the worker's page", proc)
        _response, page = await client.get(project.url + "/app/x")
        self.assertIn(b"scaling.min_workers", page)
        self.assertIn(b"page /x", page)                        # the worker's own page, served
        self.assertEqual(await self.pids(project), pids)

        project.write("workers/app/config/worker.yaml", GOOD + "max_requests: 1000\n")

        async def fixed():
            response, page = await client.get(project.url + "/app/x")
            return response.code == 200 and b"tqserver-config-error" not in page
        await wait_until(fixed, 30, "the banner gone once the file is valid", proc)
        self.assertEqual(await stop_twistd(proc), 0)
