"""PHP through the real thing: `twistd tqserver` with the blog example on php-fpm, a
Python worker beside it, requests over loopback, and nothing left running afterwards."""
from __future__ import annotations

import glob
import hashlib
import os
import time

import psutil
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from tqserver.runtimes.php import find_php_fpm

from .php_support import SKIP_REASON
from .support import Client, processes_of, sleep, stop_twistd, wait_until
from .test_integration import PY_WORKER, IntegrationBase, d

ECHO_PHP = """<?php
$input = file_get_contents('php://input');
header('Content-Type: text/plain');
echo strlen($input), ' ', md5($input), ' ', $_SERVER['PATH_INFO'] ?? '', ' ',
     getenv('WORKER_INSTANCE');
"""


class Requests:
    """Keep-alive HTTP requests with a body, as browsers and load generators send them."""

    def __init__(self, testcase, connections: int = 8) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = connections
        self.pool.retryAutomatically = False
        self.agent = Agent(reactor, pool=self.pool)
        testcase.addCleanup(self.pool.closeCachedConnections)

    async def send(self, method: bytes, url: str, body: bytes = b"",
                   headers=None, timeout: float = 30.0):
        import io

        from twisted.web.client import FileBodyProducer
        producer = FileBodyProducer(io.BytesIO(body)) if body else None
        d = self.agent.request(method, url.encode(), Headers(headers or {}), producer)
        d.addTimeout(timeout, reactor)
        response = await d
        return response, await readBody(response)


class BlogTests(IntegrationBase):

    def setUp(self):
        if find_php_fpm() is None:
            raise unittest.SkipTest(SKIP_REASON)

    def blog_project(self, **settings):
        project = self.make_project(**settings)
        project.copy_worker("blog")
        project.write("workers/blog/public/echo.php", ECHO_PHP)
        project.write("workers/app/src/main.py", PY_WORKER)
        project.write("workers/app/config/worker.yaml", "path: /app\n")
        return project

    def test_blog_through_the_proxy(self):
        return d(self._blog())

    async def _blog(self):
        project = self.blog_project()
        proc = self.start(project)
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["blog", "app"], timeout=60)

        response, body = await client.get(project.url + "/blog/")
        self.assertEqual(response.code, 200)
        self.assertIn(b"<h1>Posts</h1>", body)
        self.assertIn(b'href="/blog/post/front-controllers"', body)
        self.assertEqual(response.headers.getRawHeaders("x-tqserver-worker-type"), ["php"])

        # the front controller: no such file, index.php routes the path
        response, body = await client.get(project.url + "/blog/post/front-controllers")
        self.assertEqual(response.code, 200)
        self.assertIn(b"Front controllers and PATH_INFO", body)
        response, body = await client.get(project.url + "/blog/no/such/page")
        self.assertEqual(response.code, 404)
        self.assertIn(b"/no/such/page", body)

        # PATH_INFO after a script
        response, body = await client.get(project.url + "/blog/echo.php/extra/path")
        self.assertEqual(body.split(b" ")[2], b"/extra/path")

        # static files beside scripts come from the proxy; PHP source never does
        response, body = await client.get(project.url + "/blog/style.css")
        self.assertEqual(response.code, 200)
        with open(os.path.join(project.root, "workers/blog/public/style.css"), "rb") as f:
            self.assertEqual(body, f.read())
        self.assertIsNone(response.headers.getRawHeaders("x-tqserver-worker-type"))
        for script in ("index.php", "form.php", "bench.php", "cookies.php"):
            response, body = await client.get(project.url + "/blog/" + script)
            self.assertNotIn(b"<?php", body, script)
        response, body = await client.get(project.url + "/blog/bench.php")
        self.assertEqual((response.code, body), (200, b"Hello, World!\n"))

        # two cookies, two Set-Cookie headers
        response, body = await client.get(project.url + "/blog/cookies.php")
        cookies = response.headers.getRawHeaders("set-cookie")
        self.assertEqual(sorted(c.split(";")[0] for c in cookies), ["theme=sunrise", "visits=1"])

        # a form POST, and a 5 MB body through FastCGI
        requests = Requests(self)
        response, body = await requests.send(
            b"POST", project.url + "/blog/form.php", b"name=Ada&message=Hello+there",
            {"Content-Type": ["application/x-www-form-urlencoded"]})
        self.assertEqual(response.code, 200)
        self.assertIn(b"<th>name</th><td>Ada</td>", body)
        self.assertIn(b"<th>message</th><td>Hello there</td>", body)
        upload = os.urandom(5 * 1024 * 1024)
        response, body = await requests.send(b"POST", project.url + "/blog/echo.php", upload,
                                             {"Content-Type": ["application/octet-stream"]})
        self.assertEqual(body.split(b" ")[:2],
                         [str(len(upload)).encode(), hashlib.md5(upload).hexdigest().encode()])

        # dev: an edited script shows on the next request, from the same instance
        version = os.path.join(project.root, "workers/blog/public/version.php")
        plain = "<?php header('Content-Type: text/plain'); echo '%s';"
        project.write("workers/blog/public/version.php", plain % "one")
        response, body = await client.get(project.url + "/blog/version.php")
        instance = response.headers.getRawHeaders("x-tqserver-worker-instance")
        self.assertEqual(body, b"one")
        project.write("workers/blog/public/version.php", plain % "two")
        later = os.stat(version).st_mtime + 2     # opcache compares whole-second mtimes
        os.utime(version, (later, later))
        response, body = await client.get(project.url + "/blog/version.php")
        self.assertEqual(body, b"two")
        self.assertEqual(response.headers.getRawHeaders("x-tqserver-worker-instance"), instance)

        # the other worker is unaffected
        response, body = await client.get(project.url + "/app/x")
        self.assertEqual(body, b"python /x /app")

        self.assertTrue(glob.glob(os.path.join(project.root, "run", "php", "*.conf")))
        self.assertEqual(await stop_twistd(proc), 0)
        self.assertEqual(processes_of(project.root), [])
        self.assertEqual(glob.glob(os.path.join(project.root, "run", "php", "*")), [])

    def test_prod_reload_under_load_fails_nothing(self):
        return d(self._reload_under_load())

    async def _reload_under_load(self):
        project = self.blog_project()
        proc = self.start(project, "--mode", "prod")
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["blog"], timeout=60)
        code, status = await client.get_json(project.admin_url + "/_tqserver/api/status")
        [old] = status["workers"]["blog"]["instances"]
        old_master = psutil.Process(old["pid"])
        self.assertIn("php-fpm", " ".join(old_master.cmdline()))
        requests = Requests(self, connections=8)
        results = {"ok": 0, "failed": [], "instances": set()}
        running = [True]

        async def load(i: int) -> None:
            n = 0
            while running[0]:
                n += 1
                try:
                    if n % 5 == 0:
                        body = b"x" * 70000
                        response, got = await requests.send(b"POST", project.url + "/blog/echo.php",
                                                            body, timeout=20)
                        good = got.startswith(b"70000 " + hashlib.md5(body).hexdigest().encode())
                        results["instances"].add(got.rsplit(b" ", 1)[-1])
                    else:
                        response, got = await requests.send(b"GET", project.url + "/blog/bench.php",
                                                            timeout=20)
                        good = got == b"Hello, World!\n"
                    if response.code == 200 and good:
                        results["ok"] += 1
                    else:
                        results["failed"].append((response.code, got[:200]))
                except Exception as e:
                    results["failed"].append(repr(e))
        loops = [defer.ensureDeferred(load(i)) for i in range(6)]
        try:
            await sleep(1.0)
            before = results["ok"]
            self.assertGreater(before, 0)
            # a new release of the scripts: SIGHUP redoes only workers whose files changed
            bench = os.path.join(project.root, "workers/blog/public/bench.php")
            later = time.time() + 2
            os.utime(bench, (later, later))
            proc.transport.signalProcess("HUP")

            async def swapped():
                return b"blog#2" in results["instances"] and not old_master.is_running()
            await wait_until(swapped, 60, "the new php-fpm to serve and the old to stop", proc)
            await sleep(1.0)
        finally:
            running[0] = False
            await defer.gatherResults(loops)
        self.assertEqual(results["failed"], [], "\n".join(
            line for line in proc.text.splitlines() if "tqserver.access" not in line))
        self.assertGreater(results["ok"], before + 20)
        self.assertEqual(results["instances"], {b"blog#1", b"blog#2"})
        self.assertEqual(await stop_twistd(proc), 0)
        self.assertEqual(processes_of(project.root), [])


