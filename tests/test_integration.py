"""The real thing: `twistd tqserver` with real Python and Go workers on loopback."""
from __future__ import annotations

import os
import re
import signal

from twisted.internet import defer
from twisted.trial import unittest

from .support import (
    Client,
    Project,
    find_go,
    kill_leftovers,
    processes_of,
    sleep,
    spawn_twistd,
    stop_twistd,
    wait_until,
)

PY_WORKER = """
from tqserver.worker import serve

def app(environ, start_response):
    body = ("python %s %s" % (environ["PATH_INFO"], environ.get("HTTP_X_FORWARDED_PREFIX", ""))).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]

serve(app)
"""

# The same app answering a full HTML page (dev mode appends the live-reload script).
HTML_WORKER = PY_WORKER.replace('"text/plain"', '"text/html; charset=utf-8"').replace(
    '"python %s %s"', '"<html><body>page %s %s</body></html>"')


def d(coro):
    return defer.ensureDeferred(coro)


class IntegrationBase(unittest.TestCase):
    timeout = 240

    def make_project(self, **settings) -> Project:
        project = Project(os.path.abspath(self.mktemp()), **settings)
        self.addCleanup(kill_leftovers, project.root)
        return project

    def start(self, project: Project, *args, **kw):
        proc = spawn_twistd(project, *args, **kw)
        self.addCleanup(lambda: None if proc.done else d(stop_twistd(proc)))
        return proc

    async def daemon_started(self, pidfile: str) -> int:
        """The pid a daemonized twistd wrote to ``pidfile`` (killed at cleanup if left)."""
        async def pidfile_written():
            return os.path.exists(pidfile) and os.path.getsize(pidfile) > 0
        await wait_until(pidfile_written, 30, "the pidfile")
        pid = int(open(pidfile).read())
        self.addCleanup(lambda: _kill_quietly(pid))
        return pid

    async def stop_daemon(self, pid: int, pidfile: str) -> None:
        """SIGTERM, then wait for the daemon to exit and remove its pidfile."""
        os.kill(pid, signal.SIGTERM)

        async def gone():
            return not os.path.exists(pidfile) and not _alive(pid)
        await wait_until(gone, 30, "the daemon to exit and remove its pidfile")

    async def wait_healthy(self, client: Client, project: Project, proc, workers, timeout=180):
        last = {}

        async def healthy():
            code, body = await client.get_json(project.url + "/health")
            last["health"] = body
            states = {name: w["status"] for name, w in body["workers"].items()}
            return all(states.get(name) == "healthy" for name in workers)
        try:
            await wait_until(healthy, timeout, f"workers {workers} healthy", proc)
        except AssertionError as e:
            raise AssertionError(f"{e}\nlast /health: {last.get('health')}") from None


class ExampleSiteTests(IntegrationBase):
    """The example site from the README: index (Python) and hello (Go)."""

    def setUp(self):
        if find_go() is None:
            raise unittest.SkipTest("Go is not installed (bin/install-toolchains --only go)")

    def test_example_site(self):
        return d(self._example_site())

    async def _example_site(self):
        project = self.make_project()
        project.copy_worker("index")
        project.copy_worker("hello")
        proc = self.start(project)
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["index", "hello"])

        response, body = await client.get(project.url + "/")
        self.assertEqual(response.code, 200)
        self.assertIn(b"TQServer", body)
        self.assertEqual(response.headers.getRawHeaders("x-tqserver-worker-name"), ["index"])
        links = set(re.findall(rb'href="(/[^"]*)"', body))
        self.assertIn(b"/health", links)
        for link in sorted(links):  # every link on the page leads somewhere
            response, _ = await client.get(project.url + link.decode())
            self.assertNotIn(response.code, (403, 404), link)

        response, body = await client.get(project.url + "/hello/")
        self.assertEqual(response.code, 200)
        self.assertIn(b"Hello from Go", body)
        self.assertEqual(response.headers.getRawHeaders("x-tqserver-worker-type"), ["go"])

        response, body = await client.get(project.url + "/hello?x=1")   # the bare route
        self.assertEqual((response.code, response.headers.getRawHeaders("location")),
                         (301, ["/hello/?x=1"]))

        response, body = await client.get(project.url + "/hello/bench")
        self.assertEqual((response.code, body.strip()), (200, b"Hello, World!"))

        response, body = await client.get(project.url + "/hellox")
        self.assertEqual(response.headers.getRawHeaders("x-tqserver-worker-name"), ["index"])

        code, health = await client.get_json(project.url + "/health")
        self.assertEqual(code, 200)
        self.assertEqual(health["status"], "healthy")
        self.assertEqual(health["workers"]["hello"]["route"], "/hello")

        code, status = await client.get_json(project.admin_url + "/_tqserver/api/status")
        self.assertEqual(code, 200)
        pids = [i["pid"] for w in status["workers"].values() for i in w["instances"]]
        self.assertEqual(len(pids), 2)
        self.assertTrue(processes_of(project.root))

        self.assertEqual(await stop_twistd(proc), 0)
        self.assertEqual(processes_of(project.root), [])
        log_dir = os.path.join(project.root, "logs")
        self.assertTrue(any(n.startswith("worker_hello_") for n in os.listdir(log_dir)))


