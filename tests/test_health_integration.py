"""/health, /health/<worker>, /health/live, /health/ready and /metrics of a real twistd
where one worker's build is broken (its requirements name a package that is not there)."""
from __future__ import annotations

import os
import shutil

from twisted.internet import defer, protocol, reactor, utils
from twisted.trial import unittest

from .front_proxies import require_haproxy, start_haproxy
from .support import (
    Client,
    Project,
    free_port,
    kill_leftovers,
    sleep,
    spawn_twistd,
    stop_twistd,
    wait_until,
)
from .test_integration import PY_WORKER, d
from .test_proxy import RawClient

# The good worker takes a while before it listens: /health/ready is seen 503 before its
# first healthy probe.
SLOW_WORKER = "import time\ntime.sleep(3)\n" + PY_WORKER


def broken_build(project: Project, name: str) -> None:
    """A Python worker whose build fails at once, offline: a requirement that is a
    directory which does not exist."""
    project.write(f"workers/{name}/src/main.py", PY_WORKER)
    project.write(f"workers/{name}/config/worker.yaml", f"path: /{name}\n")
    project.write(f"workers/{name}/requirements.txt", "./no-such-package-here\n")


class HealthBase(unittest.TestCase):
    timeout = 180

    def project(self, good: str = PY_WORKER, server: str = "", **settings) -> Project:
        project = Project(os.path.abspath(self.mktemp()), **settings)
        self.addCleanup(kill_leftovers, project.root)
        if server:
            project.add_server_settings(server)
            with open(os.path.join(project.root, "etc", "server.yaml"), "a") as f:
                f.write("health:\n  degraded_status: 503\n")
        project.write("workers/good/src/main.py", good)
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
        response, scrape = await client.get(project.admin_url + "/metrics")
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


# A worker whose /slow takes 2 s: a request in flight that a shutdown drains.
SLOW_PATH_WORKER = PY_WORKER.replace(
    "def app(environ, start_response):\n",
    "def app(environ, start_response):\n"
    "    if environ['PATH_INFO'] == '/slow':\n"
    "        import time; time.sleep(2)\n")


class KeptAlive(RawClient):
    """One client connection kept open across requests (a load balancer's)."""

    async def get(self, path: str, proc) -> bytes:
        """The next response's head and body."""
        self.data = b""
        self.transport.write(b"GET %s HTTP/1.1\r\nHost: lb\r\n\r\n" % path.encode())

        async def whole():
            return self.response_complete()
        await wait_until(whole, 10, f"the answer to {path}", proc)
        return self.data


class ShutdownBase(HealthBase):
    async def ready_in_prod(self, **project_kw):
        """(project, twistd, client) once /health/ready answers 200: both workers good."""
        project = self.project(**project_kw)
        os.remove(os.path.join(project.root, "workers", "broken", "requirements.txt"))
        proc = self.start(project, "--mode", "prod")
        client = Client(self)

        async def ready():
            response, _ = await client.get(project.url + "/health/ready")
            return response.code == 200
        await wait_until(ready, 60, "/health/ready 200", proc)
        return project, proc, client


class DrainingTests(ShutdownBase):
    def test_not_ready_while_draining_for_shutdown(self):
        return d(self._draining())

    async def _draining(self):
        project, proc, client = await self.ready_in_prod(good=SLOW_PATH_WORKER)
        lb = await protocol.ClientCreator(reactor, KeptAlive).connectTCP(
            "127.0.0.1", project.port)
        self.addCleanup(lambda: lb.closed or lb.transport.loseConnection())
        self.assertIn(b" 200 ", (await lb.get("/health/ready", proc)).split(b"\r\n")[0])
        slow = defer.ensureDeferred(client.get(project.url + "/good/slow"))
        await sleep(0.5)                               # (in flight at the worker)
        proc.transport.signalProcess("TERM")
        await sleep(0.3)
        answer = await lb.get("/health/ready", proc)   # the balancer's next check
        self.assertIn(b" 503 ", answer.split(b"\r\n")[0], answer)
        self.assertIn(b'"draining"', answer)
        response, body = await slow                    # and what was in flight finished
        self.assertEqual((response.code, body), (200, b"python /slow /good"))
        self.assertEqual(await stop_twistd(proc), 0)


class ShutdownDelayTests(ShutdownBase):
    def test_not_ready_but_serving_for_the_delay_then_stopped(self):
        return d(self._delay())

    async def _delay(self):
        project, proc, client = await self.ready_in_prod(
            server="  shutdown_delay_seconds: 1.5\n")
        proc.transport.signalProcess("TERM")
        await sleep(0.3)
        # New connections still get through: not ready, yet serving.
        code, body = await client.get_json(project.url + "/health/ready")
        self.assertEqual((code, body["status"]), (503, "draining"))
        response, body = await client.get(project.url + "/good/x")
        self.assertEqual((response.code, body), (200, b"python /x /good"))
        self.assertFalse(proc.done)
        self.assertEqual(await stop_twistd(proc), 0)      # then it stops, cleanly
        self.assertIn("serving on for 1.5 s (server.shutdown_delay_seconds)", proc.text)
        self.assertIn("SIGTERM again: stopping now", proc.text)   # stop_twistd's SIGTERM
        self.assertNotIn("Traceback", proc.text)