class MissingPhpFpmTests(IntegrationBase):
    """Runs with or without php-fpm installed: the configured binary does not exist."""

    def test_missing_php_fpm_fails_only_that_worker(self):
        return d(self._missing())

    async def _missing(self):
        project = self.make_project()
        project.copy_worker("blog")
        project.write("workers/blog/config/worker.yaml",
                      "path: /blog\ntype: php\nphp:\n  binary: /nonexistent/php-fpm\n")
        project.write("workers/app/src/main.py", PY_WORKER)
        project.write("workers/app/config/worker.yaml", "path: /app\n")
        proc = self.start(project, "--mode", "prod")
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["app"], timeout=60)

        async def blog_failed():
            code, health = await client.get_json(project.url + "/health")
            return health["workers"]["blog"]["status"] == "failed"
        await wait_until(blog_failed, 30, "the blog worker to be reported failed", proc)
        # the error is on the admin listener (the public /health in prod has none)
        code, health = await client.get_json(project.admin_url + "/health")
        self.assertEqual(health["status"], "degraded")
        error = health["workers"]["blog"]["error"]
        self.assertIn("/nonexistent/php-fpm", error)
        self.assertIn("install php-fpm (apt-get install php-fpm, or bin/install-toolchains "
                      "--only php)", error)
        response, body = await client.get(project.url + "/blog/")
        self.assertEqual(response.code, 503)
        self.assertNotIn(b"nonexistent", body)          # prod pages keep details out
        response, body = await client.get(project.url + "/app/x")
        self.assertEqual((response.code, body), (200, b"python /x /app"))
        self.assertIn("install php-fpm", proc.text)
        self.assertEqual(await stop_twistd(proc), 0)
        self.assertEqual(processes_of(project.root), [])
