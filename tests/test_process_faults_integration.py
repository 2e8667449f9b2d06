"""Process faults with the real thing: a php-fpm master killed with -9 while its pool lives
on, a worker that leaves a detached (setsid) helper behind, and a supervisor killed with -9
under a PHP and a Go worker — each with a cgroup per instance and without one (the process
tree, noted while it runs, then)."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys

import psutil
from twisted.trial import unittest

from tqserver.runtimes.php import find_php_fpm

from .php_support import SKIP_REASON
from .support import (
    Client,
    Project,
    find_go,
    processes_of,
    stop_twistd,
    wait_until,
)
from .test_integration import IntegrationBase, d

# A command worker that starts a helper in a new session (out of its process group) that
# ignores SIGTERM and holds the worker's output pipes, then serves HTTP.
DETACHING_WORKER = r"""
import http.server, os, subprocess, sys
helper = subprocess.Popen(
    [sys.executable, "-c",
     "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
    start_new_session=True)
with open("helper.pid", "w") as f:
    f.write(str(helper.pid))

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""

PHP_PAGE = "<?php header('Content-Type: text/plain'); echo 'php ', getmypid();\n"


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def group_of(pid: int) -> list[int]:
    """Every live process in the process group ``pid`` leads (php-fpm's pool)."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except (OSError, psutil.Error):
            continue
    return found


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class ProcessFaultTests(IntegrationBase):
    cgroups = "true"

    def project(self) -> Project:
        return self.make_project(cgroups=self.cgroups, kill_timeout_ms=1500)

    def start(self, project, *args, **kw):
        proc = IntegrationBase.start(self, project, *args, **kw)
        self.addCleanup(self.assertEqual, cgroups_of(proc.transport.pid), [])
        return proc

    async def instances(self, client, project, worker):
        code, status = await client.get_json(project.admin_url + "/_tqserver/api/status")
        return status["workers"][worker]["instances"]

    def php_project(self) -> Project:
        if find_php_fpm() is None:
            raise unittest.SkipTest(SKIP_REASON)
        project = self.project()
        project.write("workers/blog/config/worker.yaml", "type: php\npath: /blog\n")
        project.write("workers/blog/public/index.php", PHP_PAGE)
        return project

    def test_php_fpm_master_killed(self):
        return d(self._php_fpm_master_killed())

    async def _php_fpm_master_killed(self):
        project = self.php_project()
        proc = self.start(project, "--mode", "prod")
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["blog"], timeout=60)
        [old] = await self.instances(client, project, "blog")
        pool = [pid for pid in group_of(old["pid"]) if pid != old["pid"]]
        self.addCleanup(kill_all, pool)
        self.assertTrue(pool)
        os.kill(old["pid"], signal.SIGKILL)

        async def replaced():
            code, health = await client.get_json(project.admin_url + "/health")
            blog = health["workers"]["blog"]
            return blog["restarts"].get("crash") == 1 and blog["status"] == "healthy"

        await wait_until(replaced, 30, "the killed php-fpm master replaced", proc)
        [new] = await self.instances(client, project, "blog")
        self.assertNotEqual(new["pid"], old["pid"])
        self.assertEqual([pid for pid in pool if alive(pid)], [])  # its orphaned pool too
        response, body = await client.get(project.url + "/blog/")
        self.assertEqual(response.code, 200)
        self.assertIn(int(body.split()[1]), group_of(new["pid"]))
        self.assertEqual(await stop_twistd(proc), 0)

    def test_detached_child_does_not_hold_up_the_stop(self):
        return d(self._detached_child())

    async def _detached_child(self):
        project = self.project()
        project.write("workers/detach/server.py", DETACHING_WORKER)
        project.write(
            "workers/detach/config/worker.yaml",
            f'type: command\ncommand: ["{sys.executable}", "server.py", "{{port}}"]\n',
        )
        proc = self.start(project)
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["detach"], timeout=60)
        with open(os.path.join(project.root, "workers/detach/helper.pid")) as f:
            helper = int(f.read())
        self.addCleanup(kill_all, [helper])
        self.assertTrue(alive(helper))
        self.assertNotEqual(os.getpgid(helper), (await self.instances(client, project, "detach"))[
            0]["pid"])
        # A swap stops the old instance (its helper with it) and the new one's stays...
        project.write("workers/detach/server.py", DETACHING_WORKER + "\n# edited\n")

        async def swapped():
            with open(os.path.join(project.root, "workers/detach/helper.pid")) as f:
                return int(f.read()) != helper and not alive(helper)

        await wait_until(swapped, 30, "the old instance and its helper stopped", proc)
        with open(os.path.join(project.root, "workers/detach/helper.pid")) as f:
            helper = int(f.read())
        self.addCleanup(kill_all, [helper])
        # ...until SIGTERM, which stops everything within kill_timeout_ms
        self.assertEqual(await stop_twistd(proc, timeout=15), 0)
        await wait_until(lambda: _true(not alive(helper)), 5, "the helper gone")

    def test_leftovers_of_a_killed_supervisor(self):
        return d(self._leftovers())

    async def _leftovers(self):
        if find_go() is None:
            raise unittest.SkipTest("go is not installed")
        project = self.php_project()
        project.copy_worker("hello")
        proc = self.start(project, "--mode", "prod")
        client = Client(self)
        await self.wait_healthy(client, project, proc, ["blog", "hello"], timeout=120)
        [php] = await self.instances(client, project, "blog")
        [go] = await self.instances(client, project, "hello")
        old = group_of(php["pid"]) + group_of(go["pid"])
        self.addCleanup(kill_all, old)
        self.assertGreater(len(old), 2)
        # A bystander whose PID a stale record names with another start time: a PID
        # handed out again, never to be killed.
        bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
        self.addCleanup(bystander.wait)
        self.addCleanup(kill_all, [bystander.pid])
        project.write(
            f"run/instances/{bystander.pid}",
            '{"id": "blog#9", "root": "%s", "boot": "%s", "pid": %d, "start": 1, "cwd": "/",'
            ' "cmdlines": ["sleep 300"], "family": [], "cgroup": null}'
            % (project.root, _boot_id(), bystander.pid),
        )
        proc.transport.signalProcess("KILL")
        await proc.ended
        self.assertTrue(all(alive(pid) for pid in old))  # kill -9 leaves them behind...
        proc2 = self.start(project, "--mode", "prod")
        await self.wait_healthy(client, project, proc2, ["blog", "hello"], timeout=120)
        self.assertEqual([pid for pid in old if alive(pid)], [])  # ...the next start stops them
        self.assertIsNone(bystander.poll())  # and nothing else
        [php2] = await self.instances(client, project, "blog")
        self.assertTrue(group_of(php2["pid"]))
        self.assertEqual(await stop_twistd(proc2), 0)
        self.assertEqual(processes_of(project.root), [])


class ProcessFaultTreeTests(ProcessFaultTests):
    """The same without cgroups: found by process group and the tree noted while running."""

    cgroups = "false"


async def _true(value):
    return value


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def cgroups_of(supervisor_pid: int) -> list[str]:
    """The cgroup directories a supervisor made (none left once it stopped)."""
    from tqserver.supervise.cgroups import _own_cgroup, _v2_mount

    mount, own = _v2_mount(), _own_cgroup()
    if mount is None or own is None:
        return []
    return glob.glob(os.path.join(mount, own.lstrip("/"), f"tqserver.{supervisor_pid}.*"))