class HealthContractTests(HealthBase):
    async def code(self, client: Client, url: str) -> int:
        response, _ = await client.get(url)
        return response.code

    def test_a_broken_worker_live_ready_and_per_worker(self):
        return d(self._contract())

    async def _contract(self):
        project = self.project(good=SLOW_WORKER)
        proc = self.start(project, "--mode", "prod")
        client = Client(self)
        url = project.url + "/health"

        async def live():
            return await self.code(client, url + "/live") == 200
        await wait_until(live, 30, "/health/live", proc)
        # the good worker sleeps before it listens: nothing has passed a probe yet
        code, ready = await client.get_json(url + "/ready")
        self.assertEqual((code, ready["status"]), (503, "starting"), ready)
        self.assertEqual(ready["waiting_for"], ["broken", "good"])
        self.assertEqual(await self.code(client, url + "/good"), 503)

        health = await self.settled(client, project, proc)
        self.assertEqual(health["status"], "degraded")
        self.assertEqual(await self.code(client, url), 200)         # degraded_status: 200
        code, good = await client.get_json(url + "/good")
        self.assertEqual((code, good["worker"], good["ready"]), (200, "good", True))
        code, broken = await client.get_json(url + "/broken")
        self.assertEqual((code, broken["status"], broken["ready"]), (503, "failed", False))
        self.assertNotIn("last_build", broken)   # prod: the public port shows no detail
        _, broken = await client.get_json(project.admin_url + "/health/broken")
        self.assertFalse(broken["last_build"]["ok"])   # the admin listener does
        self.assertEqual(await self.code(client, url + "/worker/good"), 200)
        self.assertEqual(await self.code(client, url + "/nope"), 404)
        response, _ = await client.get(project.url + "/broken/x")
        self.assertEqual(response.code, 503)
        # broken has never passed a probe: the node is not ready
        code, ready = await client.get_json(url + "/ready")
        self.assertEqual((code, ready["waiting_for"]), (503, ["broken"]))

        # its build fixed and reloaded: every worker served, the node is ready
        os.remove(os.path.join(project.root, "workers", "broken", "requirements.txt"))
        proc.transport.signalProcess("HUP")

        async def ready_now():
            return await self.code(client, url + "/ready") == 200
        await wait_until(ready_now, 60, "/health/ready 200 once broken is fixed", proc)
        self.assertEqual(await self.code(client, url + "/broken"), 200)
        code, health = await client.get_json(url)
        self.assertEqual((code, health["status"]), (200, "healthy"))
        self.assertEqual(await stop_twistd(proc), 0)

    def test_degraded_503_through_proxy_processes(self):
        return d(self._through_proxy_processes())

    async def _through_proxy_processes(self):
        project = self.project(server="  proxy_processes: 2\n")
        proc = self.start(project, "--mode", "prod")
        client = Client(self)
        url = project.url + "/health"
        await self.settled(client, project, proc)
        # several requests: each may land on either proxy process, which relays them
        for _ in range(4):
            code, health = await client.get_json(url)
            self.assertEqual((code, health["status"]), (503, "degraded"))
            self.assertEqual(await self.code(client, url + "/good"), 200)
            self.assertEqual(await self.code(client, url + "/broken"), 503)
            self.assertEqual(await self.code(client, url + "/nope"), 404)
            self.assertEqual(await self.code(client, url + "/live"), 200)
            self.assertEqual(await self.code(client, url + "/ready"), 503)
        self.assertEqual(await stop_twistd(proc), 0)



# DEPLOYMENT.md's route-aware example, one node: a backend per worker, each checking it.
HAPROXY_CFG = """defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend www
    bind 127.0.0.1:{port}
    use_backend good if {{ path_beg /good }}
    use_backend broken if {{ path_beg /broken }}
    default_backend whole
backend good
    option httpchk GET /health/good
    http-check expect status 200
    default-server inter 200ms fall 2 rise 1
    server node1 127.0.0.1:{node} check
backend broken
    option httpchk GET /health/broken
    http-check expect status 200
    default-server inter 200ms fall 2 rise 1
    server node1 127.0.0.1:{node} check
backend whole
    option httpchk GET /health
    http-check expect status 200
    default-server inter 200ms fall 2 rise 1
    server node1 127.0.0.1:{node} check
listen stats
    bind 127.0.0.1:{stats}
    stats enable
    stats uri /stats
"""


class RouteAwareBalancerTests(HealthBase):
    """A real HAProxy with `option httpchk GET /health/<worker>` per backend: the broken
    worker's backend has the node DOWN, the good one's UP (and plain /health, at the
    default degraded_status 200, keeps it UP: the node stays in rotation)."""

    def setUp(self) -> None:
        require_haproxy()

    def test_per_worker_checks(self):
        return d(self._per_worker())

    async def _per_worker(self):
        project = self.project()
        proc = self.start(project, "--mode", "prod")
        client = Client(self)
        await self.settled(client, project, proc)
        port, stats = free_port(), free_port()
        config = self.mktemp()
        with open(config, "w") as f:
            f.write(HAPROXY_CFG.format(port=port, node=project.port, stats=stats))
        lb = start_haproxy(self, config)
        states = {}

        async def checked():
            _, body = await client.get(f"http://127.0.0.1:{stats}/stats;csv")
            rows = [line.split(",") for line in body.decode().splitlines()]
            header = rows[0]
            status = header.index("status")
            states.clear()
            states.update({row[0]: row[status] for row in rows[1:]
                           if len(row) > status and row[1] == "node1"})
            return states == {"good": "UP", "broken": "DOWN", "whole": "UP"}
        try:
            await wait_until(checked, 30, "HAProxy's checks settled", proc)
        except AssertionError as e:
            raise AssertionError(f"{e}\nstates {states}\n{lb.output}") from None
        response, body = await client.get(f"http://127.0.0.1:{port}/good/x")
        self.assertEqual((response.code, body), (200, b"python /x /good"))
        response, body = await client.get(f"http://127.0.0.1:{port}/broken/x")
        self.assertEqual(response.code, 503)
        self.assertIn(b"No server is available", body)      # HAProxy's own: not sent there
        await lb.stop()
        self.assertEqual(await stop_twistd(proc), 0)
