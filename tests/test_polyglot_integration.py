"""The real thing with Bun, Kotlin and command workers: `twistd tqserver` on loopback with
the example workers, swaps under constant load, a Kotlin compile error, `bun install`.

kotlinc takes ~10 s per run, so the example is compiled once per test run and projects get
a copy with its mtimes, which the runtime recognises as up to date (the routing test checks
that nothing was recompiled); the tests about compiling compile inside twistd.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from io import BytesIO
from typing import Dict, List, Optional

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from tqserver.config.discovery import discover
from tqserver.runtimes import ToolchainMissing
from tqserver.runtimes.bun import BunRuntime
from tqserver.runtimes.kotlin import KotlinRuntime
from tqserver.supervise.build import run_build

from .support import REPO, Client, Project, processes_of, sleep, stop_twistd, wait_until
from .test_integration import IntegrationBase, d

KOTLIN_GREETING = b"Hello from Kotlin!\n"
KOTLIN_SOURCE = os.path.join("workers", "kotlin", "src", "Main.kt")


def require_bun() -> None:
    try:
        BunRuntime().bun()
    except ToolchainMissing as e:
        raise unittest.SkipTest(str(e)) from None


def require_kotlin() -> None:
    try:
        KotlinRuntime().java()
        KotlinRuntime().kotlinc()
    except ToolchainMissing as e:
        raise unittest.SkipTest(str(e)) from None


_prebuilt: Dict[str, str] = {}


async def prebuilt_kotlin() -> str:
    """workers/kotlin built once per test run (in trial's temp directory) by the runtime's
    own build steps; returns the worker directory."""
    if "kotlin" not in _prebuilt:
        workers = os.path.abspath(os.path.join("prebuilt", "workers"))
        shutil.rmtree(workers, ignore_errors=True)
        shutil.copytree(os.path.join(REPO, "workers", "kotlin"),
                        os.path.join(workers, "kotlin"), ignore=shutil.ignore_patterns("bin"))
        [spec] = discover(workers, "prod").workers
        result = await run_build(reactor, KotlinRuntime().build_steps(spec))
        if not result.ok:
            raise AssertionError("building the kotlin example failed:\n" + result.output)
        _prebuilt["kotlin"] = spec.directory
    return _prebuilt["kotlin"]


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


async def request(client: Client, method: bytes, url: str, body: Optional[bytes] = None):
    """One request with an optional JSON body; (response, body bytes)."""
    headers = Headers({"content-type": ["application/json"]} if body is not None else {})
    producer = FileBodyProducer(BytesIO(body)) if body is not None else None
    d_ = client.agent.request(method, url.encode(), headers, producer)
    d_.addTimeout(10, reactor)
    response = await d_
    return response, await readBody(response)


class Load:
    """``clients`` keep-alive clients requesting ``url`` back to back until stopped; every
    answer is counted, anything but a 2xx is a failure."""

    def __init__(self, testcase: unittest.TestCase, url: str, clients: int = 3) -> None:
        self.url = url.encode()
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = clients
        self.agent = Agent(reactor, pool=self.pool)
        self.bodies: Counter = Counter()
        self.failures: List[str] = []
        self.running = True
        self.loops = [defer.ensureDeferred(self._loop()) for _ in range(clients)]
        testcase.addCleanup(self.pool.closeCachedConnections)
        testcase.addCleanup(lambda: d(self.stop()))

    async def _loop(self) -> None:
        while self.running:
            try:
                pending = self.agent.request(b"GET", self.url)
                pending.addTimeout(15, reactor)
                response = await pending
                body = await readBody(response)
            except Exception as e:
                self.failures.append(repr(e))
                await sleep(0.01)
                continue
            if 200 <= response.code < 300:
                self.bodies[body] += 1
            else:
                self.failures.append(f"{response.code} {body[:300]!r}")

    async def stop(self) -> None:
        self.running = False
        await defer.gatherResults(self.loops)

    @property
    def total(self) -> int:
        return sum(self.bodies.values()) + len(self.failures)


class PolyglotBase(IntegrationBase):
    async def worker_state(self, client: Client, project: Project, name: str) -> dict:
        # the full detail (the public /health in prod has no last_build)
        code, health = await client.get_json(project.admin_url + "/health")
        return health["workers"][name]

    async def swap_under_load(self, client: Client, project: Project, proc, load: Load,
                              new_body: bytes, edit, enough: int = 20) -> None:
        """With the load answered ``enough`` times, edit(), SIGHUP, and keep the load
        running until the old instance is gone and the new body was served ``enough``
        times; then no request may have failed."""
        async def answered():
            return load.total >= enough
        await wait_until(answered, 30, "the load to run", proc)
        old = {p.pid for p in processes_of(project.root)}
        edit()
        proc.transport.signalProcess("HUP")

        async def new_code_served():
            return new_body in load.bodies
        await wait_until(new_code_served, 90, "the new code under load", proc)

        async def old_gone_and_new_served():
            return (not old & {p.pid for p in processes_of(project.root)}
                    and load.bodies[new_body] >= enough)
        await wait_until(old_gone_and_new_served, 30,
                         "the old instance to be drained and stopped", proc)
        await load.stop()
        self.assertEqual(load.failures, [])


class SiteTests(PolyglotBase):
    """Routing to all three runtimes, and nothing left behind."""

    def setUp(self):
        require_bun()
        require_kotlin()

    def test_routes_to_bun_kotlin_and_command_workers(self):
        return d(self._routes())

    async def _routes(self):
        project = self.make_project()
        project.copy_worker("api")
        project.copy_worker("echo")
        shutil.copytree(await prebuilt_kotlin(), os.path.join(project.root, "workers", "kotlin"))
        proc = self.start(project)
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["api", "kotlin", "echo"], timeout=180)
        api = project.url + "/api"

        # Bun: a CRUD round trip.
        response, body = await request(client, b"POST", api + "/items", b'{"name": "widget"}')
        self.assertEqual(response.code, 201, body)
        item = json.loads(body)
        self.assertEqual((item["id"], item["name"]), (1, "widget"))
        self.assertEqual(response.headers.getRawHeaders("location"), ["/api/items/1"])
        self.assertEqual(response.headers.getRawHeaders("x-tqserver-worker-type"), ["bun"])
        response, body = await request(client, b"GET", api + "/items")
        self.assertEqual((response.code, [i["name"] for i in json.loads(body)]),
                         (200, ["widget"]))
        response, body = await request(client, b"PUT", api + "/items/1", b'{"name": "gadget"}')
        self.assertEqual((response.code, json.loads(body)["name"]), (200, "gadget"))
        response, body = await request(client, b"GET", api + "/items/1")
        self.assertEqual((response.code, json.loads(body)["name"]), (200, "gadget"))
        response, body = await request(client, b"PUT", api + "/items/1", b'{"name": ')
        self.assertEqual(response.code, 400)
        self.assertIn("bad JSON", json.loads(body)["error"])
        response, body = await request(client, b"POST", api + "/items", b'[1, 2]')
        self.assertEqual(response.code, 400)
        response, body = await request(client, b"PUT", api + "/items/7", b'{}')
        self.assertEqual(response.code, 404)
        response, body = await request(client, b"DELETE", api + "/items/1")
        self.assertEqual((response.code, body), (204, b""))
        for method in (b"GET", b"DELETE"):
            response, body = await request(client, method, api + "/items/1")
            self.assertEqual(response.code, 404, method)
        response, body = await request(client, b"GET", api + "/bench")
        self.assertEqual((response.code, body), (200, b"Hello, World!"))

        # Kotlin: served from the prebuilt jar, not recompiled.
        response, body = await client.get(project.url + "/kotlin/")
        self.assertEqual((response.code, body), (200, KOTLIN_GREETING))
        self.assertEqual(response.headers.getRawHeaders("x-tqserver-worker-type"), ["kotlin"])
        code, info = await client.get_json(project.url + "/kotlin/info")
        self.assertEqual((code, info["worker"], info["runtime"], info["instance"]),
                         (200, "kotlin", "kotlin", "kotlin#1"))
        self.assertIsNone((await self.worker_state(client, project, "kotlin"))["last_build"])

        # command: argv and env: got the instance's port.
        response, body = await client.get(project.url + "/echo/some/path?q=1")
        self.assertEqual(response.code, 200)
        echoed = json.loads(body)
        [port] = response.headers.getRawHeaders("x-tqserver-worker-port")
        self.assertEqual(echoed["banner"], f"echo worker on port {port}")
        self.assertEqual((echoed["path"], echoed["query"]), ("/some/path", "q=1"))
        self.assertEqual(echoed["headers"]["x-forwarded-prefix"], "/echo")
        self.assertEqual(response.headers.getRawHeaders("x-tqserver-worker-type"), ["command"])

        self.assertEqual(len(processes_of(project.root)), 3)
        self.assertEqual(await stop_twistd(proc), 0)
        self.assertEqual(processes_of(project.root), [])


class BunTests(PolyglotBase):
    def setUp(self):
        require_bun()

    def test_swap_under_load(self):
        return d(self._swap())

    async def _swap(self):
        project = self.make_project()
        project.copy_worker("api")
        proc = self.start(project, "--mode", "prod")
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["api"], timeout=180)
        load = Load(self, project.url + "/api/bench")
        source = os.path.join(project.root, "workers", "api", "index.ts")

        def edit():
            project.write(source, read(source).replace('"Hello, World!"', '"Hello, v2!"'))
        await self.swap_under_load(client, project, proc, load, b"Hello, v2!", edit)
        self.assertGreaterEqual(load.bodies[b"Hello, World!"], 20)
        self.assertEqual(await stop_twistd(proc), 0)

    def test_bun_install_only_when_package_json_changed(self):
        return d(self._install())

    async def _install(self):
        project = self.make_project()
        project.copy_worker("api")
        worker = os.path.join(project.root, "workers", "api")
        stamp = os.path.join(worker, "node_modules", ".tqserver-installed")
        proc = self.start(project, "--mode", "prod")
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["api"], timeout=180)
        installed = os.stat(stamp).st_mtime_ns          # the first start installed

        async def reload_done(old):
            pids = {p.pid for p in processes_of(project.root)}
            return pids and not old & pids and (
                await self.worker_state(client, project, "api"))["status"] == "healthy"

        # A source change with package.json unchanged: a swap, without bun install.
        old = {p.pid for p in processes_of(project.root)}
        source = os.path.join(worker, "index.ts")
        project.write(source, read(source).replace('"Hello, World!"', '"no install"'))
        proc.transport.signalProcess("HUP")

        async def swapped():
            response, body = await client.get(project.url + "/api/bench")
            return body == b"no install" and await reload_done(old)
        await wait_until(swapped, 30, "the reload to swap", proc)
        self.assertEqual(os.stat(stamp).st_mtime_ns, installed)

        # A new local dependency: the new code can only import it after bun install ran.
        project.write(os.path.join(worker, "greeting", "package.json"),
                      '{"name": "tqserver-test-greeting", "version": "1.0.0", '
                      '"main": "index.ts"}\n')
        project.write(os.path.join(worker, "greeting", "index.ts"),
                      'export const greeting = "installed greeting";\n')
        manifest = json.loads(read(os.path.join(worker, "package.json")))
        manifest["dependencies"] = {"tqserver-test-greeting": "file:./greeting"}
        project.write(os.path.join(worker, "package.json"), json.dumps(manifest))
        project.write(source, 'import { greeting } from "tqserver-test-greeting";\n'
                      + read(source).replace('const benchBody = "no install"',
                                             "const benchBody = greeting"))
        proc.transport.signalProcess("HUP")

        async def greeting_served():
            response, body = await client.get(project.url + "/api/bench")
            return body == b"installed greeting"
        await wait_until(greeting_served, 60, "the code using the new dependency", proc)
        self.assertGreater(os.stat(stamp).st_mtime_ns, installed)
        self.assertTrue(os.path.isdir(os.path.join(worker, "node_modules",
                                                   "tqserver-test-greeting")))
        self.assertEqual(await stop_twistd(proc), 0)
        self.assertEqual(processes_of(project.root), [])


class KotlinTests(PolyglotBase):
    def setUp(self):
        require_kotlin()

    async def kotlin_project(self, *args):
        project = self.make_project()
        shutil.copytree(await prebuilt_kotlin(), os.path.join(project.root, "workers", "kotlin"))
        proc = self.start(project, *args)
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["kotlin"], timeout=180)
        return project, proc, client

    def test_prod_compile_error_keeps_old_code_then_fix_swaps_under_load(self):
        return d(self._prod())

    async def _prod(self):
        project, proc, client = await self.kotlin_project("--mode", "prod")
        load = Load(self, project.url + "/kotlin/")
        source = os.path.join(project.root, KOTLIN_SOURCE)
        original = read(source)

        # A compile error: the old instance keeps serving, nothing failed.
        project.write(source, original.replace("fun main() {", "fun main() {\n    nope()"))
        proc.transport.signalProcess("HUP")

        async def build_failed():
            last = (await self.worker_state(client, project, "kotlin"))["last_build"]
            return last is not None and not last["ok"]
        await wait_until(build_failed, 90, "the broken build to fail", proc)
        response, body = await client.get(project.url + "/kotlin/")
        self.assertEqual((response.code, body), (200, KOTLIN_GREETING))
        self.assertEqual(load.failures, [])

        # The fix: compiled and swapped in under the same load.
        def fix():
            project.write(source, original.replace('"Hello from Kotlin!"', '"Kotlin v2"'))
        await self.swap_under_load(client, project, proc, load, b"Kotlin v2\n", fix)
        self.assertGreaterEqual(load.bodies[KOTLIN_GREETING], 20)
        self.assertEqual(await stop_twistd(proc), 0)
        self.assertEqual(processes_of(project.root), [])

    def test_dev_compile_error_shows_the_compiler_output_and_old_instance_lives(self):
        return d(self._dev())

    async def _dev(self):
        project, proc, client = await self.kotlin_project()
        [running] = processes_of(project.root)
        source = os.path.join(project.root, KOTLIN_SOURCE)
        # Saved with a compile error: the dev watcher rebuilds it.
        project.write(source, read(source).replace("fun main() {", "fun main() {\n    nope()"))

        async def error_page():
            response, body = await client.get(project.url + "/kotlin/")
            return response.code == 500 and b"Build failed" in body
        await wait_until(error_page, 90, "the build-error page", proc)
        response, body = await client.get(project.url + "/kotlin/info")
        self.assertIn(b"src/Main.kt:", body)
        self.assertIn(b"unresolved reference", body)
        self.assertEqual((await self.worker_state(client, project, "kotlin"))["status"],
                         "degraded")
        self.assertEqual([p.pid for p in processes_of(project.root)], [running.pid])
        self.assertEqual(await stop_twistd(proc), 0)