class LifecycleTests(IntegrationBase):
    """Python-only projects: fast, and no toolchain needed."""

    def python_project(self, **settings) -> Project:
        project = self.make_project(**settings)
        project.write("workers/app/src/main.py", PY_WORKER)
        project.write("workers/app/config/worker.yaml", "path: /app\n")
        return project

    def test_routes_and_sigterm_leaves_nothing(self):
        return d(self._routes_and_sigterm())

    async def _routes_and_sigterm(self):
        project = self.python_project()
        proc = self.start(project)
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["app"], timeout=60)
        response, body = await client.get(project.url + "/app/items?x=1")
        self.assertEqual(body, b"python /items /app")
        response, body = await client.get(project.url + "/appx")
        self.assertEqual(response.code, 404)
        self.assertNotIn(b"Traceback", body)
        children = processes_of(project.root)
        self.assertEqual(len(children), 1)
        self.assertEqual(os.getpgid(children[0].pid), children[0].pid)  # own process group
        self.assertEqual(await stop_twistd(proc), 0)
        self.assertEqual(processes_of(project.root), [])

    def test_daemon_writes_and_removes_pidfile(self):
        return d(self._daemon())

    async def _daemon(self):
        project = self.python_project()
        proc = self.start(project, daemon=True)
        pidfile = os.path.join(project.root, "run", "tqserver.pid")
        client = Client(self)

        async def pidfile_written():
            return os.path.exists(pidfile) and os.path.getsize(pidfile) > 0
        await wait_until(pidfile_written, 30, "the pidfile")
        with open(pidfile) as f:
            pid = int(f.read())
        self.addCleanup(lambda: _kill_quietly(pid))
        await self.wait_healthy(client, project, None, ["app"], timeout=60)
        os.kill(pid, signal.SIGTERM)

        async def gone():
            return not os.path.exists(pidfile) and not _alive(pid)
        await wait_until(gone, 30, "the daemon to exit and remove its pidfile")
        self.assertEqual(processes_of(project.root), [])
        await proc.ended

    def test_bad_config_is_one_clear_line(self):
        return d(self._bad_config())

    async def _bad_config(self):
        project = self.python_project()
        project.write("etc/server.yaml", "server:\n  port: eighty\n")
        proc = self.start(project)
        code = await proc.ended
        self.assertNotEqual(code, 0)
        self.assertIn("server.yaml:2:9: server.port", proc.text)
        self.assertNotIn("Traceback", proc.text)

    def test_port_taken_is_one_clear_line(self):
        return d(self._port_taken())

    async def _port_taken(self):
        import socket
        project = self.python_project()
        blocker = socket.socket()
        self.addCleanup(blocker.close)
        blocker.bind(("127.0.0.1", project.port))
        blocker.listen(1)
        proc = self.start(project)
        code = await proc.ended
        self.assertNotEqual(code, 0)
        self.assertIn(f"cannot listen on 127.0.0.1:{project.port}", proc.text)
        self.assertNotIn("Traceback", proc.text)

    def test_leftovers_of_a_killed_supervisor_are_stopped(self):
        return d(self._leftovers())

    async def _leftovers(self):
        project = self.python_project()
        proc = self.start(project)
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["app"], timeout=60)
        orphans = [p.pid for p in processes_of(project.root)]
        self.assertEqual(len(orphans), 1)
        proc.transport.signalProcess("KILL")
        await proc.ended
        self.assertTrue(_alive(orphans[0]))   # kill -9 leaves the worker behind...
        proc2 = self.start(project)
        await self.wait_healthy(client, project, proc2, ["app"], timeout=60)
        self.assertFalse(_alive(orphans[0]))  # ...and the next start stops it
        self.assertEqual(await stop_twistd(proc2), 0)
        self.assertEqual(processes_of(project.root), [])

    def test_crashed_worker_is_restarted(self):
        return d(self._crash())

    async def _crash(self):
        project = self.python_project()
        proc = self.start(project)
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["app"], timeout=60)
        [worker] = processes_of(project.root)
        worker.send_signal(signal.SIGKILL)

        async def replaced():
            pids = [p.pid for p in processes_of(project.root)]
            return pids and worker.pid not in pids
        await wait_until(replaced, 30, "a replacement instance", proc)
        await self.wait_healthy(client, project, proc, ["app"], timeout=30)
        code, health = await client.get_json(project.url + "/health")
        self.assertEqual(health["workers"]["app"]["restarts"].get("crash"), 1)
        await stop_twistd(proc)


