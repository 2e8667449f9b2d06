"""server.proxy_processes: 2 through the real twistd: two proxy processes share the public
port, a SIGHUP swap under load loses no request, a killed proxy process is replaced, and
SIGTERM leaves no process behind."""
from __future__ import annotations

import os

from twisted.internet import defer

from .support import Client, processes_of, sleep, wait_until
from .test_integration import HTML_WORKER, PY_WORKER, EventStream, IntegrationBase, d


def proxy_processes(root: str):
    return [p for p in processes_of(root) if "TQSERVER_PROXY_PROCESS" in p.environ()]


def worker_processes(root: str):
    return [p for p in processes_of(root) if "TQSERVER_PROXY_PROCESS" not in p.environ()]


class Load:
    """A few clients sending GETs back to back, each on a new connection (so they land
    on every proxy process), counting answers and failures."""

    def __init__(self, testcase, url: str, clients: int = 4) -> None:
        self.url = url
        self.running = True
        self.done = 0
        self.failures = []
        self.client = Client(testcase)
        self.loops = [defer.ensureDeferred(self._loop()) for _ in range(clients)]

    async def _loop(self) -> None:
        while self.running:
            try:
                response, body = await self.client.get(self.url)
                if response.code != 200:
                    self.failures.append((response.code, body[:200]))
            except Exception as e:
                self.failures.append(repr(e))
            self.done += 1

    async def stop(self) -> None:
        self.running = False
        await defer.gatherResults(self.loops)


class ProxyProcessesTests(IntegrationBase):
    async def start_fleet(self, *args: str, worker: str = PY_WORKER):
        """twistd with proxy_processes: 2 and one worker, app on /app, serving through
        both proxy processes: (project, twistd, client)."""
        project = self.make_project()
        project.add_server_settings("  proxy_processes: 2\n")
        project.write("workers/app/src/main.py", worker)
        project.write("workers/app/config/worker.yaml", "path: /app\n")
        proc = self.start(project, *args)
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["app"], timeout=60)
        await wait_until(lambda: _async(len(proxy_processes(project.root)) == 2), 20,
                         "two proxy processes", proc)
        return project, proc, client

    def test_two_processes_swap_without_failures(self):
        return d(self._swap())

    async def _swap(self):
        project, proc, client = await self.start_fleet("--mode", "prod")
        [old] = worker_processes(project.root)

        load = Load(self, project.url + "/app/x")
        await sleep(0.5)
        project.write("workers/app/src/main.py", PY_WORKER.replace('"python %s', '"v2 %s'))
        proc.transport.signalProcess("HUP")

        async def new_code_served():
            response, body = await client.get(project.url + "/app/x")
            return body.startswith(b"v2")
        await wait_until(new_code_served, 30, "the new code after SIGHUP", proc)

        async def old_gone():
            return old.pid not in [p.pid for p in worker_processes(project.root)]
        await wait_until(old_gone, 30, "the old instance to be drained", proc)
        await sleep(0.3)
        await load.stop()
        self.assertEqual(load.failures, [])
        self.assertGreater(load.done, 50)

        # Both processes' requests reach the supervisor's /metrics (reported every second).
        async def counted():
            response, metrics = await client.get(project.admin_url + "/metrics")
            line = [x for x in metrics.splitlines()
                    if x.startswith(b'tqserver_requests_total{code="200",worker="app"}')]
            return line and float(line[0].split()[-1]) >= load.done
        await wait_until(counted, 10, "the requests counted in /metrics", proc)
        log = proc.text
        self.assertIn("[proxy 1]", log)
        self.assertIn("[proxy 2]", log)
        self.assertEqual(await stop_and_check(proc, project), 0)

    def test_killed_proxy_process_is_replaced(self):
        return d(self._killed())

    async def _killed(self):
        project, proc, client = await self.start_fleet("--mode", "prod")
        victim = proxy_processes(project.root)[0]
        victim.kill()
        for _ in range(20):       # the other one keeps serving meanwhile
            response, body = await client.get(project.url + "/app/x")
            self.assertEqual(response.code, 200)

        async def replaced():
            pids = [p.pid for p in proxy_processes(project.root)]
            return len(pids) == 2 and victim.pid not in pids
        await wait_until(replaced, 20, "a new proxy process", proc)
        self.assertIn("exited (signal 9); starting another", proc.text)
        response, _ = await client.get(project.url + "/_tqserver/api/status")
        self.assertEqual(response.code, 404)   # relayed to the supervisor: as with one process
        response, _ = await client.get(project.url + "/metrics")
        self.assertEqual(response.code, 404)
        code, status = await client.get_json(project.admin_url + "/_tqserver/api/status")
        self.assertEqual(code, 200)       # the supervisor's own admin listener
        self.assertIn("app", status["workers"])
        self.assertEqual(await stop_and_check(proc, project), 0)


    def test_dev_edit_live_reload_and_server_config(self):
        return d(self._dev())

    async def _dev(self):
        project, proc, client = await self.start_fleet(worker=HTML_WORKER)
        response, body = await client.get(project.url + "/app/")
        self.assertIn(b"TQServer live reload", body)
        self.assertEqual(response.headers.getRawHeaders(b"x-tqserver-worker-name"), [b"app"])

        events = EventStream(project.port, "/_tqserver/events")   # relayed to the supervisor
        self.addCleanup(events.close)
        await events.connected
        await wait_until(events.saw(b"200 OK"), 10, "the event stream", proc)
        load = Load(self, project.url + "/app/x")
        main = os.path.join(project.root, "workers", "app", "src", "main.py")
        with open(main, "w") as f:
            f.write(HTML_WORKER.replace("page %s", "v2 %s"))
        await wait_until(events.saw(b'"swap"'), 30, "a swap event", proc)

        async def served():
            response, body = await client.get(project.url + "/app/x")
            return b"v2 /x" in body
        await wait_until(served, 30, "the edited code", proc)
        await load.stop()
        self.assertEqual(load.failures, [])

        config = os.path.join(project.root, "etc", "server.yaml")
        with open(config, "a") as f:
            f.write("health:\n  path: /healthz\n")

        async def moved():          # the new server.yaml reached the proxy processes too
            response, _ = await client.get(project.url + "/healthz")
            return response.code == 200
        await wait_until(moved, 10, "the new health path", proc)
        self.assertEqual(await stop_and_check(proc, project), 0)


async def stop_and_check(proc, project):
    from .support import stop_twistd
    code = await stop_twistd(proc)
    assert processes_of(project.root) == [], processes_of(project.root)
    return code


async def _async(value):
    return value