def _alive(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass




class SelfReloadTests(IntegrationBase):
    """--reload: hupper restarts the supervisor when TQServer's own source changes."""

    def test_supervisor_restarts_on_own_source_change(self):
        return d(self._self_reload())

    async def _self_reload(self):
        import shutil

        from .support import REPO
        code_copy = os.path.abspath(self.mktemp())
        shutil.copytree(os.path.join(REPO, "tqserver"), os.path.join(code_copy, "tqserver"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(os.path.join(REPO, "twisted"), os.path.join(code_copy, "twisted"),
                        ignore=shutil.ignore_patterns("__pycache__", "dropin.cache"))
        project = self.make_project()
        project.write("workers/app/src/main.py", PY_WORKER)
        project.write("workers/app/config/worker.yaml", "path: /app\n")
        proc = self.start(project, "--reload", env={"PYTHONPATH": code_copy})
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["app"], timeout=60)
        self.assertEqual(proc.text.count("TQServer starting"), 1)

        async def noticed():
            # hupper learns the module list a moment after start and misses an edit made
            # before that; so edit, and edit again only while hupper has not noticed one
            # (an edit after it noticed would restart the new supervisor again, before it
            # logs that it is starting).
            with open(os.path.join(code_copy, "tqserver", "proxy", "pages.py"), "a") as f:
                f.write("\n# edited by the test\n")
            for _ in range(50):
                if "changed; reloading" in proc.text:
                    return True
                await sleep(0.1)
            return False
        await wait_until(noticed, 30, "hupper to notice the edit", proc)

        async def restarted():
            return proc.text.count("TQServer starting") >= 2
        await wait_until(restarted, 60, "the supervisor to restart", proc)
        await self.wait_healthy(client, project, proc, ["app"], timeout=60)
        self.assertEqual(len(processes_of(project.root)), 1)   # the old worker was stopped
        self.assertEqual(await stop_twistd(proc), 0)
        self.assertEqual(processes_of(project.root), [])

    def test_reload_needs_foreground(self):
        return d(self._reload_needs_foreground())

    async def _reload_needs_foreground(self):
        project = self.make_project()
        proc = self.start(project, "--reload", daemon=True)
        self.assertNotEqual(await proc.ended, 0)
        self.assertIn("--reload needs the foreground", proc.text)


class HangupTests(IntegrationBase):
    def test_sighup_swaps_in_new_code_without_failures(self):
        return d(self._hangup())

    async def _hangup(self):
        project = self.make_project()
        project.write("workers/app/src/main.py", PY_WORKER)
        project.write("workers/app/config/worker.yaml", "path: /app\n")
        proc = self.start(project, "--mode", "prod")
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["app"], timeout=60)
        [old] = processes_of(project.root)
        project.write("workers/app/src/main.py", PY_WORKER.replace('"python %s', '"v2 %s'))
        proc.transport.signalProcess("HUP")
        failures = []

        async def new_code_served():
            response, body = await client.get(project.url + "/app/x")
            if response.code != 200:
                failures.append(response.code)
            return body.startswith(b"v2")
        await wait_until(new_code_served, 30, "the new code after SIGHUP", proc)
        self.assertEqual(failures, [])

        async def old_gone():
            return old.pid not in [p.pid for p in processes_of(project.root)]
        await wait_until(old_gone, 30, "the old instance to be drained", proc)
        response, metrics = await client.get(project.admin_url + "/metrics")
        self.assertEqual(response.code, 200)
        for line in [b'tqserver_requests_total{code="200",worker="app"}',
                     b'tqserver_swap_duration_seconds_count{worker="app"} 2.0',
                     b'tqserver_worker_instances{state="ready",worker="app"} 1.0',
                     b"process_resident_memory_bytes"]:
            self.assertIn(line, metrics)
        self.assertEqual(await stop_twistd(proc), 0)


class DevReloadTests(IntegrationBase):
    """Dev mode: save a file, the new code serves; no request fails meanwhile."""

    async def edit_and_wait(self, client, project, proc, path, old, new, url, expect):
        failures = []
        text = open(path).read()
        with open(path, "w") as f:
            f.write(text.replace(old, new))

        async def served():
            response, body = await client.get(url)
            if response.code != 200:
                failures.append((response.code, body[:200]))
            return expect in body
        await wait_until(served, 120, f"{expect!r} at {url}", proc)
        self.assertEqual(failures, [])

    def test_python_edit(self):
        return d(self._python_edit())

    async def _python_edit(self):
        project = self.make_project()
        project.write("workers/app/src/main.py", PY_WORKER)
        proc = self.start(project)
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["app"], timeout=60)
        main = os.path.join(project.root, "workers", "app", "src", "main.py")
        await self.edit_and_wait(client, project, proc, main, '"python %s', '"edited %s',
                                 project.url + "/app/x", b"edited /x")

        async def drained():
            return len(processes_of(project.root)) == 1
        await wait_until(drained, 30, "the old instance to be drained", proc)
        self.assertEqual(await stop_twistd(proc), 0)

    def test_go_edit_and_broken_build(self):
        if find_go() is None:
            raise unittest.SkipTest("Go is not installed")
        return d(self._go_edit())

    async def _go_edit(self):
        project = self.make_project()
        project.copy_worker("hello")
        proc = self.start(project)
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["hello"])
        main = os.path.join(project.root, "workers", "hello", "src", "main.go")
        await self.edit_and_wait(client, project, proc, main, "Hello from Go!", "Hello again!",
                                 project.url + "/hello/", b"Hello again!")
        # A broken build: the old code keeps running, dev pages show the compiler output.
        with open(main, "a") as f:
            f.write("\nthis is not go\n")

        async def error_page():
            response, body = await client.get(project.url + "/hello/")
            return response.code == 500 and b"Build failed" in body
        await wait_until(error_page, 120, "the build-error page", proc)
        response, body = await client.get(project.url + "/hello/")
        self.assertIn(b"main.go", body)                  # the compiler's message
        self.assertIn(b"TQServer live reload", body)     # reloads after the next good build
        self.assertEqual(len(processes_of(project.root)), 1)   # old instance still up
        code, health = await client.get_json(project.url + "/health")
        self.assertEqual(health["workers"]["hello"]["status"], "degraded")
        # Fixed again: served.
        text = open(main).read().replace("\nthis is not go\n", "\n")
        with open(main, "w") as f:
            f.write(text)

        async def fixed():
            response, body = await client.get(project.url + "/hello/")
            return response.code == 200 and b"Hello again!" in body
        await wait_until(fixed, 120, "the fixed build", proc)
        self.assertEqual(await stop_twistd(proc), 0)

    def test_new_and_removed_worker(self):
        return d(self._new_and_removed())

    async def _new_and_removed(self):
        project = self.make_project()
        project.write("workers/app/src/main.py", PY_WORKER)
        proc = self.start(project)
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["app"], timeout=60)
        project.write("workers/notes/src/main.py", PY_WORKER.replace('"python %s', '"notes %s'))
        await self.wait_healthy(client, project, proc, ["app", "notes"], timeout=60)
        response, body = await client.get(project.url + "/notes/x")
        self.assertEqual(body, b"notes /x /notes")
        import shutil
        shutil.rmtree(os.path.join(project.root, "workers", "notes"))

        async def removed():
            code, health = await client.get_json(project.url + "/health")
            return "notes" not in health["workers"] and len(processes_of(project.root)) == 1
        await wait_until(removed, 30, "the removed worker to stop", proc)
        response, body = await client.get(project.url + "/notes/x")
        self.assertEqual(response.code, 404)
        self.assertEqual(await stop_twistd(proc), 0)

    def test_live_reload_and_server_config(self):
        return d(self._live_reload())

    async def _live_reload(self):
        project = self.make_project()
        project.write("workers/app/src/main.py", HTML_WORKER)
        proc = self.start(project)
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["app"], timeout=60)
        response, body = await client.get(project.url + "/app/")
        self.assertIn(b"page /", body)
        self.assertIn(b"TQServer live reload", body)
        self.assertIn(b'"app"', body)

        events = EventStream(project.port, "/_tqserver/events")
        self.addCleanup(events.close)
        await events.connected
        project.write("workers/app/public/site.css", "body{}")
        await wait_until(events.saw(b'"public"'), 10, "a public event", proc)
        main = os.path.join(project.root, "workers", "app", "src", "main.py")
        with open(main, "a") as f:
            f.write("\n# edit\n")
        await wait_until(events.saw(b'"swap"'), 30, "a swap event", proc)

        # server.yaml: a valid change applies, an invalid one is reported and ignored
        config = os.path.join(project.root, "etc", "server.yaml")
        text = open(config).read()
        with open(config, "w") as f:
            f.write(text + "health:\n  path: /healthz\n")

        async def moved():
            response, _ = await client.get(project.url + "/healthz")
            return response.code == 200
        await wait_until(moved, 10, "the new health path", proc)
        with open(config, "w") as f:
            f.write(text + "health:\n  path: [oops\n")

        async def reported():
            return "keeping the running configuration" in proc.text
        await wait_until(reported, 10, "the invalid config report", proc)
        response, _ = await client.get(project.url + "/healthz")
        self.assertEqual(response.code, 200)
        self.assertEqual(await stop_twistd(proc), 0)


class EventStream:
    """A raw server-sent-events client that keeps everything it received."""

    def __init__(self, port: int, path: str) -> None:
        from twisted.internet import protocol, reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint
        stream = self
        self.data = b""

        class Reader(protocol.Protocol):
            def connectionMade(self):
                self.transport.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")

            def dataReceived(self, data):
                stream.data += data
        self.connected = TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            protocol.Factory.forProtocol(Reader))
        self.connected.addCallback(lambda proto: setattr(self, "proto", proto))
        self.proto = None

    def saw(self, needle: bytes):
        async def check():
            return needle in self.data
        return check

    def close(self):
        if self.proto is not None:
            self.proto.transport.loseConnection()


class HangupOnlyChangedTests(IntegrationBase):
    def test_sighup_redoes_only_changed_workers(self):
        return d(self._only_changed())

    async def _only_changed(self):
        project = self.make_project()
        for name in ("a", "b"):
            project.write(f"workers/{name}/src/main.py", PY_WORKER)
        proc = self.start(project, "--mode", "prod")
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["a", "b"], timeout=60)

        async def pids():
            code, status = await client.get_json(project.admin_url + "/_tqserver/api/status")
            return {n: [i["pid"] for i in w["instances"]] for n, w in status["workers"].items()}
        before = await pids()
        proc.transport.signalProcess("HUP")          # nothing changed: nothing restarts
        await wait_until(lambda: _true_after(0.5), 5, "a moment")
        self.assertEqual(await pids(), before)
        self.assertIn("reload: nothing changed", proc.text)

        main = os.path.join(project.root, "workers", "a", "src", "main.py")
        with open(main, "w") as f:
            f.write(PY_WORKER.replace('"python %s', '"a2 %s'))
        proc.transport.signalProcess("HUP")

        async def swapped():
            response, body = await client.get(project.url + "/a/x")
            now = await pids()
            return body.startswith(b"a2") and len(now["a"]) == 1 and now["a"] != before["a"]
        await wait_until(swapped, 30, "worker a swapped", proc)
        self.assertEqual((await pids())["b"], before["b"])
        self.assertEqual(await stop_twistd(proc), 0)


async def _true_after(seconds: float) -> bool:
    await sleep(seconds)
    return True


class HangupStormTests(IntegrationBase):
    """A storm of SIGHUPs after one source change (a deploy script retrying, a HUP per host
    in a loop) is one Go build, never a build restarted by each signal."""

    def setUp(self):
        if find_go() is None:
            raise unittest.SkipTest("Go is not installed (bin/install-toolchains --only go)")

    def test_a_hundred_hups_build_once(self):
        return d(self._storm())

    async def _storm(self):
        project = self.make_project()
        project.copy_worker("hello")
        proc = self.start(project, "--mode", "prod")
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["hello"], timeout=120)
        main = os.path.join(project.root, "workers", "hello", "src", "main.go")
        with open(main) as f:
            source = f.read()
        with open(main, "w") as f:
            f.write(source.replace("Hello from Go!", "Hello again from Go!"))
        for _ in range(100):                 # 100 within the debounce: one reload
            proc.transport.signalProcess("HUP")
            await sleep(0.002)
        for _ in range(10):                  # then one every 0.1 s: each joins that build
            await sleep(0.1)
            proc.transport.signalProcess("HUP")

        async def new_code():
            _, body = await client.get(project.url + "/hello/")
            return b"Hello again from Go!" in body
        await wait_until(new_code, 120, "the new code", proc)
        await sleep(0.5)                     # (the last HUPs' reloads logged)
        self.assertEqual(proc.text.count("building hello ("), 2, proc.text)  # start + one
        self.assertNotIn("build of hello cancelled", proc.text)
        self.assertIn("reloading (SIGHUP x", proc.text)   # (the kernel may merge a few)
        self.assertEqual(await stop_twistd(proc), 0)
